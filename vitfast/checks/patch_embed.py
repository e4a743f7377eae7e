from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.patch_embed import patch_embed
from . import Row, compare, guarded


def composite(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              cls_token: torch.Tensor | None = None, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """The eager PyTorch patch embedding a ViT writes: Conv2d, flatten, transpose, cat CLS, add pos.

    ``pos_embed`` with one row per patch is added before the CLS token joins (timm's
    ``no_embed_class``); with one more row it is added after. The reference of tests and benchmarks.
    """
    x = F.conv2d(images, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    pos = None if pos_embed is None else pos_embed.reshape(1, -1, weight.shape[0])
    if pos is not None and pos.shape[1] == x.shape[1]:
        x, pos = x + pos, None
    if cls_token is not None:
        x = torch.cat([cls_token.reshape(1, 1, -1).expand(x.shape[0], -1, -1), x], dim=1)
    return x if pos is None else x + pos


def _case(batch: int, channels: int, size: tuple[int, int], patch: int, width: int, cls: bool,
          dtype: torch.dtype, device: torch.device) -> Row:
    h, w = size
    n = (h // patch) * (w // patch)
    images = torch.randn(batch, channels, h, w, device=device, dtype=dtype)
    weight = torch.randn(width, channels, patch, patch, device=device, dtype=dtype) / patch
    bias = torch.randn(width, device=device, dtype=dtype)
    cls_token = torch.randn(1, 1, width, device=device, dtype=dtype) if cls else None
    pos_embed = torch.randn(1, n + cls, width, device=device, dtype=dtype)
    args = (images, weight, bias, cls_token, pos_embed)
    out = patch_embed(*args)
    pt = composite(*args)
    ref = composite(*(None if t is None else t.double() for t in args))
    return compare("patch_embed", _label(batch, channels, size, patch, width, cls), out, pt, ref)


def _label(batch: int, channels: int, size: tuple[int, int], patch: int, width: int, cls: bool) -> str:
    return f"[{batch}, {channels}, {size[0]}, {size[1]}] P={patch} D={width}{' +cls' if cls else ''}"


def cases(device: torch.device, dtypes, small: bool):
    shapes = ([(2, 3, (32, 32), 8, 64, True), (1, 4, (16, 40), 4, 40, False)] if small else
              [(64, 3, (224, 224), 16, 768, True), (32, 3, (224, 224), 14, 1024, True),
               (64, 3, (224, 384), 16, 768, False)])
    for dtype in dtypes:
        for shape in shapes:
            yield guarded("patch_embed", _label(*shape), dtype, lambda: _case(*shape, dtype, device))
