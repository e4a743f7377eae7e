"""The fused transformer block, shared by every family vitfast converts.

A block is described once, as plain tensors (``BlockWeights``), and run by ``post_norm_block``
(``nn.TransformerEncoderLayer``'s default) or ``pre_norm_block`` (timm, torchvision, Hugging Face,
``norm_first=True``). Each runs five fused launches per half-block at most:

    pre-norm:  y = LN1(x); qkv = y·Wqkvᵀ + b; a = attention(qkv); x = a·Woᵀ + b + x       (residual in epilogue)
               y = LN2(x); x = fc2(act(fc1(y) + b1)) + b2 + x                               (act and residual in epilogues)
    post-norm: x = LN1(a·Woᵀ + b + x), then x = LN2(fc2(act(fc1(x))) + x)

Variants the same launches carry: rotary position embeddings (applied to q and k inside the
attention kernel), a gated MLP (SwiGLU, GeGLU: act(gate)·value in fc1's epilogue), LayerNorms inside
the branches (EVA's scale-norm of the attention output, the sub-LN of the MLP's hidden activations:
one more launch each) and per-channel LayerScale in the out-projection's and fc2's epilogues.
In training, dropout runs inside the same launches (on the attention probabilities in the attention
kernel, on the out-projection's, fc1's and fc2's outputs in the GEMM epilogues) and stochastic depth
scales each sample's branch in the residual epilogue (``_drops.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops.attention import attention
from ..ops.gated_linear import gated_linear
from ..ops.layer_norm import layer_norm
from ..ops.linear import linear, mlp
from ._block_checks import check_block
from ._drops import NONE, Drops, drop_path_scale

Norm = tuple["Tensor | None", "Tensor | None", float]  # weight, bias, eps


@dataclass
class BlockWeights:
    num_heads: int
    qkv_weight: Tensor | tuple[Tensor, Tensor, Tensor]  # [3D, D] q | k | v rows (in_proj), or q, k, v apart
    qkv_bias: Tensor | tuple[Tensor, Tensor, Tensor] | None
    proj_weight: Tensor  # [D, D]
    proj_bias: Tensor | None
    norm1: Norm
    norm2: Norm
    fc1_weight: Tensor | tuple[Tensor, Tensor]  # [hidden, D]; (gate, value) for a gated MLP: act(gate)·value
    fc1_bias: Tensor | tuple[Tensor | None, Tensor | None] | None
    fc2_weight: Tensor
    fc2_bias: Tensor | None
    activation: str | None  # one of the linear epilogue's; None (an activation the kernels lack) is refused
    scale: float | None = None  # attention scale; 1/sqrt(head_dim) when None
    proj_scale: Tensor | None = None  # [D] per-channel scale of the attention branch (timm's LayerScale ls1)
    fc2_scale: Tensor | None = None  # [D] per-channel scale of the MLP branch (ls2)
    attn_norm: Norm | None = None  # LayerNorm of the attention output before the out-projection
    mlp_norm: Norm | None = None  # LayerNorm of the hidden activations before fc2


def param(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` read straight from its parameters when it is one (a dict lookup, not
    ``nn.Module.__getattr__``: the stand-ins read a block's dozen tensors on every call)."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def linear_params(linear: nn.Module) -> tuple[Tensor, Tensor | None]:
    return param(linear, "weight"), param(linear, "bias")


def norm_params(norm: nn.Module) -> tuple[Tensor | None, Tensor | None, float]:
    return param(norm, "weight"), param(norm, "bias"), norm.eps


def packed_block_weights(attn: nn.Module, fc1: nn.Module, fc2: nn.Module, norm1: nn.Module, norm2: nn.Module,
                         activation: str | None, proj_scale: Tensor | None = None,
                         fc2_scale: Tensor | None = None) -> BlockWeights:
    """The weights of a block whose attention is an ``nn.MultiheadAttention`` (one packed in-projection)
    and whose MLP is ``fc1``, the activation, ``fc2``: PyTorch's encoder layer, torchvision's and
    open_clip's blocks."""
    (proj_w, proj_b), (fc1_w, fc1_b), (fc2_w, fc2_b) = (linear_params(m) for m in (
        attn._modules["out_proj"], fc1, fc2))
    return BlockWeights(
        num_heads=attn.num_heads, qkv_weight=param(attn, "in_proj_weight"), qkv_bias=param(attn, "in_proj_bias"),
        proj_weight=proj_w, proj_bias=proj_b, norm1=norm_params(norm1), norm2=norm_params(norm2),
        fc1_weight=fc1_w, fc1_bias=fc1_b, fc2_weight=fc2_w, fc2_bias=fc2_b, activation=activation,
        proj_scale=proj_scale, fc2_scale=fc2_scale,
    )


def _packed(t: Tensor | tuple[Tensor | None, ...] | None) -> Tensor | None:
    """q, k and v apart as one packed tensor; a missing bias among present ones (EVA's k) is zeros."""
    if not isinstance(t, tuple):
        return t
    present = next((p for p in t if p is not None), None)
    return None if present is None else torch.cat([torch.zeros_like(present) if p is None else p for p in t])


