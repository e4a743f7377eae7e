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
TRAIN_NOTE = ("training rows: parameters in fp32, the step under torch.autocast in the run's dtype (none for fp32); "
              "every dropout set to 0 so that all rows run the same step (timm's default; "
              "nn.TransformerEncoderLayer's own default is 0.1)")


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
    training: bool = False  # train mode with fp32 parameters, for the training-step rows


def _without_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0


def build_subject(name: str, cfg: Config, training: bool = False) -> Subject:
    """The model, seeded, on the device, and its timm twin.

    For inference: in eval, in the run's dtype. For training (``training``): in train mode with fp32
    parameters and no dropout; the run's dtype is then the autocast dtype of the step.
    """
    torch.manual_seed(cfg.seed)
    overrides = {} if cfg.depth is None else {"n_layers": cfg.depth}
    if name in reference.CONFIGS:
        ref = getattr(reference, name)(img_size=cfg.img_size, **overrides).eval()
        timm_model = timm_from_reference(ref)
        fast_path = "reference-eager: nn.TransformerEncoder's own fast path (eval, inference_mode)"
        notes = [PRENORM_NOTE] if training else [fast_path, PRENORM_NOTE]
    else:
        import timm

        ref, notes = None, []
        timm_model = timm.create_model(name, pretrained=False, img_size=cfg.img_size,
                                       **({} if cfg.depth is None else {"depth": cfg.depth})).eval()
    dtype = torch.float32 if training else DTYPES[cfg.dtype]
    for m in (ref, timm_model):
        if m is not None:
            m.to(device=cfg.device, dtype=dtype)
            if training:
                _without_dropout(m)
                m.train()
    return Subject(name, ref, timm_model, cfg.device, cfg.compile_mode, cfg.compile_on_cpu,
                   notes + [TRAIN_NOTE] * training, training=training)
