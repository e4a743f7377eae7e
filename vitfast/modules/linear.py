"""``nn.Linear`` on vitfast's GEMM kernel: the classification head of a ViT vitfast runs, so that a
settled call of the whole model (``_replay.py``) replays its head too."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ._fused import Fused, Unfusable
from ._share import share_as


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # what the kernel computes in


class Linear(Fused, nn.Linear):
    """``nn.Linear`` whose forward is vitfast's ``linear`` op (bias in the epilogue): same constructor,
    parameters and ``state_dict``. Inputs ``nn.Linear`` would reject, or take with another dtype or
    device than the weight's outside autocast, run its own forward (and its own error).

    >>> head = Linear(768, 1000)
    >>> head.load_state_dict(torch.nn.Linear(768, 1000).state_dict())
    <All keys matched successfully>
    """

    _vitfast_original = nn.Linear
    _vitfast_bypasses = ()

    def _fused_forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if type(input) is not torch.Tensor or input.dim() == 0 or input.shape[-1] != self.in_features:
            raise Unfusable(f"input of shape {tuple(getattr(input, 'shape', ()))} for {self.in_features} features")
        if (input.device != weight.device or input.dtype not in _FLOATS or weight.dtype not in _FLOATS
                or (input.dtype != weight.dtype and not torch.is_autocast_enabled(input.device.type))):
            raise Unfusable(f"{input.dtype} input on {input.device} with {weight.dtype} weights on {weight.device}")
        return ops.linear(input, weight, self.bias)

    @classmethod
    def from_torch(cls, linear: nn.Linear) -> "Linear":
        """A vitfast Linear sharing ``linear``'s parameters (no copy)."""
        return share_as(linear, cls)
