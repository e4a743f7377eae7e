"""Hugging Face's SigLIP and SigLIP 2 attention-pooling heads (``<Siglip|Siglip2>MultiheadAttentionPoolingHead``):
a learned probe attends over all tokens through an ``nn.MultiheadAttention``, then a residual MLP. On
the kernels: the probe's q projection once per call, one k | v GEMM, the short-query attention kernel,
the out-projection, LayerNorm and the MLP's epilogues (``modules/attention_pool.py``)."""
from __future__ import annotations

import math

from torch import Tensor, nn

from ...modules._block import linear_params, norm_params, param
from ...modules._drops import Drops, live
from ...modules._fused import Fused, Unfusable
from ...modules.attention_pool import PoolWeights, attention_pool
from ...modules.mlp import activation_name
from ..pytorch import is_layer_norm
from ..rules import Rule, head_dim_reason, is_exactly, location
from .layers import models

_LINEAR, _MHA = location(nn.Linear), location(nn.MultiheadAttention)
HEADS = tuple((models(name), f"{prefix}MultiheadAttentionPoolingHead")
              for name, prefix in (("siglip", "Siglip"), ("siglip2", "Siglip2")))


def pooling_head_reason(head: nn.Module) -> str | None:
    attn, mlp = head.attention, head.mlp
    if not is_exactly(attn, _MHA):
        return f"attention is a {type(attn).__name__}, not nn.MultiheadAttention"
    if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn or not attn.batch_first:
        return "the attention has separate k/v widths, extra k/v biases, zero attention or is not batch-first"
    extra = set(mlp._modules) - {"fc1", "fc2", "activation_fn"}
    if not all(is_exactly(getattr(mlp, n, None), _LINEAR) for n in ("fc1", "fc2")) or extra:
        return "mlp is not fc1, activation, fc2"
    if activation_name(getattr(mlp, "activation_fn", None)) is None:
        return "the MLP's activation is not fused"
    if not is_layer_norm(head.layernorm):
        return "layernorm is not an nn.LayerNorm over the last dimension"
    if tuple(head.probe.shape[:1]) != (1,) or head.probe.dim() != 3:
        return "the probe is not one [1, queries, width] tensor"
    return head_dim_reason(attn.embed_dim, attn.num_heads)


def _padding(attention_mask: object, x: object) -> Tensor | None:
    """transformers' 2-D padding mask (1 = token, 0 = padding) as the kernel's key padding mask.
    For an image that is all padding transformers' answer depends on its release (up to 5.24 an additive
    finfo.min mask attends almost uniformly to every token; from 5.25 ``nn.MultiheadAttention``'s
    ``key_padding_mask`` gives NaN) and the kernel's would be zeros, so such a call runs transformers' code."""
    if attention_mask is None:
        return None
    if not (isinstance(attention_mask, Tensor) and isinstance(x, Tensor)
            and tuple(attention_mask.shape) == tuple(x.shape[:2])):
        raise Unfusable("an attention mask that is not a [batch, tokens] padding mask")
    padding = attention_mask == 0
    if padding.all(-1).any():
        raise Unfusable("an image whose every token is padding")
    return padding


class FusedHFAttentionPoolingHead(Fused):
    """SigLIP's (and SigLIP 2's) attention-pooling head on the kernels; the ``nn.MultiheadAttention``
    inside it is read, not called."""

    def _vitfast_unsupported(self) -> str | None:
        return pooling_head_reason(self)

    def _vitfast_declines(self, hidden_state: Tensor, attention_mask: Tensor | None = None) -> bool:
        # Up to transformers 5.24 SigLIP 2 builds the head's mask for its attention implementation, and
        # none at all when the implementation is unset (a head built outside a model); the kernel
        # reproduces sdpa's and eager's. (5.25 masks every implementation alike.)
        config = self.__dict__.get("config")
        return attention_mask is not None and getattr(config, "_attn_implementation", None) not in ("sdpa", "eager")

    def _weights(self) -> PoolWeights:
        m = self._modules
        attn, mlp = m["attention"], m["mlp"]
        w, b = param(attn, "in_proj_weight"), param(attn, "in_proj_bias")
        D = attn.embed_dim
        (proj_w, proj_b), (fc1_w, fc1_b), (fc2_w, fc2_b) = (linear_params(x) for x in (
            attn._modules["out_proj"], mlp._modules["fc1"], mlp._modules["fc2"]))
        return PoolWeights(
            num_heads=attn.num_heads, latent=param(self, "probe"), q_weight=w[:D], q_bias=None if b is None else b[:D],
            kv_weight=w[D:], kv_bias=None if b is None else b[D:], proj_weight=proj_w, proj_bias=proj_b,
            norm=norm_params(m["layernorm"]), fc1_weight=fc1_w, fc1_bias=fc1_b, fc2_weight=fc2_w, fc2_bias=fc2_b,
            activation=activation_name(mlp.activation_fn), pool="token", scale=1.0 / math.sqrt(D // attn.num_heads),
        )

    def _fused_forward(self, hidden_state: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        attn = self._modules["attention"]  # its dropout on the attention probabilities is the head's only one
        return attention_pool(hidden_state, self._weights(), key_padding_mask=_padding(attention_mask, hidden_state),
                              drops=Drops(attn=live(attn, attn.dropout)))


RULES = [Rule(HEADS, pooling_head_reason, FusedHFAttentionPoolingHead)]
