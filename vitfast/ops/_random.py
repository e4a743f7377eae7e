"""Dropout's seeds and its probability argument, shared by the ops that drop inside their kernels."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor


def check_dropout_p(name: str, p: object) -> float:
    """``p`` as a float in [0, 1], or an error naming the argument."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability between 0 and 1, got {p!r}")
    return float(p)


def draw_seed(device: torch.device) -> Tensor:
    """One int64 Philox key for one dropping launch, drawn from PyTorch's default generator for
    ``device`` (so ``torch.manual_seed`` makes a run reproducible and every call advances it). It stays
    a tensor on the device: the kernel loads it, so there is no host synchronisation and a CUDA graph
    replays a fresh draw."""
    return torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64, device=device)


def keep_scale(p: float) -> float:
    """What a kept element is multiplied by: 1 / (1 - p); 0 when p = 1 (everything dropped)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0
