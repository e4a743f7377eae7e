"""Host time of a forward under the stand-in driver: launches counted at the launcher, the clock's median,
and the CPU arithmetic that the PyTorch operators left in the model do (work a GPU would do, not its host).

Every figure is taken with one intra-op thread under ``torch.inference_mode`` (what ``python -m vitfast
bench`` times). ``host_us_per_forward`` is the wall-clock median less that arithmetic; both are kept,
and so is the median of the thread's CPU time (``host_cpu_us_per_forward`` less the arithmetic), which
the scheduler's preemptions on a busy machine do not inflate. Where the two medians disagree by more
than 5%, the timing is taken again, up to three times in all, and the closest try is kept.

>>> with host_driver.active() as drv:                              # doctest: +SKIP
...     row = steady_state(model, x, drv, repeats=50)
>>> row["launches_per_forward"], row["host_us_per_forward"]
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .host_driver import StandInDriver

WARMUP = 3  # calls before the timed ones
# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4

# aten operators that only allocate. These and the operators whose results are views of their inputs
# (reshape, select, dropout in eval) cost dispatch, as on a GPU host; every other aten operator left in a
# forward (a GEMM, a cat, an add that PyTorch computes) does CPU arithmetic.
_ALLOCATORS = frozenset(("empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"))
# Replays of one captured operator: enough to take a median, within about this long.
_REPLAY_S = 0.3


def cache_freed_memory() -> bool:
    """Make glibc's malloc keep and reuse freed memory, as CUDA's caching allocator does; False where
    the C library is not glibc (nothing changed).

    By default every allocation above 32 MiB is an ``mmap`` and its free a ``munmap``: about 13 µs per
    tensor on this 2-core machine against 1 µs for a small one, so the stand-in's host time grew with
    the batch (ViT-B with no head: 10.1 ms per forward at batch 1, 13.6 ms at 256) where a GPU's caching
    allocator does not. Served from the heap and never trimmed, the activations cost what small
    tensors cost (10.1 ms at 256). For this process's lifetime; call it before timing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def median_us(fn: Callable[[], object], repeats: int, warmup: int = WARMUP) -> tuple[float, float]:
    """Medians, in µs over ``repeats`` calls of ``fn()`` after ``warmup``, of the wall clock
    (``time.perf_counter_ns``) and of this thread's CPU time (``time.thread_time_ns``). On an idle core
    they agree; on a busy machine the scheduler's time slices (a few ms) inflate the wall clock only."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    gc.collect()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
        fn()
        cpu.append(time.thread_time_ns() - start_cpu)
        wall.append(time.perf_counter_ns() - start)
    return statistics.median(wall) / 1e3, statistics.median(cpu) / 1e3


def settled_median_us(fn: Callable[[], object], repeats: int, tries: int = 3,
                      tolerance: float = 0.05) -> tuple[float, float]:
    """``median_us``, taken again (at most ``tries`` times in all) while the wall-clock median exceeds the
    CPU-time median by more than ``tolerance``: other processes took the core. The try whose two
    medians agree best is kept; where none agrees, the figures say so (compare them)."""
    best = median_us(fn, repeats)
    for _ in range(tries - 1):
        if best[0] <= (1 + tolerance) * best[1]:
            break
        again = median_us(fn, repeats)
        best = min(best, again, key=lambda wall_cpu: wall_cpu[0] / wall_cpu[1])
    return best


def _storages(tree: object) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


class _Capture(TorchDispatchMode):
    """Records the aten operators of a forward that do arithmetic, with their arguments. Operators run
    inside vitfast's custom ops are not seen (the mode is off while it handles the custom op)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch._ops.OpOverload, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (func.namespace == "aten" and func.overloadpacket.__name__ not in _ALLOCATORS
                and not _storages(out) <= _storages((args, kwargs))):
            self.calls.append((func, args, kwargs))
        return out


def _replay_us(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> tuple[float, float]:
    """Medians (wall, thread CPU time) of one operator call on the arguments it had in the forward; an
    operator that writes into an argument writes into copies (taken once, outside the timing)."""
    if func._schema.is_mutable:
        args, kwargs = tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, (args, kwargs))
    start = time.perf_counter()
    func(*args, **kwargs)
    once = time.perf_counter() - start
    repeats = max(3, min(50, int(_REPLAY_S / max(once, 1e-6))))
    return median_us(lambda: func(*args, **kwargs), repeats, warmup=0)


def cpu_arithmetic(fn: Callable[[], object]) -> dict[str, dict[str, float]]:
    """{aten operator: {"calls", "us", "cpu_us"}} of the CPU arithmetic in ``fn()``: the operators that
    do more than allocate or make a view, captured in one call of ``fn`` and each replayed alone on the
    same arguments (median wall and thread CPU time). A replay includes the operator's dispatch, a few µs
    that a GPU host pays too, so a model with many of them looks slightly faster than it is; and its
    inputs have been read before, where the forward's are fresh pages, so the arithmetic is if anything
    underestimated."""
    with _Capture() as capture:
        fn()
    ops: dict[str, dict[str, float]] = {}
    for func, args, kwargs in capture.calls:
        op = ops.setdefault(f"aten::{func.overloadpacket.__name__}", {"calls": 0, "us": 0.0, "cpu_us": 0.0})
        wall, cpu = _replay_us(func, args, kwargs)
        op["calls"] += 1
        op["us"] += wall
        op["cpu_us"] += cpu
    return dict(sorted(ops.items(), key=lambda kv: -kv[1]["us"]))


def steady_state(model: nn.Module, x: torch.Tensor, drv: StandInDriver, repeats: int) -> dict:
    """Launches and host time of ``model(x)`` once compiled (the caller has made ``drv`` active);
    ``launches_by_kernel`` maps an index into ``drv.kernels`` to its launches per forward."""
    calls = 0

    def forward() -> object:
        nonlocal calls
        calls += 1
        return model(x)

    with torch.inference_mode():
        forward()  # compiles what this batch needs
        before = [k.launches for k in drv.kernels]
        forward()
        by_kernel = {i: k.launches - (before[i] if i < len(before) else 0) for i, k in enumerate(drv.kernels)}
        launches = sum(by_kernel.values())
        counted_from, calls = drv.launch_count(), 0
        wall, cpu = settled_median_us(forward, repeats)
        if drv.launch_count() - counted_from != launches * calls:
            raise RuntimeError(f"launches per forward changed while timing: {launches} in one forward, "
                               f"{drv.launch_count() - counted_from} in {calls}")
        ops = cpu_arithmetic(forward)
    arithmetic = sum(op["us"] for op in ops.values())
    arithmetic_cpu = sum(op["cpu_us"] for op in ops.values())
    host = wall - arithmetic
    return {
        "launches_per_forward": launches,
        "host_us_per_forward": host,
        "host_us_per_launch": host / launches if launches else None,
        "wall_us_per_forward": wall,
        "thread_cpu_us_per_forward": cpu,
        "host_cpu_us_per_forward": cpu - arithmetic_cpu,
        "cpu_arithmetic_us_per_forward": arithmetic,
        "cpu_arithmetic_ops": ops,
        "launches_by_kernel": {i: n for i, n in by_kernel.items() if n},
    }
