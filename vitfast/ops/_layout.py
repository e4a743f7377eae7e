"""Layout helpers shared by the ops."""
from __future__ import annotations

from torch import Tensor


def as_rows(t: Tensor, width: int) -> Tensor:
    """A 2-D [rows, width] view with unit column stride; copies only when no such view exists."""
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(1) == 1 or t2.shape[0] == 0 else t2.contiguous()
