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
from torch import Tensor

from ..ops.attention import attention
from ..ops.layer_norm import layer_norm
from ..ops.linear import linear, mlp


@dataclass
class BlockWeights:
    num_heads: int
    qkv_weight: Tensor  # [3D, D], q | k | v rows, as nn.MultiheadAttention's in_proj
    qkv_bias: Tensor | None
    proj_weight: Tensor  # [D, D]
    proj_bias: Tensor | None
    norm1: tuple[Tensor | None, Tensor | None, float]  # weight, bias, eps
    norm2: tuple[Tensor | None, Tensor | None, float]
    fc1_weight: Tensor
    fc1_bias: Tensor | None
    fc2_weight: Tensor
    fc2_bias: Tensor | None
    activation: str  # "gelu", "gelu_tanh" or "relu"
    scale: float | None = None  # attention scale; 1/sqrt(head_dim) when None


class DerivedWeights:
    """Weights computed from parameters (Hugging Face's q/k/v packed into one QKV, timm's LayerScale
    folded into proj and fc2), computed once and again only when a source is changed in place or
    replaced (``.to()``, ``load_state_dict``). When gradients are needed, or under ``torch.compile``,
    the computation runs every call so that autograd and the compiler see it."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._sources: list[Tensor] = []  # keeps the sources' storage alive, so no address is reused
        self._value: tuple = ()

    def get(self, sources: list[Tensor], compute) -> tuple:
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in sources)):
            return compute()
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
        if key != self._key:
            with torch.no_grad():
                self._value = compute()
            self._key, self._sources = key, [t.detach() for t in sources]
        return self._value


def layer_scaled(weight: Tensor, bias: Tensor | None, gamma: Tensor) -> tuple[Tensor, Tensor | None]:
    """gamma·(x·Wᵀ + b) = x·(diag(gamma)·W)ᵀ + gamma·b: LayerScale folded into the GEMM before it."""
    return weight * gamma[:, None].to(weight.dtype), None if bias is None else bias * gamma.to(bias.dtype)


def _attend(y: Tensor, w: BlockWeights, key_padding_mask, attn_mask, is_causal: bool) -> Tensor:
    qkv = linear(y, w.qkv_weight, w.qkv_bias)
    return attention(qkv, w.num_heads, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                     scale=w.scale, is_causal=is_causal)


def pre_norm_block(x: Tensor, w: BlockWeights, key_padding_mask=None, attn_mask=None,
                   is_causal: bool = False) -> Tensor:
    """x + attn(LN1(x)), then + mlp(LN2(·)); x is [B, N, D] (batch first)."""
    a = _attend(layer_norm(x, *w.norm1), w, key_padding_mask, attn_mask, is_causal)
    x = linear(a, w.proj_weight, w.proj_bias, residual=x)
    return mlp(layer_norm(x, *w.norm2), w.fc1_weight, w.fc1_bias, w.fc2_weight, w.fc2_bias,
               activation=w.activation, residual=x)


def post_norm_block(x: Tensor, w: BlockWeights, key_padding_mask=None, attn_mask=None,
                    is_causal: bool = False) -> Tensor:
    """LN1(x + attn(x)), then LN2(· + mlp(·)); x is [B, N, D] (batch first)."""
    a = _attend(x, w, key_padding_mask, attn_mask, is_causal)
    x = layer_norm(linear(a, w.proj_weight, w.proj_bias, residual=x), *w.norm1)
    return layer_norm(mlp(x, w.fc1_weight, w.fc1_bias, w.fc2_weight, w.fc2_bias,
                          activation=w.activation, residual=x), *w.norm2)
