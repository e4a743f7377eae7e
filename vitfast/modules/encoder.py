"""``FastTransformerEncoderLayer`` and ``FastTransformerEncoder``: PyTorch's encoder on vitfast's ops."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import runtime
from ._block import BlockWeights, post_norm_block, pre_norm_block
from ._share import share_as
from .layer_norm import LayerNorm
from .mlp import activation_name


def _dropout_active(layer: nn.TransformerEncoderLayer) -> bool:
    ps = (layer.dropout.p, layer.dropout1.p, layer.dropout2.p, layer.self_attn.dropout)
    return layer.training and any(p > 0 for p in ps)


def unsupported_reason(layer: nn.TransformerEncoderLayer) -> str | None:
    """Why vitfast cannot run this layer's configuration, or None when it can."""
    if activation_name(layer.activation) is None:
        return f"activation {layer.activation!r} is not gelu or relu"
    if not layer.self_attn._qkv_same_embed_dim:
        return "self_attn has separate kdim/vdim projections"
    if layer.self_attn.bias_k is not None or layer.self_attn.add_zero_attn:
        return "self_attn uses add_bias_kv or add_zero_attn"
    if type(layer.norm1) not in (nn.LayerNorm, LayerNorm) or type(layer.norm2) not in (nn.LayerNorm, LayerNorm):
        return "norm1/norm2 are not nn.LayerNorm"
    return None


def _check_mask_dtype(name: str, mask: Tensor | None) -> None:
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")


class FastTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` whose forward runs on vitfast's fused ops.

    Same constructor, parameters and ``state_dict``; PyTorch's meaning for ``norm_first``,
    ``batch_first``, ``activation`` (gelu/relu as strings or functions), ``layer_norm_eps``,
    ``bias``, ``src_key_padding_mask``, ``src_mask`` (bool: True = masked; float: added) and
    ``is_causal`` (a hint that ``src_mask`` is causal, as in PyTorch). In training with dropout
    p > 0 it runs PyTorch's own forward (exact dropout semantics) until a fused dropout exists.
    A query row whose keys are all masked yields zeros where PyTorch yields NaN.

    >>> layer = FastTransformerEncoderLayer(d_model=768, nhead=12, batch_first=True)
    >>> fast = FastTransformerEncoderLayer.from_torch(torch_layer)  # shares torch_layer's weights
    """

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer) -> "FastTransformerEncoderLayer":
        """A fast layer sharing ``layer``'s parameters (no copy); its norms become vitfast LayerNorms."""
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise TypeError(f"layer must be an nn.TransformerEncoderLayer, got {type(layer).__name__}")
        new = share_as(layer, cls)
        for name in ("norm1", "norm2"):
            norm = getattr(new, name)
            if type(norm) is nn.LayerNorm:
                setattr(new, name, LayerNorm.from_torch(norm))
        return new

    def _weights(self) -> BlockWeights:
        attn = self.self_attn
        return BlockWeights(
            num_heads=attn.num_heads,
            qkv_weight=attn.in_proj_weight, qkv_bias=attn.in_proj_bias,
            proj_weight=attn.out_proj.weight, proj_bias=attn.out_proj.bias,
            norm1=(self.norm1.weight, self.norm1.bias, self.norm1.eps),
            norm2=(self.norm2.weight, self.norm2.bias, self.norm2.eps),
            fc1_weight=self.linear1.weight, fc1_bias=self.linear1.bias,
            fc2_weight=self.linear2.weight, fc2_bias=self.linear2.bias,
            activation=activation_name(self.activation),
        )

    def forward(self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        reason = unsupported_reason(self)
        if reason is not None:
            runtime.warn_once(f"encoder-layer:{reason}", f"FastTransformerEncoderLayer: {reason}; using PyTorch")
        if reason is not None or _dropout_active(self) or src.is_nested:
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        _check_mask_dtype("src_mask", src_mask)
        _check_mask_dtype("src_key_padding_mask", src_key_padding_mask)
        if is_causal and src_mask is None:
            raise RuntimeError("is_causal=True is a hint that src_mask is the causal mask; pass src_mask too")

        unbatched = src.dim() == 2
        if src.dim() not in (2, 3):
            raise ValueError(f"src must be 2-D (unbatched) or 3-D, got shape {tuple(src.shape)}")
        x = src.unsqueeze(0) if unbatched else (src if self.self_attn.batch_first else src.transpose(0, 1))
        kpm = src_key_padding_mask
        if kpm is not None and unbatched:
            kpm = kpm.unsqueeze(0)
        block = pre_norm_block if self.norm_first else post_norm_block
        # is_causal only certifies src_mask; the mask itself is applied, so the hint changes nothing.
        out = block(x.contiguous(), self._weights(), key_padding_mask=kpm, attn_mask=src_mask)
        if unbatched:
            return out.squeeze(0)
        return out if self.self_attn.batch_first else out.transpose(0, 1).contiguous()


def _pytorch_pads_with_zeros(encoder: nn.TransformerEncoder, src: Tensor, mask, kpm) -> bool:
    """Whether nn.TransformerEncoder would take its nested-tensor path here, which returns zeros at
    padded positions (before the final norm); vitfast reproduces that so outputs match everywhere."""
    if kpm is None or mask is not None or src.dim() != 3 or encoder.training:
        return False
    if not getattr(encoder, "use_nested_tensor", False) or not torch.backends.mha.get_fastpath_enabled():
        return False
    if torch.is_autocast_enabled() or (torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())):
        return False
    if src.requires_grad and torch.is_grad_enabled():
        return False
    keep = kpm.logical_not() if kpm.dtype == torch.bool else kpm == 0
    batch_first = encoder.layers[0].self_attn.batch_first
    return not getattr(encoder, "mask_check", True) or bool(
        torch._nested_tensor_from_mask_left_aligned(src if batch_first else src.transpose(0, 1), keep))


class FastTransformerEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` whose layers are ``FastTransformerEncoderLayer``s (final ``norm`` included).

    Same constructor and ``state_dict``; layers given as ``nn.TransformerEncoderLayer`` are converted
    in place, sharing their weights.

    >>> enc = FastTransformerEncoder(nn.TransformerEncoderLayer(768, 12, batch_first=True), num_layers=12)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._to_fast()

    @classmethod
    def from_torch(cls, encoder: nn.TransformerEncoder) -> "FastTransformerEncoder":
        """A fast encoder sharing ``encoder``'s parameters (no copy)."""
        if not isinstance(encoder, nn.TransformerEncoder):
            raise TypeError(f"encoder must be an nn.TransformerEncoder, got {type(encoder).__name__}")
        new = share_as(encoder, cls)
        new.layers = nn.ModuleList(list(encoder.layers))
        new._to_fast()
        return new

    def _to_fast(self) -> None:
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, FastTransformerEncoderLayer):
                self.layers[i] = FastTransformerEncoderLayer.from_torch(layer)
        if type(self.norm) is nn.LayerNorm:
            self.norm = LayerNorm.from_torch(self.norm)

    def forward(self, src: Tensor, mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool | None = None) -> Tensor:
        _check_mask_dtype("mask", mask)
        _check_mask_dtype("src_key_padding_mask", src_key_padding_mask)
        batch_first = self.layers[0].self_attn.batch_first
        seq_len = src.shape[1 if batch_first else 0] if src.dim() == 3 else src.shape[0]
        from torch.nn.modules.transformer import _detect_is_causal_mask

        is_causal = _detect_is_causal_mask(mask, is_causal, seq_len)
        zero_padded = _pytorch_pads_with_zeros(self, src, mask, src_key_padding_mask)
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        if zero_padded:
            pad = src_key_padding_mask if src_key_padding_mask.dtype == torch.bool else src_key_padding_mask != 0
            pad = pad if batch_first else pad.transpose(0, 1)
            out = out.masked_fill(pad.unsqueeze(-1), 0.0)
        if self.norm is not None:
            out = self.norm(out)
        return out
