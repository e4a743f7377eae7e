"""The one function through which every launcher in kernels/ starts a kernel.

Launchers choose the config (``_select``), compute the grid from it as a concrete tuple and pass the
kernel's arguments and keywords here, so what happens at a launch (Triton's binder and cache today; a
direct launch of the compiled kernel later) is decided in one place.
"""
from __future__ import annotations

from typing import Any


def launch(fn: Any, grid: tuple[int, ...], args: tuple, meta: dict) -> None:
    """Run the ``@triton.jit`` function ``fn`` over ``grid`` programs: ``fn[grid](*args, **meta)``, where
    ``meta`` holds the constexprs, the config's tile sizes and its num_warps and num_stages."""
    fn[grid](*args, **meta)
