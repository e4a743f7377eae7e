from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ._fused import Fused
from ._share import share_as


class FusedLayerNorm(Fused):
    """The fused forward of ``nn.LayerNorm`` and its subclasses that compute the same thing (timm's
    ``LayerNorm``): vitfast's LayerNorm kernel over the last dimension."""

    _vitfast_bypasses = ()

    def _vitfast_unsupported(self) -> str | None:
        if len(self.normalized_shape) != 1:
            return f"normalisation over {len(self.normalized_shape)} dimensions is not fused"
        if not self.eps >= 0:
            return f"eps {self.eps} is negative"
        return None

    def _fused_forward(self, input: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.layer_norm(input, self.weight, self.bias, self.eps, residual=residual)

    def _vitfast_fallback(self, input: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self._vitfast_original.forward(self, input)
        s = input + residual
        return self._vitfast_original.forward(self, s), s


class LayerNorm(FusedLayerNorm, nn.LayerNorm):
    """``nn.LayerNorm`` on vitfast's fused kernel: same constructor, parameters and ``state_dict``.

    ``forward(x)`` returns the normalised ``x``; ``forward(x, residual)`` normalises ``x + residual``
    and returns ``(y, x + residual)``, the add fused into the same pass. Normalising over more than
    one dimension runs PyTorch's own code, with one warning.

    >>> ln = LayerNorm(768)
    >>> ln.load_state_dict(torch.nn.LayerNorm(768).state_dict())
    <All keys matched successfully>
    """

    _vitfast_original = nn.LayerNorm

    @classmethod
    def from_torch(cls, norm: nn.LayerNorm) -> "LayerNorm":
        """A vitfast LayerNorm sharing ``norm``'s parameters (no copy)."""
        return share_as(norm, cls)
