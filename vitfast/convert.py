"""``vitfast.optimize(model)``: swap what vitfast knows for fused modules, keeping the weights.

Recognised, wherever they sit in the model:

* ``vitfast.reference.VisionTransformer`` (embedding stage fused) and its ``PatchEmbedding``;
* ``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer`` (and their final / inner ``nn.LayerNorm``);
* timm ``PatchEmbed`` and ``Block``; torchvision ``conv_proj`` and ``EncoderBlock``;
  Hugging Face ``ViTEmbeddings`` and ``ViTLayer``;
* any other ``nn.LayerNorm`` over one dimension.

Everything else is left untouched. A known module in a configuration vitfast cannot run stays as it
is, and the report says why.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from . import reference
from .modules import encoder as enc
from .modules.families import (HFViTEmbeddings, HFViTLayer, PatchConv2d, TimmBlock, TimmPatchEmbed,
                               TorchvisionEncoderBlock, patch_conv_reason)
from .modules.layer_norm import LayerNorm
from .modules.patch_embed import PatchEmbedding
from .modules.vit import FastVisionTransformer


@dataclass
class Entry:
    path: str  # dotted module path ("" for the model itself)
    kind: str  # the original class, module.qualname
    result: str  # the vitfast class it became, or the reason it was left alone


@dataclass
class Report:
    """What ``optimize`` swapped and what it left alone, with the reason."""

    swapped: list[Entry] = field(default_factory=list)
    skipped: list[Entry] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"vitfast.optimize: {len(self.swapped)} module(s) swapped, {len(self.skipped)} left alone"]
        lines += [f"  swapped  {e.path or '(model)'}: {e.kind} -> {e.result}" for e in self.swapped]
        lines += [f"  left     {e.path or '(model)'}: {e.kind} ({e.result})" for e in self.skipped]
        return "\n".join(lines)

    def counts(self) -> dict[str, int]:
        """Swapped modules per vitfast class."""
        out: dict[str, int] = {}
        for e in self.swapped:
            out[e.result] = out.get(e.result, 0) + 1
        return out


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is(module: nn.Module, module_prefix: str, qualname: str) -> bool:
    """Recognise a third-party class by where it is defined, without importing its package."""
    cls = type(module)
    return cls.__qualname__ == qualname and cls.__module__.startswith(module_prefix)


def _head_dim_reason(width: int, heads: int) -> str | None:
    head_dim = width // heads
    try:
        from .kernels.attention import HEAD_DIMS
    except ImportError:  # no Triton here: every op runs its PyTorch fallback anyway
        return None
    if head_dim not in HEAD_DIMS:
        return f"head size {head_dim} is not one of the attention kernel's {HEAD_DIMS}"
    return None


def _encoder_layer_reason(layer: nn.TransformerEncoderLayer) -> str | None:
    return enc.unsupported_reason(layer) or _head_dim_reason(layer.self_attn.embed_dim, layer.self_attn.num_heads)


def _timm_block_reason(block: nn.Module) -> str | None:
    return TimmBlock.unsupported_reason(block) or _head_dim_reason(block.attn.qkv.out_features // 3,
                                                                    block.attn.num_heads)


def _tv_block_reason(block: nn.Module) -> str | None:
    attn = getattr(block, "self_attention", None)
    return TorchvisionEncoderBlock.unsupported_reason(block) or _head_dim_reason(attn.embed_dim, attn.num_heads)


def _hf_layer_reason(layer: nn.Module) -> str | None:
    from .modules.families import _hf_parts

    reason = HFViTLayer.unsupported_reason(layer)
    if reason is None:
        parts = _hf_parts(layer)
        reason = _head_dim_reason(parts["heads"] * parts["head_dim"], parts["heads"])
    return reason


# (recognise, why it cannot be fused or None, build the replacement). First match wins.
Rule = tuple[Callable[[nn.Module], bool], Callable[[nn.Module], "str | None"], Callable[[nn.Module], nn.Module]]


def _swap_class(cls: type) -> Callable[[nn.Module], nn.Module]:
    def build(m: nn.Module) -> nn.Module:
        m.__class__ = cls  # a subclass with no state of its own: weights, hooks and keys stay
        return m
    return build


def _rules() -> list[Rule]:
    return [
        (lambda m: type(m) is reference.VisionTransformer, lambda m: patch_conv_reason(m.patch_embed.proj),
         _swap_class(FastVisionTransformer)),
        (lambda m: type(m) is reference.PatchEmbedding, lambda m: patch_conv_reason(m.proj), _swap_class(PatchEmbedding)),
        (lambda m: type(m) is nn.TransformerEncoder, lambda m: None, _swap_class(enc.FastTransformerEncoder)),
        (lambda m: type(m) is nn.TransformerEncoderLayer, _encoder_layer_reason,
         _swap_class(enc.FastTransformerEncoderLayer)),
        (lambda m: _is(m, "timm.", "PatchEmbed"), TimmPatchEmbed.unsupported_reason, TimmPatchEmbed.adopt),
        (lambda m: _is(m, "timm.", "Block"), _timm_block_reason, TimmBlock.adopt),
        (lambda m: _is(m, "torchvision.models.vision_transformer", "EncoderBlock"), _tv_block_reason,
         TorchvisionEncoderBlock.adopt),
        (lambda m: _is(m, "transformers.models.vit.", "ViTEmbeddings"), HFViTEmbeddings.unsupported_reason,
         HFViTEmbeddings.adopt),
        (lambda m: _is(m, "transformers.models.vit.", "ViTLayer"), _hf_layer_reason, HFViTLayer.adopt),
        (lambda m: isinstance(m, nn.LayerNorm) and (type(m) is nn.LayerNorm or _is(m, "timm.", "LayerNorm")),
         lambda m: None if len(m.normalized_shape) == 1 else "normalises over more than one dimension",
         _swap_class(LayerNorm)),
    ]


def _conv_rules(parent: nn.Module) -> list[str]:
    """Names of patch-projection convs under ``parent`` whose consumers flatten them to tokens."""
    if _is(parent, "torchvision.models.vision_transformer", "VisionTransformer"):
        return ["conv_proj"]
    # A tutorial PatchEmbedding pasted into the user's own code: proj, then flatten and transpose.
    if type(parent).__name__ == "PatchEmbedding" and not isinstance(parent, reference.PatchEmbedding):
        return ["proj"]
    return []


def _walk(module: nn.Module, path: str, rules: list[Rule], report: Report) -> nn.Module:
    for recognise, reason_of, build in rules:
        if not recognise(module):
            continue
        reason = reason_of(module)
        if reason is not None:
            report.skipped.append(Entry(path, _name(type(module)), reason))
            break
        kind = _name(type(module))
        module = build(module)
        report.swapped.append(Entry(path, kind, type(module).__name__))
        break
    for name in _conv_rules(module):
        conv = getattr(module, name)
        reason = patch_conv_reason(conv)
        target = f"{path}.{name}" if path else name
        if reason is None:
            setattr(module, name, PatchConv2d.from_torch(conv))
            report.swapped.append(Entry(target, _name(type(conv)), "PatchConv2d"))
        else:
            report.skipped.append(Entry(target, _name(type(conv)), reason))
    for name, child in list(module.named_children()):
        if isinstance(child, PatchConv2d):
            continue
        new = _walk(child, f"{path}.{name}" if path else name, rules, report)
        if new is not child:
            setattr(module, name, new)
    return module


def optimize(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Swap the layers vitfast knows for fused ones with the same weights and ``state_dict``.

    Returns the model (the same object when ``inplace``, else a converted deep copy). What was
    swapped and what was left alone, with the reason, is in ``model.vitfast_report`` (print it).

    >>> model = vitfast.reference.vit_base().cuda().eval().half()
    >>> model = vitfast.optimize(model)
    >>> print(model.vitfast_report)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = Report()
    model = _walk(model, "", _rules(), report)
    model.vitfast_report = report
    return model
