"""The reference ViT with its embedding stage fused: patch projection, bias, CLS token and position
embedding in one launch, then vitfast's encoder."""
from __future__ import annotations

import torch

from .. import reference
from ..ops.patch_embed import patch_embed
from ._fused import Fused, original_class
from .patch_embed import patch_conv_reason


class FastVisionTransformer(Fused, reference.VisionTransformer):
    """``vitfast.reference.VisionTransformer`` whose forward fuses the embedding stage.

    Same constructor, parameters and ``state_dict``; ``vitfast.optimize`` turns a reference ViT into
    one in place and converts its encoder to ``FastTransformerEncoder``.
    """

    _vitfast_original = reference.VisionTransformer
    _vitfast_bypasses = ("patch_embed",)  # the encoder and the head are called as modules

    def _vitfast_unsupported(self) -> str | None:
        if original_class(self.patch_embed) is not reference.PatchEmbedding:
            return f"patch_embed is a {type(self.patch_embed).__name__}"
        return patch_conv_reason(self.patch_embed.proj)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.patch_embed.proj
        tokens = patch_embed(x, proj.weight, proj.bias, cls_token=self.cls_token, pos_embed=self.pos_embed)
        tokens = self.encoder(tokens)
        return self.head(tokens[:, 0])
