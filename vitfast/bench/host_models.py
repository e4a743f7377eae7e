"""The models the host-time instrument measures: timm's ViT and the reference ViT, optimized, and the eager
twin of each that stands for PyTorch eager's host time.

``optimized`` builds the model a user would run on the GPU (ViT-B/16 by default): eval, parameters in
the measured dtype, ``vitfast.optimize``. ``eager_twin`` builds the same model class at the same depth
and head count with one channel per head (width = heads) and images one patch wide (2 tokens), fp32,
batch 1: the same modules and the same aten op graph, with kernels that do next to no arithmetic. Why
those sizes: at ViT-B's 197 tokens even width 12 spends most of its CPU time in arithmetic (measured
at batch 1: 20.2 ms per forward against 1.6 ms at 2 tokens for the reference, 7.2 against 1.6 ms for
timm's), and the op graph a GPU dispatches does not depend on the batch, while the CPU's arithmetic
grows with it. So one figure, at batch 1, is eager's host time at every batch. It is a floor for eager
on a GPU host, whose aten ops also launch (``cudaLaunchKernel``, the caching allocator), so a ratio
against it is conservative.

>>> model = optimized("reference", Shape(width=64, depth=1, heads=2, img_size=32))
>>> twin, x = eager_twin("reference", Shape())
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

MODELS = ("timm", "reference")
TIMM_NAME = "vit_base_patch16_224"


@dataclasses.dataclass(frozen=True)
class Shape:
    """A ViT's size; the defaults are ViT-B/16 at 224 px."""

    width: int = 768
    depth: int = 12
    heads: int = 12
    img_size: int = 224
    patch: int = 16

    def __post_init__(self) -> None:
        for name in ("width", "depth", "heads", "img_size", "patch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width must be a multiple of heads, got width {self.width} and heads {self.heads}")
        if self.img_size % self.patch:
            raise ValueError(f"img_size must be a multiple of patch, got {self.img_size} and {self.patch}")

    @property
    def tokens(self) -> int:
        return (self.img_size // self.patch) ** 2 + 1


def build(model: str, shape: Shape) -> nn.Module:
    """The plain model in eval, fp32, seeded: timm's ``vit_base_patch16_224`` or ``vitfast.reference``'s
    ``VisionTransformer``, resized to ``shape``."""
    torch.manual_seed(0)
    if model == "timm":
        import timm

        built = timm.create_model(TIMM_NAME, pretrained=False, img_size=shape.img_size, patch_size=shape.patch,
                                  embed_dim=shape.width, depth=shape.depth, num_heads=shape.heads)
    elif model == "reference":
        from .. import reference

        built = reference.VisionTransformer(img_size=shape.img_size, patch_size=shape.patch, embed_dim=shape.width,
                                            n_layers=shape.depth, n_heads=shape.heads)
    else:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    return built.eval()


def optimized(model: str, shape: Shape, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """``build`` in ``dtype``, then ``vitfast.optimize``: what the GPU runs."""
    from ..convert import optimize

    return optimize(build(model, shape).to(dtype))


def first_block(model_name: str, model: nn.Module) -> nn.Module:
    """The model's first transformer block: timm's ``blocks[0]``, the reference's ``encoder.layers[0]``."""
    return model.blocks[0] if model_name == "timm" else model.encoder.layers[0]


def images(shape: Shape, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """A random image batch [batch, 3, img_size, img_size] on the CPU."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    return torch.randn(batch, 3, shape.img_size, shape.img_size, dtype=dtype)


def eager_twin(model: str, shape: Shape) -> tuple[nn.Module, torch.Tensor]:
    """``model`` at ``shape``'s depth and heads, width = heads, one patch per image, fp32, and its batch-1
    input: PyTorch eager's op graph with almost no arithmetic (see the module's docstring)."""
    twin_shape = dataclasses.replace(shape, width=shape.heads, img_size=shape.patch)
    return build(model, twin_shape), images(twin_shape, 1, torch.float32)
