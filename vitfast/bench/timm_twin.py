"""timm's ``VisionTransformer`` built from the reference ViT's weights: the timm baselines' model."""
from __future__ import annotations

import functools

import torch
from torch import nn

from .. import reference
from .flops import shape_of


def _timm_sources(ref: reference.VisionTransformer) -> dict[str, torch.Tensor]:
    """Reference tensors under the names timm's ``VisionTransformer`` gives them."""
    src = {"cls_token": ref.cls_token, "pos_embed": ref.pos_embed,
           "patch_embed.proj.weight": ref.patch_embed.proj.weight,
           "patch_embed.proj.bias": ref.patch_embed.proj.bias,
           "head.weight": ref.head.weight, "head.bias": ref.head.bias}
    for i, layer in enumerate(ref.encoder.layers):
        pairs = {"attn.qkv.weight": layer.self_attn.in_proj_weight, "attn.qkv.bias": layer.self_attn.in_proj_bias,
                 "attn.proj": layer.self_attn.out_proj, "mlp.fc1": layer.linear1, "mlp.fc2": layer.linear2,
                 "norm1": layer.norm1, "norm2": layer.norm2}
        for name, thing in pairs.items():
            if isinstance(thing, nn.Module):
                src[f"blocks.{i}.{name}.weight"], src[f"blocks.{i}.{name}.bias"] = thing.weight, thing.bias
            else:
                src[f"blocks.{i}.{name}"] = thing
    return src


def timm_from_reference(ref: reference.VisionTransformer) -> nn.Module:
    """timm's ``VisionTransformer`` with the reference ViT's dimensions and a copy of its weights.

    ``in_proj`` becomes ``qkv``, ``out_proj`` ``proj``, ``linear1/2`` ``fc1/fc2``, ``norm1/2`` stay; the
    patch projection, CLS token, position embedding and head keep their names. The reference has no
    final norm, so timm's is replaced by ``nn.Identity``. Same parameter tensors, different function:
    timm's blocks are pre-norm (``x + attn(norm1(x))``), the reference's post-norm
    (``norm1(x + attn(x))``).

    >>> t = timm_from_reference(reference.vit_tiny(img_size=32, n_layers=2))
    >>> t.blocks[0].attn.qkv.weight.shape
    torch.Size([576, 192])
    """
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    s = shape_of(ref)
    embed = ref.patch_embed
    eps = ref.encoder.layers[0].norm1.eps
    model = TimmViT(img_size=embed.img_size, patch_size=embed.patch_size, in_chans=embed.proj.in_channels,
                    num_classes=s.num_classes, global_pool="token", embed_dim=s.embed_dim, depth=s.depth,
                    num_heads=s.num_heads, mlp_ratio=s.mlp_hidden / s.embed_dim,
                    norm_layer=functools.partial(nn.LayerNorm, eps=eps))
    model.norm = nn.Identity()
    src = _timm_sources(ref)
    params = dict(model.named_parameters())
    if set(params) != set(src):
        raise ValueError(f"timm ViT parameters do not match the reference: only in timm "
                         f"{sorted(set(params) - set(src))}, only in reference {sorted(set(src) - set(params))}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(src[name])
    return model.to(device=ref.cls_token.device, dtype=ref.cls_token.dtype).eval()

