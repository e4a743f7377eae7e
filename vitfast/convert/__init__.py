"""``vitfast.optimize(model)``: swap what vitfast knows for fused stand-ins, keeping the weights.

Recognised by exact class, wherever they sit in the model (one file per ecosystem):

* PyTorch (``pytorch.py``): ``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer``, ``nn.LayerNorm``
  over one dimension, a self-attention ``nn.MultiheadAttention`` (unless a stand-in above it runs it),
  and ``vitfast.reference``'s ``VisionTransformer`` (its ``nn.Linear`` head too) and ``PatchEmbedding``;
* timm (``timm.py``, ``timm_vit.py``, ``timm_eva.py``, ``timm_pool.py``): ``PatchEmbed``, the ViT ``Block``
  (``Mlp``, ``SwiGLU`` or ``GluMlp``), ``LayerNorm``, the ``VisionTransformer`` itself (its embedding
  stage in one launch, its ``nn.Linear`` head), EVA's ``EvaBlock`` with its rotary embedding, and
  ``AttentionPoolLatent`` (the MAP head);
* torchvision (``torchvision.py``): the ViT's ``conv_proj`` and ``EncoderBlock``;
* open_clip (``open_clip.py``): the ViT's ``conv1``, ``ResidualAttentionBlock``, ``LayerNorm`` and
  ``LayerNormFp32``;
* Hugging Face (``huggingface/``): the image embeddings and encoder layers of ViT, DeiT, CLIP, SigLIP
  (SigLIP 2's layers) and DINOv2 (with and without registers, with SwiGLU), and SigLIP's
  attention-pooling heads.

A module is swapped by changing its class, in place, to a subclass of its own class (a stand-in,
``vitfast/modules/_fused.py``): same object, parameters, ``state_dict``, hooks and methods. A stand-in
runs the original forward, per call, whenever the fused path cannot honour the call exactly.
Everything else is left untouched; a known module in a configuration vitfast cannot run stays as it
is, and the report says why.
"""
from __future__ import annotations

import copy

from torch import nn

from ..modules import _fused
from ..modules._fused import Fused
from . import huggingface, open_clip, pytorch, timm, timm_eva, timm_pool, timm_vit, torchvision
from .report import Entry, Report, add_left_alone
from .rules import Rule

__all__ = ["Entry", "Report", "optimize"]

RULES: list[Rule] = [*pytorch.RULES, *timm.RULES, *timm_vit.RULES, *timm_eva.RULES, *timm_pool.RULES,
                     *torchvision.RULES, *huggingface.RULES, *open_clip.RULES]


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _bypasses(module: nn.Module, child: str) -> bool:
    """Whether ``module`` is a stand-in whose fused path reads ``child``'s weights instead of calling it."""
    if not isinstance(module, Fused):
        return False
    bypassed = module._vitfast_bypasses
    return bypassed is None or child in bypassed


def _walk(module: nn.Module, parent: nn.Module | None, name: str, path: str, report: Report,
          bypassed: bool = False) -> None:
    """Convert ``module`` and everything below it.
    ``bypassed``: a stand-in above ``module`` runs it itself (its checks read the classes below it)."""
    rule = next((r for r in RULES if (r.inside_fused or not bypassed) and r.matches(module, parent, name)), None)
    if isinstance(module, Fused):  # swapped by an earlier optimize, or built as vitfast's: left as it is
        cls = type(module)
        made = cls.__module__ == _fused.__name__  # by stand_in(): its first base is vitfast's class
        report.swapped.append(Entry(path, _name(cls._vitfast_original), (cls.__bases__[0] if made else cls).__name__))
    elif rule is not None:
        reason = rule.reason(module)
        if reason is None:
            kind = _name(type(module))
            rule.swap(module)
            report.swapped.append(Entry(path, kind, rule.stand_in.__name__))
        else:
            report.skipped.append(Entry(path, _name(type(module)), reason))
    for child_name, child in list(module._modules.items()):
        if child is not None:
            _walk(child, module, child_name, f"{path}.{child_name}" if path else child_name, report,
                  bypassed or _bypasses(module, child_name))


def optimize(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Swap the layers vitfast knows for fused ones with the same weights and ``state_dict``.

    Returns the model (the same object when ``inplace``, else a converted deep copy). What was
    swapped and what was left alone, with the reason, is in ``model.vitfast_report`` (print it).
    Every call that worked on the model before works after it: a swapped module runs its original
    forward for any call its fused path cannot compute exactly (hooks on its submodules, a submodule
    replaced after conversion, attention weights or masks asked for, the embeddings' dropout while
    training). Dropout and stochastic depth in the blocks train on the kernels.

    >>> model = vitfast.reference.vit_base().cuda().eval().half()
    >>> model = vitfast.optimize(model)
    >>> print(model.vitfast_report)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = Report()
    _walk(model, None, "", "", report)
    add_left_alone(model, report)
    model.vitfast_report = report
    return model
