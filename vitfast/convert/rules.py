"""How a conversion rule recognises a module and swaps it for its stand-in.

A rule matches a module by its exact class, named by where it is defined (so timm, torchvision and
transformers need not be installed, nor imported, to be recognised), never by its name alone: a
subclass or a look-alike may compute something else. The swap changes the object's class in place, to
a subclass of the class it had (under the same name), so the object keeps its identity, parameters,
hooks and methods.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..modules._fused import original_class, stand_in

Location = tuple[str, str]  # (module, qualname) where a class is defined


def location(cls: type) -> Location:
    return cls.__module__, cls.__qualname__


def is_exactly(m: object, *locations: Location) -> bool:
    """Whether ``m``'s class is exactly one of the classes defined at ``locations``."""
    return m is not None and location(type(m)) in locations


@dataclass(frozen=True)
class Rule:
    classes: tuple[Location, ...]  # the exact classes this rule converts
    reason: Callable[[nn.Module], "str | None"]  # why a matched module cannot be fused, or None
    stand_in: type  # vitfast's class that computes the fused forward (combined with the original class)
    parent: tuple[Location, str] | None = None  # (parent's class, attribute name) the module must sit at
    # Whether it converts a module that a stand-in above it runs itself: False for a module whose exact
    # class that stand-in's checks compare (an nn.MultiheadAttention inside a fused encoder block).
    inside_fused: bool = True

    def matches(self, module: nn.Module, parent: nn.Module | None, name: str) -> bool:
        if location(type(module)) not in self.classes:
            return False
        # The parent's class as it was: a parent converted before its children is a stand-in by now.
        return self.parent is None or (parent is not None and location(original_class(parent)) == self.parent[0]
                                       and name == self.parent[1])

    def swap(self, module: nn.Module) -> nn.Module:
        module.__class__ = stand_in(type(module), self.stand_in)
        return module


def head_dim_reason(width: int, heads: int) -> str | None:
    """Why the attention kernel cannot tile heads of ``width // heads``, or None."""
    if heads < 1 or width % heads:
        return f"width {width} does not split into {heads} heads"
    try:
        from ..kernels.attention import HEAD_DIMS
    except ImportError:  # no Triton here: every op runs its PyTorch fallback anyway
        return None
    if width // heads not in HEAD_DIMS:
        return f"head size {width // heads} is not one of the attention kernel's {HEAD_DIMS}"
    return None

