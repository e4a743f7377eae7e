"""The reference ViT with its embedding stage fused: patch projection, bias, CLS token and position
embedding in one launch, then vitfast's encoder."""
from __future__ import annotations

import torch

from .. import reference
from ..ops.patch_embed import patch_embed


class FastVisionTransformer(reference.VisionTransformer):
    """``vitfast.reference.VisionTransformer`` whose forward fuses the embedding stage.

    Same constructor, parameters and ``state_dict``; ``vitfast.optimize`` turns a reference ViT into
    one in place and converts its encoder to ``FastTransformerEncoder``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.patch_embed.proj
        tokens = patch_embed(x, proj.weight, proj.bias, cls_token=self.cls_token, pos_embed=self.pos_embed)
        tokens = self.encoder(tokens)
        return self.head(tokens[:, 0])
