"""Conversion rules for PyTorch's own modules and the tutorial ViT of ``vitfast.reference``."""
from __future__ import annotations

from torch import nn

from .. import reference
from ..modules.encoder import FastTransformerEncoder, FastTransformerEncoderLayer, unsupported_reason
from ..modules._fused import original_class
from ..modules.layer_norm import FusedLayerNorm, LayerNorm
from ..modules.linear import Linear
from ..modules.multihead_attention import MultiheadAttention
from ..modules.multihead_attention import unsupported_reason as mha_unsupported_reason
from ..modules.patch_embed import PatchEmbedding
from ..modules.vit import FastVisionTransformer
from .rules import Location, Rule, head_dim_reason, location


def _encoder_layer_reason(layer: nn.TransformerEncoderLayer) -> str | None:
    return unsupported_reason(layer) or head_dim_reason(layer.self_attn.embed_dim, layer.self_attn.num_heads)


def _mha_reason(mha: nn.MultiheadAttention) -> str | None:
    return mha_unsupported_reason(mha) or head_dim_reason(mha.embed_dim, mha.num_heads)


# A stand-in's own per-call check doubles as the conversion check: it only reads attributes.
layer_norm_reason = FusedLayerNorm._vitfast_unsupported


def is_layer_norm(m: nn.Module, *classes: Location) -> bool:
    """Whether ``m`` is a LayerNorm over the last dimension of one of ``classes`` (nn.LayerNorm when
    none are named) or vitfast's stand-in for one."""
    return location(original_class(m)) in (classes or (location(nn.LayerNorm),)) and layer_norm_reason(m) is None


def head_rule(model: Location) -> Rule:
    """An ``nn.Linear`` classification head (a ViT's ``head``) on vitfast's GEMM, so that a settled call
    of the whole model replays it too (``modules/_replay.py``)."""
    return Rule((location(nn.Linear),), lambda m: None, Linear, parent=(model, "head"))


RULES = [
    Rule((location(reference.VisionTransformer),), FastVisionTransformer._vitfast_unsupported, FastVisionTransformer),
    Rule((location(reference.PatchEmbedding),), PatchEmbedding._vitfast_unsupported, PatchEmbedding),
    head_rule(location(reference.VisionTransformer)),
    Rule((location(nn.TransformerEncoder),), lambda m: None, FastTransformerEncoder),
    Rule((location(nn.TransformerEncoderLayer),), _encoder_layer_reason, FastTransformerEncoderLayer),
    Rule((location(nn.LayerNorm),), layer_norm_reason, LayerNorm),
    # Wherever it sits, but not inside a block vitfast runs fused: that block's checks read its class.
    Rule((location(nn.MultiheadAttention),), _mha_reason, MultiheadAttention, inside_fused=False),
]
