"""FLOP count of a ViT's forward pass, read from the model's own layers."""
from __future__ import annotations

import dataclasses

import torch  # noqa: F401 - the doctest below names it
from torch import nn

from .. import reference


@dataclasses.dataclass(frozen=True)
class ViTShape:
    """What the FLOP count needs from a ViT: patches, widths, depth and head."""

    n_patches: int
    patch_dim: int  # in_channels * patch_size**2, the patch embedding's reduction length
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    num_classes: int
    prefix_tokens: int = 1  # CLS (and any register tokens)

    @property
    def tokens(self) -> int:
        return self.n_patches + self.prefix_tokens


def shape_of(model: nn.Module) -> ViTShape:
    """Read the shape of a reference ViT or a timm ``VisionTransformer`` (works on the meta device).

    >>> with torch.device("meta"):
    ...     shape_of(reference.vit_base()).tokens
    197
    """
    conv = model.patch_embed.proj
    patch_dim = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    if isinstance(model, reference.VisionTransformer):
        layer = model.encoder.layers[0]
        return ViTShape(model.patch_embed.n_patches, patch_dim, conv.out_channels, len(model.encoder.layers),
                        layer.self_attn.num_heads, layer.linear1.out_features, model.head.out_features)
    blocks = getattr(model, "blocks", None)
    fc1 = getattr(getattr(blocks[0], "mlp", None), "fc1", None) if blocks else None
    if fc1 is None or not hasattr(blocks[0].attn, "num_heads"):
        raise ValueError(f"model: expected a reference or timm ViT, got {type(model).__name__}")
    head = model.head
    return ViTShape(model.patch_embed.num_patches, patch_dim, conv.out_channels, len(blocks),
                    blocks[0].attn.num_heads, fc1.out_features,
                    head.out_features if isinstance(head, nn.Linear) else 0, model.num_prefix_tokens)


def flops_per_image(shape: ViTShape) -> int:
    """Forward FLOPs of one image: 2 per multiply-add of every matmul, attention as 4·N²·D per layer.

    Per layer the token-wise matmuls are QKV (3D²), the out-projection (D²) and the MLP (2·D·hidden);
    attention adds QKᵀ and PV, 2·N²·D multiply-adds together. Norms, softmax, GELU and adds are not
    counted. ViT-B/16 at 224 px comes to 35.13 GFLOP (CONVENTIONS.md quotes 35.16).
    """
    d, n = shape.embed_dim, shape.tokens
    patch = 2 * shape.n_patches * shape.patch_dim * d
    layer = 2 * n * (4 * d * d + 2 * d * shape.mlp_hidden) + 4 * n * n * d
    return patch + shape.depth * layer + 2 * d * shape.num_classes
