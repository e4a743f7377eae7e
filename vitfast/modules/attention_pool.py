"""Attention pooling with learned queries (the "MAP" head of SigLIP, Perception Encoder and others).

A few learned queries attend over all tokens, then an out-projection and a residual MLP:

    q = latent·Wqᵀ + bq                  [1, L, D]   (once per call, not per image: the latent is shared)
    k | v = x·Wkvᵀ + bkv                 [B, N, 2D]  (one GEMM; attention reads k and v through strides)
    o = attention(q, k, v)               [B, L, D]   (short-query attention kernel; q broadcast, stride 0)
    y = o·Woᵀ + bo;  y = y + mlp(LN(y))  (GEMM epilogues: bias, activation, residual)

then the pooling the head asks for (the first query's row, the mean over queries, or all of them).
timm's ``AttentionPoolLatent`` and Hugging Face's ``SiglipMultiheadAttentionPoolingHead`` are both
described as ``PoolWeights`` and run by ``attention_pool``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.attention import attention_qkv
from ..ops.layer_norm import layer_norm
from ..ops.linear import linear
from ._block import Norm, mlp_branch
from ._block_checks import KERNEL_DTYPES, dtype_fits
from ._drops import NONE, Drops
from ._fused import Unfusable


@dataclass
class PoolWeights:
    num_heads: int
    latent: Tensor  # [1, L, latent width] learned queries, before the q projection
    q_weight: Tensor | None  # [D, latent width]; None: the latent is the query itself
    q_bias: Tensor | None
    kv_weight: Tensor  # [2D, D]: k rows, then v rows
    kv_bias: Tensor | None
    proj_weight: Tensor | None  # [D_out, D]; None: no out-projection, no MLP
    proj_bias: Tensor | None
    norm: Norm | None  # LayerNorm before the MLP
    fc1_weight: Tensor | None  # None: no MLP
    fc1_bias: Tensor | None
    fc2_weight: Tensor | None
    fc2_bias: Tensor | None
    activation: str | None
    mlp_norm: Norm | None = None
    fc2_scale: Tensor | None = None
    pool: str = "token"  # "token": the first query's row; "avg": the mean over queries; else all rows
    scale: float | None = None  # attention scale; 1/sqrt(head_dim) when None


def pool_input_reason(x: object, w: PoolWeights, key_padding_mask: Tensor | None = None) -> str | None:
    """Why ``x`` cannot run through the fused head: it runs whole on the kernels or not at all."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        return f"the input is not a [batch, tokens, width] tensor (shape {tuple(getattr(x, 'shape', ()))})"
    if x.dtype not in KERNEL_DTYPES or x.shape[-1] != w.kv_weight.shape[-1] or x.shape[1] == 0:
        return f"a {x.dtype} input of shape {tuple(x.shape)} does not fit the key/value projection"
    if w.fc1_weight is not None and w.activation is None:
        return "the MLP's activation is not one the kernels fuse"
    tensors = (w.latent, w.q_weight, w.q_bias, w.kv_weight, w.kv_bias, w.proj_weight, w.proj_bias, w.fc1_weight,
               w.fc1_bias, w.fc2_weight, w.fc2_bias)
    if any(t is not None and (not dtype_fits(t, x) or t.device != x.device) for t in tensors):
        return f"the head's weights are not all {x.dtype} on {x.device}"
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or key_padding_mask.device != x.device
                                         or tuple(key_padding_mask.shape) != tuple(x.shape[:2])):
        return "the padding mask is not a bool [batch, tokens] tensor on the input's device"
    return None


def attention_pool(x: Tensor, w: PoolWeights, key_padding_mask: Tensor | None = None, drops: Drops = NONE) -> Tensor:
    """The head over tokens ``x`` [B, N, D]: [B, D_out] pooled, or [B, L, D_out] for no pooling.
    ``key_padding_mask`` [B, N], bool, True = a padding token no query attends to. ``drops``: dropout
    in training on the attention probabilities (attn), the out-projection's output (proj) and the
    MLP's (hidden, mlp)."""
    reason = pool_input_reason(x, w, key_padding_mask)
    if reason is not None:
        raise Unfusable(reason)
    B, N, D = x.shape
    H = w.num_heads
    q = w.latent if w.q_weight is None else linear(w.latent, w.q_weight, w.q_bias)
    L = q.shape[1]
    q = q.view(1, L, H, D // H).transpose(1, 2).expand(B, H, L, D // H)  # the same queries for every image
    k, v = linear(x, w.kv_weight, w.kv_bias).unflatten(-1, (2, H, D // H)).permute(2, 0, 3, 1, 4).unbind(0)
    y = attention_qkv(q, k, v, key_padding_mask=key_padding_mask, scale=w.scale, dropout_p=drops.attn)
    y = y.transpose(1, 2).reshape(B, L, D)
    if w.proj_weight is not None:
        y = linear(y, w.proj_weight, w.proj_bias, dropout_p=drops.proj)
    if w.fc1_weight is not None:
        y = mlp_branch(y if w.norm is None else layer_norm(y, *w.norm), w, y, drops)
    if w.pool == "token":
        return y[:, 0]
    return y.mean(1) if w.pool == "avg" else y
