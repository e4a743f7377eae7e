from __future__ import annotations

import torch
from torch import nn

from .. import ops, runtime
from ._share import share_as


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` on vitfast's fused kernel: same constructor, parameters and ``state_dict``.

    ``forward(x)`` returns the normalised ``x``; ``forward(x, residual)`` normalises ``x + residual``
    and returns ``(y, x + residual)``, the add fused into the same pass.

    >>> ln = LayerNorm(768)
    >>> ln.load_state_dict(torch.nn.LayerNorm(768).state_dict())
    <All keys matched successfully>
    """

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None):
        if len(self.normalized_shape) != 1:
            runtime.warn_once(
                f"LayerNorm:shape={self.normalized_shape}",
                f"vitfast.LayerNorm over {len(self.normalized_shape)} dimensions is not fused; using PyTorch",
            )
            if residual is None:
                return super().forward(input)
            s = input + residual
            return super().forward(s), s
        return ops.layer_norm(input, self.weight, self.bias, self.eps, residual=residual)

    @classmethod
    def from_torch(cls, norm: nn.LayerNorm) -> "LayerNorm":
        """A vitfast LayerNorm sharing ``norm``'s parameters (no copy)."""
        return share_as(norm, cls)
