"""Hugging Face image embeddings on the patch-embedding kernel: ViT, DeiT (class and distillation
tokens), DINOv2 (and its registers), CLIP (class embedding, no bias) and SigLIP (no class token).

One launch writes the patch tokens with bias and position rows added (and the class row where there
is one). DeiT's and DINOv2-with-registers' several leading rows are concatenated in front: one copy
of the tokens, which the kernel (one class row) does not avoid yet. Masked patches
(``bool_masked_pos``), interpolated position tables and dropout while training run transformers' code.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...modules._drops import any_live
from ...modules._fused import Fused, Unfusable
from ...modules.patch_embed import fusable_images, patch_conv_reason
from ...ops.patch_embed import patch_embed
from ..rules import Location, Rule, is_exactly, location
from .layers import models

_DROPOUT, _EMBEDDING = location(nn.Dropout), location(nn.Embedding)


def _images(pixels: object, conv: nn.Conv2d, rows: int, square: bool) -> Tensor:
    """``pixels`` when they are a batch of images whose patch grid has ``rows`` cells (and is square
    when ``square``: the tables are read as they are only then); otherwise ``Unfusable``."""
    if torch.jit.is_tracing():  # transformers interpolates the table while tracing, whatever the size
        raise Unfusable("torch.jit.trace is tracing")
    p, c = conv.kernel_size[0], conv.in_channels
    shape = tuple(getattr(pixels, "shape", ()))
    if (not isinstance(pixels, Tensor) or len(shape) != 4 or not shape[0] or shape[1] != c
            or shape[2] % p or shape[3] % p):
        raise Unfusable(f"pixel_values of shape {shape} are not images of {c} channels cut into {p}x{p} patches")
    if (shape[2] // p) * (shape[3] // p) != rows or (square and shape[2] != shape[3]):
        raise Unfusable(f"images of size {shape[2:]} need the position table interpolated")
    return pixels


def _prefixed(head: Tensor, tokens: Tensor) -> Tensor:
    """[head rows (shared by every image), tokens] along the token axis."""
    return torch.cat((head.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens), dim=1)


def _patches_reason(emb: nn.Module, kind: Location) -> str | None:
    pe = emb._modules.get("patch_embeddings")
    if not is_exactly(pe, kind):
        return f"patch_embeddings is a {type(pe).__name__}"
    if not is_exactly(emb._modules.get("dropout"), _DROPOUT):
        return "dropout is not nn.Dropout"
    return patch_conv_reason(pe.projection)


def _tokens_reason(emb: nn.Module, *names: str) -> str | None:
    missing = [n for n in names if not isinstance(getattr(emb, n, None), Tensor)]
    return f"no {', '.join(missing)}" if missing else None


class FusedHFViTEmbeddings(Fused):
    """``ViTEmbeddings`` and ``DeiTEmbeddings``: CLS (and DeiT's distillation token), patches and
    positions; images of the configured size only, as transformers takes them without interpolation."""

    _vitfast_bypasses = ("patch_embeddings", "dropout")

    def _vitfast_unsupported(self) -> str | None:
        prefix = "DeiT" if hasattr(self, "distillation_token") else "ViT"
        kind = (models(prefix.lower()), f"{prefix}PatchEmbeddings")
        return _patches_reason(self, kind) or _tokens_reason(self, "cls_token", "position_embeddings")

    def _vitfast_declines(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None,
                          interpolate_pos_encoding: bool | None = False) -> bool:
        return bool_masked_pos is not None or bool(interpolate_pos_encoding) or any_live((self.dropout, self.dropout.p))

    def _fused_forward(self, pixel_values: Tensor, *args, **kwargs) -> Tensor:
        proj = self.patch_embeddings.projection
        grid = [s // proj.kernel_size[0] for s in self.image_size]
        images = fusable_images(_images(pixel_values, proj, grid[0] * grid[1], False), proj.weight)
        if tuple(images.shape[2:]) != tuple(self.image_size):
            raise Unfusable(f"images of size {tuple(images.shape[2:])}, not {tuple(self.image_size)}")
        pos, dist = self.position_embeddings, self.__dict__["_parameters"].get("distillation_token")
        if dist is None:
            return patch_embed(images, proj.weight, proj.bias, cls_token=self.cls_token, pos_embed=pos)
        tokens = patch_embed(images, proj.weight, proj.bias, pos_embed=pos[:, 2:])
        return _prefixed(torch.cat((self.cls_token, dist), dim=1) + pos[:, :2], tokens)


class FusedHFDinov2Embeddings(Fused):
    """``Dinov2Embeddings`` (and ``Dinov2WithRegistersEmbeddings``: register tokens after CLS)."""

    _vitfast_bypasses = ("patch_embeddings", "dropout")

    def _vitfast_unsupported(self) -> str | None:
        prefix = "Dinov2WithRegisters" if hasattr(self, "register_tokens") else "Dinov2"
        kind = (models("dinov2_with_registers" if "With" in prefix else "dinov2"), f"{prefix}PatchEmbeddings")
        return _patches_reason(self, kind) or _tokens_reason(self, "cls_token", "position_embeddings")

    def _vitfast_declines(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None) -> bool:
        return bool_masked_pos is not None or any_live((self.dropout, self.dropout.p))

    def _fused_forward(self, pixel_values: Tensor, *args, **kwargs) -> Tensor:
        proj, pos = self.patch_embeddings.projection, self.position_embeddings
        images = fusable_images(_images(pixel_values, proj, pos.shape[1] - 1, True).to(proj.weight.dtype), proj.weight)
        registers = self.__dict__["_parameters"].get("register_tokens")
        if registers is None:
            return patch_embed(images, proj.weight, proj.bias, cls_token=self.cls_token, pos_embed=pos)
        tokens = patch_embed(images, proj.weight, proj.bias, pos_embed=pos[:, 1:])
        return _prefixed(torch.cat((self.cls_token + pos[:, :1], registers.to(pos.dtype)), dim=1), tokens)


def _table_reason(emb: nn.Module) -> str | None:
    """CLIP's and SigLIP's positions: a plain ``nn.Embedding`` (no renormalisation) looked up at
    ``position_ids``."""
    table = emb._modules.get("position_embedding")
    if not is_exactly(table, _EMBEDDING) or table.max_norm is not None:
        return "position_embedding is not a plain nn.Embedding"
    return patch_conv_reason(emb._modules.get("patch_embedding"))


class FusedHFCLIPEmbeddings(Fused):
    """``CLIPVisionEmbeddings`` (class embedding, bias-free projection) and ``SiglipVisionEmbeddings``
    (no class token; any grid with as many cells as the table has rows, as transformers adds it)."""

    def _vitfast_unsupported(self) -> str | None:
        return _table_reason(self)

    def _vitfast_declines(self, pixel_values: Tensor, interpolate_pos_encoding: bool | None = False) -> bool:
        return bool(interpolate_pos_encoding)

    def _fused_forward(self, pixel_values: Tensor, *args, **kwargs) -> Tensor:
        conv, ids = self.patch_embedding, self.position_ids
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
            raise Unfusable("position_ids are not one row of positions shared by every image")
        cls = self.__dict__["_parameters"].get("class_embedding")
        images = _images(pixel_values, conv, ids.shape[1] - int(cls is not None), False)
        if cls is not None and tuple(images.shape[2:]) != (self.image_size, self.image_size):
            raise Unfusable(f"images of size {tuple(images.shape[2:])}, not {self.image_size}")
        # The rows transformers looks up, read on every call: position_ids is a buffer anyone may edit.
        table = self.position_embedding.weight.index_select(0, ids[0])
        images = fusable_images(images.to(conv.weight.dtype), conv.weight)
        return patch_embed(images, conv.weight, conv.bias, cls_token=cls, pos_embed=table)



RULES = [
    Rule(((models("vit"), "ViTEmbeddings"), (models("deit"), "DeiTEmbeddings")),
         FusedHFViTEmbeddings._vitfast_unsupported, FusedHFViTEmbeddings),
    Rule(((models("dinov2"), "Dinov2Embeddings"), (models("dinov2_with_registers"), "Dinov2WithRegistersEmbeddings")),
         FusedHFDinov2Embeddings._vitfast_unsupported, FusedHFDinov2Embeddings),
    Rule(((models("clip"), "CLIPVisionEmbeddings"), (models("siglip"), "SiglipVisionEmbeddings")),
         FusedHFCLIPEmbeddings._vitfast_unsupported, FusedHFCLIPEmbeddings),
]
