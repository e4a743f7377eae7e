"""Whole-model row: the reference ViT before and after ``vitfast.optimize``."""
from __future__ import annotations

import copy

import torch

from .. import reference
from ..convert import optimize
from . import Row, compare, guarded


def _case(config: dict, batch: int, dtype: torch.dtype, device: torch.device) -> Row:
    torch.manual_seed(0)
    model = reference.VisionTransformer(**config).to(device).eval()
    images = torch.randn(batch, config.get("in_channels", 3), config["img_size"], config["img_size"], device=device)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(images.double())
        pt_model = copy.deepcopy(model).to(dtype)
        pt = pt_model(images.to(dtype))
        out = optimize(pt_model, inplace=False)(images.to(dtype))
    return compare("reference ViT, optimized", _label(config, batch), out, pt, ref)


def _label(config: dict, batch: int) -> str:
    return (f"B={batch} img={config['img_size']}/{config['patch_size']} D={config['embed_dim']} "
            f"L={config['n_layers']} h={config['n_heads']}")


def cases(device: torch.device, dtypes, small: bool):
    config = (dict(img_size=32, patch_size=8, embed_dim=64, n_layers=2, n_heads=4, n_classes=10) if small else
              dict(img_size=224, patch_size=16, embed_dim=768, n_layers=12, n_heads=12, n_classes=1000))
    batch = 2 if small else 8
    for dtype in dtypes:
        yield guarded("reference ViT, optimized", _label(config, batch), dtype, lambda: _case(config, batch, dtype, device))
