"""timm's ``VisionTransformer`` itself: its embedding stage (patch projection, class token, position
embedding) in one launch, then its own modules, so that a settled call of the whole model replays as
one (``modules/_replay.py``); and its ``nn.Linear`` head on vitfast's GEMM."""
from __future__ import annotations

import functools

from torch import Tensor, nn

from ..modules._fused import Fused, Unfusable, bypassed_hooks, honours_any, original_class
from ..ops.patch_embed import patch_embed
from .pytorch import head_rule
from .rules import Rule, location
from .timm import PATCH_EMBED, patch_embed_reason, patch_images

VISION_TRANSFORMER = ("timm.models.vision_transformer", "VisionTransformer")
# Methods of the model the fused forward stands for or calls: replaced on the instance or on the class
# (after conversion too), timm's own forward runs.
_METHODS = ("forward_features", "_pos_embed", "forward_head", "pool")


@functools.cache
def _replaced(methods: tuple) -> bool:
    """Whether any of ``methods`` (the class's functions named in ``_METHODS``) is not timm's own."""
    return any(getattr(f, "__qualname__", None) != f"VisionTransformer.{name}" or f.__module__ != VISION_TRANSFORMER[0]
               for name, f in zip(_METHODS, methods) if f is not None)


def _methods(cls: type) -> tuple:
    return tuple(getattr(cls, name, None) for name in _METHODS)


def vit_reason(vit: nn.Module) -> str | None:
    """Why the embedding stage of a timm ``VisionTransformer`` cannot run as one launch: it must be a
    ``PatchEmbed`` the kernel computes, then a class token (or none) and an absolute position embedding
    (or none), no register tokens, at the grid the model was built for."""
    pe = vit._modules.get("patch_embed")
    if pe is None or location(original_class(pe)) != PATCH_EMBED:
        return f"patch_embed is a {type(pe).__name__}, not timm's PatchEmbed"
    reason = patch_embed_reason(pe)
    if reason is not None:
        return reason
    if getattr(vit, "reg_token", None) is not None or getattr(vit, "dynamic_img_size", False):
        return "register tokens or a dynamic image size are not fused"
    # No tensor is read here (the class token's shape is the forward's to check): torch.jit.trace records
    # each first read, and its check trace, which finds the plan made, would see another graph.
    if vit.num_prefix_tokens != (vit._parameters.get("cls_token") is not None):
        return "the prefix tokens are not one class token"
    redefined = [name for name in _METHODS if name in vit.__dict__]
    if redefined:
        return f"{redefined[0]} is replaced on the instance"
    if _replaced(_methods(type(vit))):
        return "a method of VisionTransformer is replaced"
    return None


class FusedTimmVisionTransformer(Fused):
    """timm ``VisionTransformer`` whose forward embeds in one launch (``patch_embed`` with the class
    token and the position table) and calls everything after the embedding as timm does: the
    position dropout, ``patch_drop``, ``norm_pre``, the blocks, ``norm`` and ``forward_head``."""

    _vitfast_bypasses = ("patch_embed",)

    def _vitfast_unsupported(self) -> str | None:
        return vit_reason(self)

    # Hooks on patch_embed: timm's own forward, which calls it, runs quietly (declines).
    _vitfast_honours = honours_any

    def _vitfast_declines(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> bool:
        # Masks go block by block through timm's loop; checkpointing is timm's own; so are the methods
        # this forward stands for or calls, once one is replaced on the class.
        return (attn_mask is not None or bool(is_causal) or bool(getattr(self, "grad_checkpointing", False))
                or bypassed_hooks(self) or _replaced(_methods(type(self))))

    def _fused_forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        pe, cls, pos = self.patch_embed, self.cls_token, self.pos_embed
        images = patch_images(pe, x)
        p = pe.proj.kernel_size[0]
        if cls is not None and tuple(cls.shape) != (1, 1, pe.proj.out_channels):
            raise Unfusable(f"a class token of shape {tuple(cls.shape)}")
        patches = (images.shape[2] // p) * (images.shape[3] // p)
        class_row = cls is not None and not getattr(self, "no_embed_class", False)
        if pos is not None and pos.shape[-2] != patches + class_row:
            raise Unfusable(f"a position embedding of {pos.shape[-2]} rows for {patches} patches")
        tokens = patch_embed(images, pe.proj.weight, pe.proj.bias, cls_token=cls, pos_embed=pos)
        if pos is not None:  # timm drops after adding positions only
            tokens = self.pos_drop(tokens)
        tokens = self.norm_pre(self.patch_drop(tokens))
        return self.forward_head(self.norm(self.blocks(tokens)))


RULES = [Rule((VISION_TRANSFORMER,), vit_reason, FusedTimmVisionTransformer), head_rule(VISION_TRANSFORMER)]
