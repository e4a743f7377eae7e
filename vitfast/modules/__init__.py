"""Drop-in ``nn.Module``s running on vitfast's ops, with the parameters and ``state_dict`` of the
modules they replace."""
from .layer_norm import LayerNorm

__all__ = ["LayerNorm"]
