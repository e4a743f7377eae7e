"""open_clip: the ``VisionTransformer``'s ``conv1``, ``ResidualAttentionBlock``, ``LayerNorm`` and
``LayerNormFp32``, matched by exact class (open_clip is never imported here).

``CustomResidualAttentionBlock`` (qk-norm, scaled cosine attention, head scales) and the
``AttentionalPooler`` (cross-attention) stay on open_clip's code.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..modules._block import BlockWeights, packed_block_weights, param, pre_norm_block
from ..modules._drops import Drops, live
from ..modules._fused import Fused, Unfusable, original_class
from ..modules.layer_norm import FusedLayerNorm
from ..modules.mlp import activation_name
from ..modules.patch_embed import PatchConv2d, patch_conv_reason
from .pytorch import is_layer_norm, layer_norm_reason
from .rules import Rule, head_dim_reason, is_exactly, location
from .timm import _gamma

_OPEN_CLIP = "open_clip.transformer"
VISION_TRANSFORMER = (_OPEN_CLIP, "VisionTransformer")
BLOCK = (_OPEN_CLIP, "ResidualAttentionBlock")
LAYER_NORM = (_OPEN_CLIP, "LayerNorm")  # nn.LayerNorm, cast back to the input's dtype
LAYER_NORM_FP32 = (_OPEN_CLIP, "LayerNormFp32")  # nn.LayerNorm computed in fp32, cast back
LAYER_SCALE = (_OPEN_CLIP, "LayerScale")
_NORMS = (location(nn.LayerNorm), LAYER_NORM, LAYER_NORM_FP32)
_LINEAR, _IDENTITY, _SEQUENTIAL = location(nn.Linear), location(nn.Identity), location(nn.Sequential)
_OUT_PROJ = (_LINEAR, location(nn.modules.linear.NonDynamicallyQuantizableLinear))
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fp32_norm_reason(norm: nn.Module, x: Tensor) -> str | None:
    """Why the LayerNorm kernel (fp32 statistics and affine, one rounding to x's dtype) does not compute
    exactly what ``norm`` computes on ``x``, or None. For open_clip's ``LayerNormFp32`` (``x`` cast to
    fp32, normalised, cast back) it does when x is no wider than fp32 and the parameters are fp32
    (with others PyTorch raises); for any other LayerNorm it always does."""
    if location(original_class(norm)) != LAYER_NORM_FP32:
        return None
    if x.dtype not in _KERNEL_DTYPES:
        return f"LayerNormFp32 rounds {x.dtype} input to float32"
    for name, p in (("weight", param(norm, "weight")), ("bias", param(norm, "bias"))):
        if p is not None and p.dtype != torch.float32:
            return f"LayerNormFp32's {name} is {p.dtype}, not float32"
    return None


class FusedOpenClipLayerNorm(FusedLayerNorm):
    """open_clip's ``LayerNorm``: the result cast back to the input's dtype, as open_clip casts it (under
    CUDA autocast, whose ``layer_norm`` computes in fp32, a half-precision stream stays half)."""

    def _fused_forward(self, input: Tensor, residual: Tensor | None = None):
        out = super()._fused_forward(input, residual)
        return out.to(input.dtype) if residual is None else (out[0].to(out[1].dtype), out[1])


class FusedLayerNormFp32(FusedOpenClipLayerNorm):
    """open_clip's ``LayerNormFp32`` on the LayerNorm kernel, which computes in fp32 and rounds once,
    as it does; other inputs or parameters run its own forward."""

    def _fused_forward(self, input: Tensor, residual: Tensor | None = None):
        reason = fp32_norm_reason(self, input)
        if reason is not None:
            raise Unfusable(reason)
        return super()._fused_forward(input, residual)


def block_reason(block: nn.Module) -> str | None:
    """Why an open_clip ``ResidualAttentionBlock`` cannot run fused: every submodule its forward reads
    must be the exact class open_clip puts there."""
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    if type(attn) is not nn.MultiheadAttention or not is_exactly(attn.out_proj, *_OUT_PROJ):
        return f"attn is a {type(attn).__name__}, not nn.MultiheadAttention"
    if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        return "attn has separate kdim/vdim projections, add_bias_kv or add_zero_attn"
    if hasattr(block, "ln_1_kv"):
        return "a cross-attention block (ln_1_kv) is not fused"
    if not (is_layer_norm(block.ln_1, *_NORMS) and is_layer_norm(block.ln_2, *_NORMS)):
        return "ln_1/ln_2 are not a LayerNorm over the last dimension"
    if not all(is_exactly(getattr(block, n, None), _IDENTITY, LAYER_SCALE) for n in ("ls_1", "ls_2")):
        return "ls_1/ls_2 are not open_clip's LayerScale"
    if not (is_exactly(mlp, _SEQUENTIAL) and tuple(mlp._modules) == ("c_fc", "gelu", "c_proj")
            and is_exactly(mlp.c_fc, _LINEAR) and is_exactly(mlp.c_proj, _LINEAR)):
        return "mlp is not Sequential(c_fc Linear, activation, c_proj Linear)"
    if activation_name(mlp.gelu) is None:
        return f"mlp activation {type(mlp.gelu).__name__} is not fused"
    return head_dim_reason(attn.embed_dim, attn.num_heads)


class FusedOpenClipBlock(Fused):
    """open_clip ``ResidualAttentionBlock`` (pre-norm) as one fused block, batch-first or, as OpenAI
    CLIP's ``Transformer`` runs it, sequence-first; LayerScale is applied in the GEMM epilogues, and
    ``attn_mask`` ([N, N] or [B·heads, N, N]) cast to the input's dtype and added, as open_clip does."""

    def _vitfast_unsupported(self) -> str | None:
        return block_reason(self)

    def _vitfast_declines(self, q_x: Tensor, k_x: Tensor | None = None, v_x: Tensor | None = None,
                          attn_mask: Tensor | None = None) -> bool:
        # k_x and v_x are ignored by a block without ln_1_kv, as open_clip's forward does.
        return not isinstance(q_x, Tensor) or q_x.is_nested

    def _weights(self) -> BlockWeights:
        m = self._modules
        mlp = m["mlp"]._modules
        return packed_block_weights(m["attn"], mlp["c_fc"], mlp["c_proj"], m["ln_1"], m["ln_2"],
                                    activation_name(mlp["gelu"]), _gamma(m["ls_1"]), _gamma(m["ls_2"]))

    def _fused_forward(self, q_x: Tensor, k_x: Tensor | None = None, v_x: Tensor | None = None,
                       attn_mask: Tensor | None = None) -> Tensor:
        m = self._modules
        w = self._weights()
        reason = fp32_norm_reason(m["ln_1"], q_x) or fp32_norm_reason(m["ln_2"], q_x)
        for gamma in (w.proj_scale, w.fc2_scale):
            if reason is None and gamma is not None and gamma.dtype != q_x.dtype:
                reason = f"LayerScale's {gamma.dtype} gamma would promote the {q_x.dtype} tokens"
        if reason is None and attn_mask is not None and attn_mask.dim() not in (2, 3):
            reason = f"attn_mask of shape {tuple(attn_mask.shape)} is not 2-D or 3-D"
        if reason is not None:
            raise Unfusable(reason)
        if attn_mask is not None:
            attn_mask = attn_mask.to(q_x.dtype)  # as ResidualAttentionBlock.attention does: then a float mask
        attn = m["attn"]  # its dropout on the attention probabilities is the block's only one
        return pre_norm_block(q_x, w, attn_mask=attn_mask, batch_first=attn.batch_first,
                              drops=Drops(attn=live(attn, attn.dropout)))


RULES = [
    # VisionTransformer._embeds reshapes and permutes conv1's output to tokens, which PatchConv2d's view allows.
    Rule((location(nn.Conv2d),), patch_conv_reason, PatchConv2d, parent=(VISION_TRANSFORMER, "conv1")),
    Rule((BLOCK,), block_reason, FusedOpenClipBlock),
    Rule((LAYER_NORM,), layer_norm_reason, FusedOpenClipLayerNorm),
    Rule((LAYER_NORM_FP32,), layer_norm_reason, FusedLayerNormFp32),
]
