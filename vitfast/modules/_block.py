"""The fused transformer block, shared by every family vitfast converts.

A block is described once, as plain tensors (``BlockWeights``), and run by ``post_norm_block``
(``nn.TransformerEncoderLayer``'s default) or ``pre_norm_block`` (timm, torchvision, Hugging Face,
``norm_first=True``). Each runs five fused launches per half-block at most:

    pre-norm:  y = LN1(x); qkv = y·Wqkvᵀ + b; a = attention(qkv); x = a·Woᵀ + b + x       (residual in epilogue)
               y = LN2(x); x = fc2(act(fc1(y) + b1)) + b2 + x                               (act and residual in epilogues)
    post-norm: x = LN1(a·Woᵀ + b + x), then x = LN2(fc2(act(fc1(x))) + x)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops.attention import attention
from ..ops.layer_norm import layer_norm
from ..ops.linear import linear, mlp
from ._fused import Unfusable


@dataclass
class BlockWeights:
    num_heads: int
    qkv_weight: Tensor | tuple[Tensor, Tensor, Tensor]  # [3D, D] q | k | v rows (in_proj), or q, k, v apart
    qkv_bias: Tensor | tuple[Tensor, Tensor, Tensor] | None
    proj_weight: Tensor  # [D, D]
    proj_bias: Tensor | None
    norm1: tuple[Tensor | None, Tensor | None, float]  # weight, bias, eps
    norm2: tuple[Tensor | None, Tensor | None, float]
    fc1_weight: Tensor
    fc1_bias: Tensor | None
    fc2_weight: Tensor
    fc2_bias: Tensor | None
    activation: str | None  # "gelu", "gelu_tanh", "quick_gelu" or "relu"; None (an activation the kernels lack) is refused
    scale: float | None = None  # attention scale; 1/sqrt(head_dim) when None
    proj_scale: Tensor | None = None  # [D] per-channel scale of the attention branch (timm's LayerScale ls1)
    fc2_scale: Tensor | None = None  # [D] per-channel scale of the MLP branch (ls2)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def drops(*sites: tuple[nn.Module, float]) -> bool:
    """Whether any dropout site drops now. A site is (the module whose training flag decides, p): each
    decides by its own flag, as in PyTorch and timm, so a model in eval() with its dropout modules
    switched back to train() (Monte Carlo dropout) drops there too."""
    return any(m.training and p > 0 for m, p in sites)


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


def _shape_reason(name: str, t: Tensor | None, shape: tuple[int, ...], x: Tensor, same_dtype: bool) -> str | None:
    if t is None:
        return None
    if t.shape != shape:
        return f"{name} has shape {tuple(t.shape)}, expected {shape}"
    if t.device != x.device:
        return f"{name} is on {t.device} but the input is on {x.device}"
    if t.dtype != x.dtype if same_dtype else not t.is_floating_point():
        return f"{name} is {t.dtype}; the input is {x.dtype}"
    return None


def _masks_reason(x: Tensor, heads: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None) -> str | None:
    B, N = x.shape[:2]
    broadcast = tuple((b, h, N, N) for b in (B, 1) for h in (heads, 1))
    for name, m, shapes in (("attention mask", attn_mask, ((N, N), (B * heads, N, N), *broadcast)),
                            ("key padding mask", key_padding_mask, ((B, N),))):
        if m is None:
            continue
        if m.dtype != torch.bool and m.dtype not in _KERNEL_DTYPES:
            return f"the {name} is {m.dtype}"
        if tuple(m.shape) not in shapes or m.device != x.device:
            return f"the {name} of shape {tuple(m.shape)} on {m.device} does not fit the input"
    return None


def block_input_reason(x: object, w: BlockWeights, key_padding_mask: Tensor | None = None,
                       attn_mask: Tensor | None = None) -> str | None:
    """Why ``x``, ``w`` and the masks cannot run as one fused block, or None."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        return f"the input is not a [batch, tokens, width] tensor (shape {tuple(getattr(x, 'shape', ()))})"
    if x.dtype not in _KERNEL_DTYPES:
        return f"{x.dtype} input"
    if w.activation is None:
        return "the MLP's activation is not one the kernels fuse"
    width, inner, hidden = x.shape[-1], w.proj_weight.shape[-1], w.fc1_weight.shape[0]
    if w.proj_weight.dim() != 2 or w.fc1_weight.dim() != 2:
        return "proj or fc1 weight is not 2-D"
    if w.num_heads < 1 or inner % w.num_heads:
        return f"attention width {inner} does not split into {w.num_heads} heads"
    expected = (
        ("qkv weight", w.qkv_weight, (3 * inner, width), True), ("qkv bias", w.qkv_bias, (3 * inner,), True),
        ("proj weight", w.proj_weight, (width, inner), True), ("proj bias", w.proj_bias, (width,), True),
        ("fc1 weight", w.fc1_weight, (hidden, width), True), ("fc1 bias", w.fc1_bias, (hidden,), True),
        ("fc2 weight", w.fc2_weight, (width, hidden), True), ("fc2 bias", w.fc2_bias, (width,), True),
        ("norm1 weight", w.norm1[0], (width,), False), ("norm1 bias", w.norm1[1], (width,), False),
        ("norm2 weight", w.norm2[0], (width,), False), ("norm2 bias", w.norm2[1], (width,), False),
        ("proj scale", w.proj_scale, (width,), False), ("fc2 scale", w.fc2_scale, (width,), False),
    )
    if isinstance(w.qkv_weight, tuple):  # q, k and v apart, each [inner, width]
        expected = tuple((f"{n} weight", t, (inner, width), True) for n, t in zip("qkv", w.qkv_weight)) + tuple(
            (f"{n} bias", t, (inner,), True) for n, t in zip("qkv", w.qkv_bias or (None,) * 3)) + expected[2:]
    for name, t, shape, same_dtype in expected:
        reason = _shape_reason(name, t, shape, x, same_dtype)
        if reason is not None:
            return reason
    if not all(eps >= 0 for eps in (w.norm1[2], w.norm2[2])):
        return "a LayerNorm has a negative eps"
    return _masks_reason(x, w.num_heads, key_padding_mask, attn_mask)


