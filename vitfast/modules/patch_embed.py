"""Patch embedding modules on vitfast's fused ``patch_embed`` op."""
from __future__ import annotations

import torch
from torch import nn

from .. import reference
from ..ops._layout import as_result
from ..ops.patch_embed import patch_embed
from ._fused import Fused, Unfusable, original_class
from ._share import share_as


def _check_patch_conv(conv: nn.Module) -> None:
    """The fused op computes a stride-P, unpadded, ungrouped P x P convolution and nothing else."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"proj must be an nn.Conv2d, got {type(conv).__name__}")
    k = conv.kernel_size
    expected = dict(kernel_size=(k[0], k[0]), stride=k, padding=(0, 0), dilation=(1, 1), groups=1)
    for name, want in expected.items():
        got = getattr(conv, name)
        if got != want and not (name == "padding" and got == "valid"):  # "valid" pads nothing
            raise ValueError(f"proj.{name} must be {want} for a patch embedding, got {got}")
    if original_class(conv) is not nn.Conv2d:
        raise TypeError(f"proj must be an nn.Conv2d, got its subclass {type(conv).__name__}")


_KERNEL_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def fusable_images(images: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``images`` when the kernel computes with them and ``weight`` what the convolution would, else
    ``Unfusable``: the original forward then runs, and raises PyTorch's own error for bad input (a
    dtype or device that differs from the weight's). Under autocast the dtypes may differ: the
    convolution, and the op, cast both."""
    mixed_ok = torch.is_autocast_enabled(images.device.type) and weight.dtype in _KERNEL_FLOATS
    if ((images.dtype != weight.dtype and not mixed_ok) or images.dtype not in _KERNEL_FLOATS
            or images.device != weight.device):
        raise Unfusable(f"{images.dtype} images on {images.device} with {weight.dtype} weights on {weight.device}")
    return images


def patch_conv_reason(conv: object) -> str | None:
    """Why ``conv`` is not a patch projection the fused kernel computes, or None when it is."""
    try:
        _check_patch_conv(conv)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


class PatchConv2d(Fused, nn.Conv2d):
    """``nn.Conv2d`` with kernel = stride (a patch projection) on vitfast's patch-embedding kernel.

    It returns the usual contiguous [B, D, H/P, W/P] output, which the kernel writes channel-major in
    place, so code that flattens and transposes it to tokens (torchvision's ``_process_input``) or
    views it does exactly what it did. Inputs the kernel does not take (an unbatched image, sides that
    are not multiples of P) run ``nn.Conv2d``'s own forward.
    """

    _vitfast_original = nn.Conv2d

    @classmethod
    def from_torch(cls, conv: nn.Conv2d) -> "PatchConv2d":
        _check_patch_conv(conv)
        return share_as(conv, cls)

    def _vitfast_unsupported(self) -> str | None:
        return patch_conv_reason(self)

    def _fused_forward(self, input: torch.Tensor) -> torch.Tensor:
        p = self.kernel_size[0]
        if input.dim() != 4 or input.shape[1] != self.in_channels or input.shape[2] % p or input.shape[3] % p:
            raise Unfusable(f"input of shape {tuple(input.shape)} is not a batch of {self.in_channels}-channel "
                            f"images cut into whole {p}x{p} patches")
        # [B, N, D], stored [B, D, N]
        tokens = patch_embed(fusable_images(input, self.weight), self.weight, self.bias, channels_first=True)
        b, _, h, w = input.shape
        return as_result(tokens.transpose(1, 2), (b, self.out_channels, h // p, w // p))  # not a view, as Conv2d's


class PatchEmbedding(Fused, reference.PatchEmbedding):
    """Drop-in for ``vitfast.reference.PatchEmbedding`` ([B, C, H, W] -> [B, N, D]): same constructor,
    ``proj.weight``/``proj.bias`` and ``state_dict``; the projection runs as one fused GEMM.

    >>> pe = PatchEmbedding(224, 16, 3, 768)
    >>> pe.load_state_dict(vitfast.reference.PatchEmbedding(224, 16, 3, 768).state_dict())
    <All keys matched successfully>
    """

    _vitfast_original = reference.PatchEmbedding

    def _vitfast_unsupported(self) -> str | None:
        return patch_conv_reason(self.proj)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_embed(x, self.proj.weight, self.proj.bias)

    @classmethod
    def from_torch(cls, module: reference.PatchEmbedding) -> "PatchEmbedding":
        """A vitfast PatchEmbedding sharing ``module``'s parameters (no copy)."""
        _check_patch_conv(module.proj)
        return share_as(module, cls)


class PatchEmbeddingStage(nn.Module):
    """A ViT's whole embedding stage in one launch: images [B, C, H, W] -> tokens [B, 1 + N, D]
    (or [B, N, D] without a class token), i.e. projection, bias, CLS token and position embedding.

    Holds references to the given ``proj`` conv and Parameters (shared, never copied); a
    ``pos_embed`` and ``cls_token`` given as None are left out. ``resample_pos_embed`` and
    ``pos_grid`` keep their meaning in ``vitfast.ops.patch_embed``.

    >>> vit = vitfast.reference.vit_tiny()
    >>> stage = PatchEmbeddingStage(vit.patch_embed.proj, vit.cls_token, vit.pos_embed)
    >>> stage(torch.randn(2, 3, 224, 224)).shape
    torch.Size([2, 197, 192])
    """

    def __init__(self, proj: nn.Conv2d, cls_token: nn.Parameter | None = None,
                 pos_embed: nn.Parameter | None = None, *, resample_pos_embed: bool = False,
                 pos_grid: tuple[int, int] | None = None):
        super().__init__()
        _check_patch_conv(proj)
        self.proj = proj
        self.register_parameter("cls_token", cls_token)
        self.register_parameter("pos_embed", pos_embed)
        self.resample_pos_embed = resample_pos_embed
        self.pos_grid = pos_grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return patch_embed(images, self.proj.weight, self.proj.bias, self.cls_token, self.pos_embed,
                               resample_pos_embed=self.resample_pos_embed, pos_grid=self.pos_grid)
