"""The one function through which every launcher in kernels/ starts a kernel.

Launchers choose the config (``_select``), compute the grid from it as a concrete tuple and pass the
kernel's arguments and keywords here, so what happens at a launch (Triton's binder and cache today; a
direct launch of the compiled kernel, precompiling) is decided in one place.
"""
from __future__ import annotations

from typing import Any

from . import _precompile


def launch(fn: Any, grid: tuple[int, ...], args: tuple, meta: dict) -> None:
    """Run the ``@triton.jit`` function ``fn`` over ``grid`` programs: ``fn[grid](*args, **meta)``, where
    ``meta`` holds the constexprs, the config's tile sizes and its num_warps and num_stages. Inside
    ``_precompile.compiling()`` the kernel is compiled for these arguments and not run."""
    if _precompile.active():
        fn.warmup(*args, grid=grid, **meta)
        return
    fn[grid](*args, **meta)
