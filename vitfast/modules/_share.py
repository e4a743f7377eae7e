from __future__ import annotations

import copy
from typing import TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


def share_as(module: nn.Module, cls: type[M]) -> M:
    """A new ``cls`` instance (a subclass of ``type(module)``) holding the same parameter and buffer
    objects as ``module``: weights are shared, not copied, and ``state_dict`` keys are unchanged.
    The containers (``_parameters``, ``_modules``, hooks) are fresh, so later edits to one module's
    structure do not leak into the other."""
    new = cls.__new__(cls)
    new.__dict__.update(
        {k: copy.copy(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()}
    )
    return new
