"""``FastTransformerEncoderLayer`` and ``FastTransformerEncoder``: PyTorch's encoder on vitfast's ops."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._block import BlockWeights, packed_block_weights, post_norm_block, pre_norm_block
from ._drops import NONE, Drops, live
from ._fused import Fused, Unfusable, original_class
from ._share import share_as
from .layer_norm import LayerNorm
from .mlp import activation_name

_OUT_PROJ = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def layer_drops(layer: nn.TransformerEncoderLayer) -> Drops:
    """The dropout in effect: on the attention probabilities (``self_attn.dropout``, by the attention's
    training flag), the attention output (``dropout1``), the MLP's hidden activations (``dropout``) and
    its output (``dropout2``), each by its own module's flag."""
    m = layer._modules
    attn = m["self_attn"]
    return Drops(attn=live(attn, attn.dropout), proj=live(m["dropout1"], m["dropout1"].p),
                 hidden=live(m["dropout"], m["dropout"].p), mlp=live(m["dropout2"], m["dropout2"].p))


def unsupported_reason(layer: nn.TransformerEncoderLayer) -> str | None:
    """Why vitfast cannot run this layer's configuration, or None when it can. Every submodule the
    fused path reads must be of the exact class PyTorch put there: a subclass or a wrapper (LoRA,
    quantisation) may compute something else."""
    attn = layer.self_attn
    if type(attn) is not nn.MultiheadAttention or type(attn.out_proj) not in _OUT_PROJ:
        return f"self_attn is a {type(attn).__name__}, not nn.MultiheadAttention"
    for name in ("linear1", "linear2"):
        if type(getattr(layer, name)) is not nn.Linear:
            return f"{name} is a {type(getattr(layer, name)).__name__}, not nn.Linear"
    for name in ("dropout", "dropout1", "dropout2"):
        if type(getattr(layer, name)) is not nn.Dropout:
            return f"{name} is a {type(getattr(layer, name)).__name__}, not nn.Dropout"
    if activation_name(layer.activation) is None:
        return f"activation {layer.activation!r} is not gelu or relu"
    if not attn._qkv_same_embed_dim:
        return "self_attn has separate kdim/vdim projections"
    if attn.bias_k is not None or attn.add_zero_attn:
        return "self_attn uses add_bias_kv or add_zero_attn"
    if not (original_class(layer.norm1) is nn.LayerNorm and original_class(layer.norm2) is nn.LayerNorm):
        return "norm1/norm2 are not nn.LayerNorm"
    if not (layer.norm1.eps >= 0 and layer.norm2.eps >= 0):
        return "a LayerNorm has a negative eps"
    return None


def _check_mask_dtype(name: str, mask: Tensor | None) -> None:
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")