def _attend(y: Tensor, w: BlockWeights, key_padding_mask, attn_mask, is_causal: bool,
            batch_first: bool = True, rope: tuple = (None, 0, False), dropout_p: float = 0.0) -> Tensor:
    """Attention of the tokens ``y`` ([B, N, D], or [N, B, D] when not ``batch_first``): [B, N, D],
    through the attention norm when the block has one; ``dropout_p`` drops attention probabilities."""
    qkv = linear(y, _packed(w.qkv_weight), _packed(w.qkv_bias))
    table, prefix, half = rope
    a = attention(qkv if batch_first else qkv.transpose(0, 1), w.num_heads, key_padding_mask=key_padding_mask,
                  attn_mask=attn_mask, scale=w.scale, is_causal=is_causal, rope=table, rope_prefix=prefix,
                  rope_half=half, dropout_p=dropout_p)
    return a if w.attn_norm is None else layer_norm(a, *w.attn_norm)


def mlp_branch(y: Tensor, w: BlockWeights, residual: Tensor, drops: Drops = NONE,
               path_scale: Tensor | None = None) -> Tensor:
    """residual + path_scale · scale · drop(fc2(norm(drop(act(fc1(y)))))), fc1 gated or not, the norm
    when ``w`` has one, dropout as ``drops`` says (hidden, mlp) and ``path_scale`` the per-sample
    factor of stochastic depth. ``w`` is anything with BlockWeights' MLP fields (fc1_*, fc2_*,
    activation, mlp_norm, fc2_scale)."""
    out = dict(residual=residual, scale=w.fc2_scale, dropout_p=drops.mlp, row_scale=path_scale)
    if not isinstance(w.fc1_weight, tuple) and w.mlp_norm is None:
        return mlp(y, w.fc1_weight, w.fc1_bias, w.fc2_weight, w.fc2_bias, activation=w.activation,
                   hidden_dropout_p=drops.hidden, **out)
    if isinstance(w.fc1_weight, tuple):
        (gate_w, value_w), (gate_b, value_b) = w.fc1_weight, w.fc1_bias or (None, None)
        h = gated_linear(y, gate_w, gate_b, value_w, value_b, activation=w.activation, dropout_p=drops.hidden)
    else:
        h = linear(y, w.fc1_weight, w.fc1_bias, activation=w.activation, dropout_p=drops.hidden)
    if w.mlp_norm is not None:
        h = layer_norm(h, *w.mlp_norm)
    return linear(h, w.fc2_weight, w.fc2_bias, **out)


def pre_norm_block(x: Tensor, w: BlockWeights, key_padding_mask=None, attn_mask=None,
                   is_causal: bool = False, batch_first: bool = True, rope: Tensor | None = None,
                   rope_prefix: int = 0, rope_half: bool = False, drops: Drops = NONE) -> Tensor:
    """x + attn(LN1(x)), then + mlp(LN2(·)); x is [B, N, D], or sequence-first [N, B, D] when not
    ``batch_first`` (OpenAI CLIP's layout), and the result keeps x's layout. ``rope`` (timm's
    [sin | cos] table), ``rope_prefix`` and ``rope_half`` rotate q and k as ``vitfast.ops.attention`` does.
    ``drops``: dropout and stochastic depth in effect for this call (training)."""
    check_block(x if batch_first else x.transpose(0, 1), w, key_padding_mask, attn_mask, rope, rope_prefix)
    a = _attend(layer_norm(x, *w.norm1), w, key_padding_mask, attn_mask, is_causal, batch_first,
                (rope, rope_prefix, rope_half), drops.attn)
    # Sequence-first: the out-projection reads the attention output back in x's layout.
    x = linear(a if batch_first else a.transpose(0, 1), w.proj_weight, w.proj_bias, residual=x, scale=w.proj_scale,
               dropout_p=drops.proj, row_scale=drop_path_scale(x, drops.path1, drops.path_draws[0], batch_first))
    return mlp_branch(layer_norm(x, *w.norm2), w, x, drops,
                      drop_path_scale(x, drops.path2, drops.path_draws[1], batch_first))


def post_norm_block(x: Tensor, w: BlockWeights, key_padding_mask=None, attn_mask=None,
                    is_causal: bool = False, drops: Drops = NONE) -> Tensor:
    """LN1(x + attn(x)), then LN2(· + mlp(·)); x is [B, N, D] (batch first); ``drops`` as in
    ``pre_norm_block`` (nn.TransformerEncoderLayer has no stochastic depth)."""
    check_block(x, w, key_padding_mask, attn_mask)
    a = _attend(x, w, key_padding_mask, attn_mask, is_causal, dropout_p=drops.attn)
    x = layer_norm(linear(a, w.proj_weight, w.proj_bias, residual=x, dropout_p=drops.proj), *w.norm1)
    return layer_norm(mlp_branch(x, w, x, drops), *w.norm2)
