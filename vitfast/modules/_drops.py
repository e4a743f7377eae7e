"""Dropout and stochastic depth of one block call, in the form the fused ops take them.

The stand-ins read each dropout site's probability from the module that owns it, by that module's
own training flag (as PyTorch, timm and transformers decide), into a ``Drops``: dropout then runs
inside the kernels (``dropout_p`` of the attention and GEMM ops), and stochastic depth becomes a
per-sample scale of the branch in the residual epilogue (``row_scale``). Eval mode gives ``NONE``:
nothing is drawn and the kernels run as they do without dropout.

The per-sample keep mask is drawn with the same PyTorch calls as the module it replaces
(``drop_path_scale``), from the same generator: with the block's dropout off, vitfast and the
original drop the same samples under one ``torch.manual_seed``. With dropout on, the kernels draw
one seed per dropping launch, where PyTorch draws a number per element, so the two runs consume the
generator differently from the first dropout on and their masks differ (in distribution they agree).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

# How a per-sample keep mask is drawn, as each library draws it:
#   "bernoulli": timm's drop_path and torchvision's stochastic_depth: empty(B).bernoulli_(keep) / keep;
#   "bernoulli_unscaled": timm's DropPath(scale_by_keep=False): the mask, not divided;
#   "floor": transformers' DINOv2: floor(keep + rand(B)), the branch divided by keep.
PATH_DRAWS = ("bernoulli", "bernoulli_unscaled", "floor")


@dataclass(frozen=True)
class Drops:
    """Probabilities in effect for one call (0 where a site is absent or its module is in eval mode)."""

    attn: float = 0.0  # attention probabilities, inside the attention kernel
    proj: float = 0.0  # the out-projection's output, before LayerScale, stochastic depth and the residual
    hidden: float = 0.0  # the MLP's hidden activations, after the activation (before a sub-LN)
    mlp: float = 0.0  # fc2's output, before LayerScale, stochastic depth and the residual
    path1: float = 0.0  # stochastic depth of the attention branch: the probability of dropping a sample
    path2: float = 0.0  # stochastic depth of the MLP branch
    path_draws: tuple[str, str] = ("bernoulli", "bernoulli")  # how each branch's mask is drawn (PATH_DRAWS)


NONE = Drops()


def live(module: nn.Module | None, p: float) -> float:
    """``p`` when ``module`` (the one whose training flag decides the site) is training, else 0."""
    return float(p) if module is not None and module.training and p > 0 else 0.0


def any_live(*sites: tuple[nn.Module, float]) -> bool:
    """Whether any site drops now. A site is (the module whose training flag decides, p): each decides
    by its own flag, as in PyTorch and timm, so a model in eval() with its dropout modules switched back
    to train() (Monte Carlo dropout) drops there too."""
    return any(live(m, p) > 0 for m, p in sites)


def drop_path_scale(x: Tensor, p: float, draw: str, batch_first: bool = True) -> Tensor | None:
    """Stochastic depth's per-sample factor for a branch added to ``x`` ([B, N, D], or [N, B, D] when
    not ``batch_first``): a [B, 1] (or [1, B]) tensor in x's dtype, keep/(1 - p) or 0 per sample, drawn
    as the replaced module draws it; None when p = 0 (nothing drawn)."""
    if p <= 0:
        return None
    keep = 1.0 - p
    batch = x.shape[0 if batch_first else 1]
    shape = (batch,) + (1,) * (x.dim() - 1)  # the shape the libraries draw (only its size matters)
    if draw == "floor":
        scale = torch.floor(torch.rand(shape, dtype=x.dtype, device=x.device) + keep)
        scale = scale / keep  # the branch divided by keep, then masked: one factor here
    else:
        scale = x.new_empty(shape).bernoulli_(keep)
        if draw == "bernoulli" and keep > 0:
            scale.div_(keep)
    return scale.view(batch, 1) if batch_first else scale.view(1, batch)
