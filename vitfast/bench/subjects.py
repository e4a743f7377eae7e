"""The models under test: the reference ViT (or a timm model by name) and its timm twin, built for a run."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import reference
from .options import DTYPES, Config
from .timm_twin import timm_from_reference

PRENORM_NOTE = ("timm rows: timm's ViT is pre-norm, the reference post-norm; same parameter tensors, "
                "different function (a speed comparison, not a parity check)")


@dataclasses.dataclass
class Subject:
    """One model under test: the reference ViT (absent for a timm model name) and its timm twin."""

    name: str
    ref: nn.Module | None
    timm: nn.Module
    device: torch.device
    compile_mode: str
    compile_on_cpu: bool
    notes: list[str] = dataclasses.field(default_factory=list)
    vitfast_model: nn.Module | None = None
    vitfast_skip: str | None = None


def build_subject(name: str, cfg: Config) -> Subject:
    """The model, seeded, in eval, on the device in the run's dtype, and its timm twin."""
    torch.manual_seed(cfg.seed)
    overrides = {} if cfg.depth is None else {"n_layers": cfg.depth}
    if name in reference.CONFIGS:
        ref = getattr(reference, name)(img_size=cfg.img_size, **overrides).eval()
        timm_model = timm_from_reference(ref)
        notes = ["reference-eager: nn.TransformerEncoder's own fast path (eval, inference_mode)", PRENORM_NOTE]
    else:
        import timm

        ref, notes = None, []
        timm_model = timm.create_model(name, pretrained=False, img_size=cfg.img_size,
                                       **({} if cfg.depth is None else {"depth": cfg.depth})).eval()
    dtype = DTYPES[cfg.dtype]
    for m in (ref, timm_model):
        if m is not None:
            m.to(device=cfg.device, dtype=dtype)
    return Subject(name, ref, timm_model, cfg.device, cfg.compile_mode, cfg.compile_on_cpu, notes)
