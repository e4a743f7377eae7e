"""Compiling ahead, in parallel: inside ``compiling()``, each launch compiles its kernel on a thread
pool instead of running it.

Triton compiles a kernel when a launch first needs it, one after the other: a first forward waits for
each of its kernels' compiles in turn. A pass over the model inside ``compiling()`` (its outputs are
meaningless: no kernel runs) hands every launch's compile to Triton's async-compile mode
(``triton.runtime._async_compile``, the same in Triton 3.6 and 3.8): the JIT binds the arguments,
specializes them and computes the cache key on the caller's thread and runs the compile, most of
which (the MLIR passes, LLVM, ptxas) releases the GIL, on the pool. Leaving the block waits for
every compile and puts the kernels into the JIT's cache, so the real pass launches without
compiling. A compile that fails is not raised here: the real launch compiles again and raises it.
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

_active = False


def active() -> bool:
    """Whether launches compile instead of running (``_launch.launch`` reads it)."""
    return _active


@contextlib.contextmanager
def compiling(workers: int | None = None) -> Iterator[None]:
    """Compile every launch inside the block on ``workers`` threads (default: one per CPU) and run
    none; on exit, wait until every kernel is compiled. One block at a time per process."""
    global _active
    if _active:
        raise RuntimeError("kernels are already being compiled ahead in this process")
    from triton.runtime._async_compile import AsyncCompileMode

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool, AsyncCompileMode(pool, ignore_errors=True):
        _active = True
        try:
            yield
        finally:
            _active = False