def _check(x: Tensor, w: BlockWeights, key_padding_mask: Tensor | None, attn_mask: Tensor | None) -> None:
    """Before the first launch, so a block runs whole on the kernels or not at all: never an error
    after some of its kernels have run. The stand-ins run the original forward on ``Unfusable``."""
    reason = block_input_reason(x, w, key_padding_mask, attn_mask)
    if reason is not None:
        raise Unfusable(reason)


def _packed(t: Tensor | tuple[Tensor, ...] | None) -> Tensor | None:
    return torch.cat(t) if isinstance(t, tuple) else t


def _attend(y: Tensor, w: BlockWeights, key_padding_mask, attn_mask, is_causal: bool,
            batch_first: bool = True) -> Tensor:
    """Attention of the tokens ``y`` ([B, N, D], or [N, B, D] when not ``batch_first``): [B, N, D]."""
    qkv = linear(y, _packed(w.qkv_weight), _packed(w.qkv_bias))
    return attention(qkv if batch_first else qkv.transpose(0, 1), w.num_heads, key_padding_mask=key_padding_mask,
                     attn_mask=attn_mask, scale=w.scale, is_causal=is_causal)


def pre_norm_block(x: Tensor, w: BlockWeights, key_padding_mask=None, attn_mask=None,
                   is_causal: bool = False, batch_first: bool = True) -> Tensor:
    """x + attn(LN1(x)), then + mlp(LN2(·)); x is [B, N, D], or sequence-first [N, B, D] when not
    ``batch_first`` (OpenAI CLIP's layout), and the result keeps x's layout."""
    _check(x if batch_first else x.transpose(0, 1), w, key_padding_mask, attn_mask)
    a = _attend(layer_norm(x, *w.norm1), w, key_padding_mask, attn_mask, is_causal, batch_first)
    # Sequence-first: the out-projection reads the attention output back in x's layout.
    x = linear(a if batch_first else a.transpose(0, 1), w.proj_weight, w.proj_bias, residual=x, scale=w.proj_scale)
    return mlp(layer_norm(x, *w.norm2), w.fc1_weight, w.fc1_bias, w.fc2_weight, w.fc2_bias,
               activation=w.activation, residual=x, scale=w.fc2_scale)


def post_norm_block(x: Tensor, w: BlockWeights, key_padding_mask=None, attn_mask=None,
                    is_causal: bool = False) -> Tensor:
    """LN1(x + attn(x)), then LN2(· + mlp(·)); x is [B, N, D] (batch first)."""
    _check(x, w, key_padding_mask, attn_mask)
    a = _attend(x, w, key_padding_mask, attn_mask, is_causal)
    x = layer_norm(linear(a, w.proj_weight, w.proj_bias, residual=x), *w.norm1)
    return layer_norm(mlp(x, w.fc1_weight, w.fc1_bias, w.fc2_weight, w.fc2_bias,
                          activation=w.activation, residual=x), *w.norm2)
