"""timm's EVA family (``timm.models.eva``): EVA02, the RoPE ViTs, Perception Encoder's ViTs.

``EvaBlock`` with ``EvaAttention`` or ``AttentionRope`` runs as one fused pre-norm block: the rotary
embedding the model passes to each block is applied to q and k inside the attention kernel (prefix
tokens unrotated, interleaved or half layout), SwiGLU's gate product in fc1's epilogue, the optional
scale-norm and sub-LN on the LayerNorm kernel, ``gamma_1``/``gamma_2`` in the GEMM epilogues.
``EvaBlockPostNorm`` stays on timm (the report lists it).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..modules._block import BlockWeights, linear_params, norm_params, param, pre_norm_block
from ..modules._fused import Fused
from .pytorch import is_layer_norm
from .rules import Rule, head_dim_reason, is_exactly
from .timm import (_DROPOUT, _LINEAR, _NORMS, DROP_PATH, _identity_or, attention_norm_reason, block_drops,
                   mlp_reason, mlp_weights, norm_or_none)

EVA_BLOCK = ("timm.models.eva", "EvaBlock")
EVA_ATTENTION = ("timm.models.eva", "EvaAttention")
ATTENTION_ROPE = ("timm.layers.attention", "AttentionRope")
_SEPARATE = ("q_proj", "k_proj", "v_proj")


def _attention_reason(attn: nn.Module) -> str | None:
    if not is_exactly(attn, EVA_ATTENTION, ATTENTION_ROPE):
        return f"attn is a {type(attn).__name__}, not timm's EvaAttention or AttentionRope"
    layers = ("qkv", "proj") if attn.qkv is not None else (*_SEPARATE, "proj")
    if not all(is_exactly(getattr(attn, n, None), _LINEAR) for n in layers):
        return f"attn.{'/'.join(layers)} are not nn.Linear"
    if getattr(attn, "num_kv_heads", attn.num_heads) != attn.num_heads:
        return "grouped-query attention is not fused"
    inner = attn.num_heads * attn.head_dim
    outs = (attn.qkv.out_features,) if attn.qkv is not None else tuple(getattr(attn, n).out_features for n in _SEPARATE)
    if attn.proj.in_features != inner or outs not in ((3 * inner,), (inner,) * 3):
        return "attention width differs from the q, k, v widths"
    biases = [getattr(attn, n, None) for n in ("q_bias", "k_bias", "v_bias")]
    if any(b is not None and tuple(b.shape) != (inner,) for b in biases):
        return "q_bias/k_bias/v_bias do not match the attention width"
    if not all(is_exactly(m, _DROPOUT) for m in (attn.attn_drop, attn.proj_drop)):
        return "a dropout is not nn.Dropout"
    return attention_norm_reason(attn) or head_dim_reason(inner, attn.num_heads)


def eva_block_reason(block: nn.Module) -> str | None:
    """Why an ``EvaBlock`` cannot run fused (every submodule its forward reads is checked by exact class)."""
    reason = _attention_reason(getattr(block, "attn", None)) or mlp_reason(getattr(block, "mlp", None))
    if reason is not None:
        return reason
    if not all(_identity_or(getattr(block, n, None), DROP_PATH) for n in ("drop_path1", "drop_path2")):
        return "drop_path1/drop_path2 are not timm's DropPath"
    if not (is_layer_norm(block.norm1, *_NORMS) and is_layer_norm(block.norm2, *_NORMS)):
        return "norm1/norm2 are not a LayerNorm over the last dimension"
    return None


def _qkv(attn: nn.Module) -> tuple:
    """(weight, bias) of the q, k, v projections: packed, or q, k and v apart (a missing bias is zeros)."""
    m = attn._modules
    if m.get("qkv") is None:
        weights, biases = zip(*(linear_params(m[n]) for n in _SEPARATE))
        return weights, None if all(b is None for b in biases) else biases
    weight, bias = linear_params(m["qkv"])
    q_bias = attn._parameters.get("q_bias")
    if q_bias is not None:  # EvaAttention: learned q and v biases around a zero k-bias buffer
        bias = torch.cat((q_bias, attn._buffers["k_bias"], attn._parameters["v_bias"]))
    return weight, bias


class FusedTimmEvaBlock(Fused):
    """timm ``EvaBlock`` as one fused pre-norm block, its rotary embedding inside the attention kernel."""

    def _vitfast_unsupported(self) -> str | None:
        return eva_block_reason(self)

    def _vitfast_declines(self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None,
                          is_causal: bool = False) -> bool:
        # timm's attn_mask follows SDPA's convention; its own code runs it.
        return attn_mask is not None

    def _weights(self) -> BlockWeights:
        m = self._modules
        attn = m["attn"]
        a = attn._modules
        qkv_w, qkv_b = _qkv(attn)
        proj_w, proj_b = linear_params(a["proj"])
        return BlockWeights(
            num_heads=attn.num_heads, qkv_weight=qkv_w, qkv_bias=qkv_b, proj_weight=proj_w, proj_bias=proj_b,
            norm1=norm_params(m["norm1"]), norm2=norm_params(m["norm2"]),
            scale=None if attn.fused_attn else attn.scale,  # SDPA scales by 1/sqrt(head_dim)
            proj_scale=param(self, "gamma_1"), fc2_scale=param(self, "gamma_2"),
            attn_norm=norm_or_none(a["norm"]), **mlp_weights(m["mlp"]),
        )

    def _fused_forward(self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None,
                       is_causal: bool = False) -> Tensor:
        m = self._modules
        attn = m["attn"]
        return pre_norm_block(x, self._weights(), is_causal=bool(is_causal), rope=rope,
                              rope_prefix=attn.num_prefix_tokens, rope_half=bool(getattr(attn, "rotate_half", False)),
                              drops=block_drops(attn, m["mlp"], m["drop_path1"], m["drop_path2"]))


RULES = [Rule((EVA_BLOCK,), eva_block_reason, FusedTimmEvaBlock)]
