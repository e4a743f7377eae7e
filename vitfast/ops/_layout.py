"""Layout helpers shared by the ops."""
from __future__ import annotations

import torch
from torch import Tensor


def as_rows(t: Tensor, width: int) -> Tensor:
    """A 2-D [rows, width] view with unit column stride; copies only when no such view exists."""
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(1) == 1 or t2.shape[0] == 0 else t2.contiguous()


def as_result(t: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """``t`` (a kernel's fresh output, used by nothing else) reshaped to the result's ``shape`` without
    a copy and without becoming a view of it, as ``aten::matmul`` returns its reshaped product: what
    PyTorch's own layers return is a fresh tensor, and wrappers such as FSDP2 break on a module that
    returns a view once the caller modifies it in place."""
    return torch.ops.aten._unsafe_view(t, shape)
