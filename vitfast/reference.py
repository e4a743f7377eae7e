"""The plain-PyTorch Vision Transformer, exactly as users write it from tutorials.

This is the ground truth for vitfast's tests and the baseline of its benchmarks: a ``Conv2d``
patch embedding, a learnable CLS token and position embedding, PyTorch's own post-norm
``nn.TransformerEncoder`` and a linear head on the CLS output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbedding(nn.Module):
    """Split the image into patches and project each one: [B, C, H, W] -> [B, N, D]."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_channels: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.n_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # [B, D, H/P, W/P]
        x = x.flatten(2)  # [B, D, N]
        return x.transpose(1, 2)  # [B, N, D]


class VisionTransformer(nn.Module):
    """ViT with a CLS token, learned position embedding and ``nn.TransformerEncoder`` (post-norm)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        embed_dim: int = 768,
        n_layers: int = 12,
        n_heads: int = 12,
        mlp_ratio: float = 4.0,
        n_classes: int = 1000,
    ):
        super().__init__()
        self.patch_embed = PatchEmbedding(img_size, patch_size, in_channels, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.n_patches, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        encoder_layer = nn.TransformerEncoderLayer(
            d_model=embed_dim,
            nhead=n_heads,
            dim_feedforward=int(embed_dim * mlp_ratio),
            activation=F.gelu,
            batch_first=True,
        )
        self.encoder = nn.TransformerEncoder(encoder_layer, num_layers=n_layers)
        self.head = nn.Linear(embed_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.pos_embed
        x = self.encoder(x)
        return self.head(x[:, 0])


CONFIGS = {
    "vit_tiny": dict(embed_dim=192, n_heads=3, n_layers=12),
    "vit_small": dict(embed_dim=384, n_heads=6, n_layers=12),
    "vit_base": dict(embed_dim=768, n_heads=12, n_layers=12),
    "vit_large": dict(embed_dim=1024, n_heads=16, n_layers=24),
}


def _named(name: str, **overrides) -> VisionTransformer:
    kwargs = dict(patch_size=16, **CONFIGS[name])
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)


def vit_tiny(**overrides) -> VisionTransformer:
    """ViT-Ti/16: width 192, 3 heads, depth 12."""
    return _named("vit_tiny", **overrides)


def vit_small(**overrides) -> VisionTransformer:
    """ViT-S/16: width 384, 6 heads, depth 12."""
    return _named("vit_small", **overrides)


def vit_base(**overrides) -> VisionTransformer:
    """ViT-B/16: width 768, 12 heads, depth 12."""
    return _named("vit_base", **overrides)


def vit_large(**overrides) -> VisionTransformer:
    """ViT-L/16: width 1024, 16 heads, depth 24."""
    return _named("vit_large", **overrides)