class FastTransformerEncoderLayer(Fused, nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` whose forward runs on vitfast's fused ops.

    Same constructor, parameters and ``state_dict``; PyTorch's meaning for ``norm_first``,
    ``batch_first``, ``activation`` (gelu/relu as strings or functions), ``layer_norm_eps``,
    ``bias``, ``src_key_padding_mask``, ``src_mask`` (bool: True = masked; float: added) and
    ``is_causal`` (a hint that ``src_mask`` is causal, as in PyTorch). In training its dropout runs
    inside the kernels (attention probabilities, attention output, the MLP's hidden activations and
    output), drawn from PyTorch's generator. It runs PyTorch's own forward, with one warning, while
    hooks sit on its submodules or one of them was replaced.
    A query row whose keys are all masked yields zeros where PyTorch yields NaN. A subclass scripts
    with ``torch.jit.script`` as a subclass of ``nn.TransformerEncoderLayer`` does; one that redefines
    a method PyTorch's forward calls (``_sa_block``, ``_ff_block``) runs PyTorch's forward, with one warning.

    >>> layer = FastTransformerEncoderLayer(d_model=768, nhead=12, batch_first=True)
    >>> fast = FastTransformerEncoderLayer.from_torch(torch_layer)  # shares torch_layer's weights
    """

    _vitfast_original = nn.TransformerEncoderLayer

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
        m = self._modules
        return packed_block_weights(m["self_attn"], m["linear1"], m["linear2"], m["norm1"], m["norm2"],
                                    activation_name(self.activation))

    def _vitfast_unsupported(self) -> str | None:
        return unsupported_reason(self)

    def _vitfast_declines(self, src: Tensor, src_mask: Tensor | None = None,
                          src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> bool:
        # PyTorch's own code: nested tensors, its error for a causal hint without a mask, and a layer in
        # eval with a dropout switched back to train (its fast path then drops nothing, its other path does).
        return (src.is_nested or (is_causal and src_mask is None)
                or (not self.training and self._vitfast_memo("drops", lambda: layer_drops(self)) != NONE))

    def _fused_forward(self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                       is_causal: bool = False) -> Tensor:
        _check_mask_dtype("src_mask", src_mask)
        _check_mask_dtype("src_key_padding_mask", src_key_padding_mask)
        if src.dim() not in (2, 3):
            raise Unfusable(f"src of shape {tuple(src.shape)} is neither 2-D (unbatched) nor 3-D")
        unbatched = src.dim() == 2
        x = src.unsqueeze(0) if unbatched else (src if self.self_attn.batch_first else src.transpose(0, 1))
        kpm = src_key_padding_mask
        if kpm is not None and unbatched:
            kpm = kpm.unsqueeze(0)
        block = pre_norm_block if self.norm_first else post_norm_block
        # is_causal only certifies src_mask; the mask itself is applied, so the hint changes nothing.
        out = block(x.contiguous(), self._weights(), key_padding_mask=kpm, attn_mask=src_mask,
                    drops=layer_drops(self))
        if unbatched:
            return out.squeeze(0)
        return out if self.self_attn.batch_first else out.transpose(0, 1).contiguous()


def _padding_of(kpm: Tensor) -> Tensor:
    """Where a key padding mask pads, as nn.TransformerEncoder's nested path reads it: True, or any
    non-zero additive value."""
    return kpm if kpm.dtype == torch.bool else kpm != 0


def _pytorch_takes_nested_path(encoder: nn.TransformerEncoder, src: Tensor, mask, kpm) -> bool:
    """Whether nn.TransformerEncoder.forward would run its layers on a nested tensor here (its own
    conditions, in its order). That path drops padded tokens, so their keys are fully masked and their
    rows come out zero (before the final norm); vitfast reproduces it so outputs match everywhere."""
    first = encoder.layers[0]
    if not torch.backends.mha.get_fastpath_enabled() or not getattr(encoder, "use_nested_tensor", False):
        return False
    if first.training or src.dim() != 3 or kpm is None:
        return False
    mask_check = getattr(encoder, "mask_check", True)
    if mask_check and (torch.compiler.is_compiling()
                       or not torch._nested_tensor_from_mask_left_aligned(src, _padding_of(kpm).logical_not())):
        return False
    if src.is_nested or mask is not None or torch.is_autocast_enabled():
        return False
    attn = first.self_attn
    tensors = [t for t in (src, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
                           first.norm1.weight, first.norm1.bias, first.norm2.weight, first.norm2.bias,
                           first.linear1.weight, first.linear1.bias, first.linear2.weight, first.linear2.bias)
               if t is not None]
    if torch.overrides.has_torch_function(tensors) or src.device.type not in ("cpu", "cuda", "xpu"):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


class FastTransformerEncoder(Fused, nn.TransformerEncoder):
    """``nn.TransformerEncoder`` whose layers are ``FastTransformerEncoderLayer``s (final ``norm`` included).

    Same constructor and ``state_dict``; layers given as ``nn.TransformerEncoderLayer`` are converted
    in place, sharing their weights.

    >>> enc = FastTransformerEncoder(nn.TransformerEncoderLayer(768, 12, batch_first=True), num_layers=12)
    """

    _vitfast_original = nn.TransformerEncoder
    _vitfast_bypasses = ()  # each layer and the final norm are called as modules: their hooks fire

    def _vitfast_declines(self, src: Tensor, *args, **kwargs) -> bool:
        return src.is_nested  # PyTorch's own code takes nested tensors

    def _vitfast_switches(self) -> tuple:
        return (torch.backends.mha.get_fastpath_enabled(),)  # _pytorch_takes_nested_path's

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

    def _fused_forward(self, src: Tensor, mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                       is_causal: bool | None = None) -> Tensor:
        _check_mask_dtype("mask", mask)
        _check_mask_dtype("src_key_padding_mask", src_key_padding_mask)
        batch_first = self.layers[0].self_attn.batch_first
        seq_len = src.shape[1 if batch_first else 0] if src.dim() == 3 else src.shape[0]
        from torch.nn.modules.transformer import _detect_is_causal_mask

        is_causal = _detect_is_causal_mask(mask, is_causal, seq_len)
        kpm = src_key_padding_mask
        nested = _pytorch_takes_nested_path(self, src, mask, kpm)
        if nested:
            kpm = _padding_of(kpm)  # padded tokens are dropped there, whatever their additive value
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, src_key_padding_mask=kpm, is_causal=is_causal)
        if nested:
            out = out.masked_fill((kpm if batch_first else kpm.transpose(0, 1)).unsqueeze(-1), 0.0)
        if self.norm is not None:
            out = self.norm(out)
        return out
