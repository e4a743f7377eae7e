"""Stride helpers shared by the launchers."""
from __future__ import annotations

import torch


def vector_stride(t: torch.Tensor | None) -> int:
    """Element stride of a 1-D operand: kernels read vectors through it, so a slice (stride 2) and
    one value broadcast with ``expand`` (stride 0) read right; 0 for an absent operand."""
    return 0 if t is None else t.stride(0)
