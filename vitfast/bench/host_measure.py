"""Host time of a forward under the stand-in driver: launches counted at the launcher, the clock's median,
and the CPU arithmetic that the PyTorch operators left in the model do (work a GPU would do, not its host).

Every figure is taken with one intra-op thread under ``torch.inference_mode`` (what ``python -m vitfast
bench`` times), as medians of ``time.perf_counter_ns`` (wall) and ``time.thread_time_ns`` (this thread's
CPU time, which other processes taking the core do not inflate). The forward, each arithmetic operator
replayed alone and the eager baseline are timed in alternating rounds, so that all of them see the same
machine: on this shared 2-core VM whole-machine slow spells of seconds come and go, doubling both clocks
(measured: ViT-B 10.5 to 22 ms and its eager twin 1.6 to 3.1 ms in the same spell, their ratio 6.2 to
7.1). ``host_us_per_forward`` is the forward's median less the medians of its arithmetic operators.

>>> with host_driver.active() as drv:                              # doctest: +SKIP
...     row = steady_state(model, x, drv, repeats=50, baseline=lambda: twin(tx), baseline_repeats=200)
>>> row["launches_per_forward"], row["host_us_per_forward"], row["eager_host_us_per_forward"]
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import statistics
import time
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .host_driver import StandInDriver

WARMUP = 3  # calls of each timed function before the timed ones
ROUNDS = 10
# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# aten operators that only allocate. These and the operators whose results are views of their inputs
# (reshape, select, dropout in eval) cost dispatch, as on a GPU host; every other aten operator left in a
# forward (a GEMM, a cat, an add that PyTorch computes) does CPU arithmetic.
_ALLOCATORS = frozenset(("empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"))


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


@dataclasses.dataclass
class _Clock:
    """The times of one function's calls, in ns: wall clock and this thread's CPU time."""

    wall: list[int] = dataclasses.field(default_factory=list)
    cpu: list[int] = dataclasses.field(default_factory=list)

    def time(self, fn: Callable[[], object]) -> None:
        start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
        fn()
        self.cpu.append(time.thread_time_ns() - start_cpu)
        self.wall.append(time.perf_counter_ns() - start)

    def medians_us(self) -> tuple[float, float]:
        return statistics.median(self.wall) / 1e3, statistics.median(self.cpu) / 1e3


def interleaved_medians_us(fns: dict[str, Callable[[], object]], repeats: dict[str, int],
                           rounds: int = ROUNDS) -> dict[str, tuple[float, float]]:
    """{name: (wall, CPU) median µs} of each function, called ``repeats[name]`` times in all (rounded up
    to whole rounds), in ``rounds`` rounds that each call every function in turn, after ``WARMUP`` calls."""
    if any(n < 1 for n in repeats.values()) or rounds < 1:
        raise ValueError(f"repeats and rounds must be >= 1, got {repeats} and {rounds}")
    for fn in fns.values():
        for _ in range(WARMUP):
            fn()
    gc.collect()
    clocks = {name: _Clock() for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(-(-repeats[name] // rounds)):
                clocks[name].time(fn)
    return {name: clock.medians_us() for name, clock in clocks.items()}


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


def arithmetic_replays(fn: Callable[[], object]) -> list[tuple[str, Callable[[], object]]]:
    """(aten operator, a call that replays it) for each operator of one ``fn()`` that does CPU arithmetic:
    more than allocate or make a view. A replay runs the operator alone on the arguments it had in the
    forward (an operator that writes into an argument writes into copies, taken here).

    A replay includes the operator's dispatch, a few µs that a GPU host pays too, so a model with many
    of them looks slightly faster than it is; and its inputs have been read before, where the forward's
    are fresh pages, so the arithmetic is if anything underestimated.
    """
    with _Capture() as capture:
        fn()
    replays = []
    for func, args, kwargs in capture.calls:
        if func._schema.is_mutable:
            args, kwargs = tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, (args, kwargs))
        replays.append((f"aten::{func.overloadpacket.__name__}",
                        lambda func=func, args=args, kwargs=kwargs: func(*args, **kwargs)))
    return replays


def call_us(model: nn.Module, x: torch.Tensor, module: nn.Module, calls: int = 400) -> float:
    """The median wall time, in µs, of one call of ``module`` (a submodule of ``model``) alone, on the
    arguments it got in a forward ``model(x)``: host time with no PyTorch arithmetic around it, which
    a whole forward's figure has to subtract (noisy where that arithmetic is large)."""
    seen: list = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    try:
        with torch.inference_mode():
            model(x)
    finally:
        handle.remove()
    args, kwargs = seen[0]
    clock = _Clock()
    with torch.inference_mode():
        for _ in range(WARMUP):
            module(*args, **kwargs)
        for _ in range(calls):
            clock.time(lambda: module(*args, **kwargs))
    return clock.medians_us()[0]


def steady_state(model: nn.Module, x: torch.Tensor, drv: StandInDriver, repeats: int,
                 baseline: Callable[[], object] | None = None, baseline_repeats: int = 0) -> dict:
    """Launches and host time of ``model(x)`` once compiled (the caller has made ``drv`` active), and the
    eager host time of ``baseline()`` timed in the same rounds; ``launches_by_kernel`` maps an index into
    ``drv.kernels`` to its launches per forward."""
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
        replays = arithmetic_replays(forward)
        fns = {"forward": forward, **{f"{i}:{name}": replay for i, (name, replay) in enumerate(replays)}}
        counts = dict.fromkeys(fns, repeats)
        if baseline is not None:
            fns["baseline"], counts["baseline"] = baseline, baseline_repeats
        counted_from, calls = drv.launch_count(), 0
        medians = interleaved_medians_us(fns, counts)
        if drv.launch_count() - counted_from != launches * calls:
            raise RuntimeError(f"launches per forward changed while timing: {launches} in one forward, "
                               f"{drv.launch_count() - counted_from} in {calls}")
    ops: dict[str, dict[str, float]] = {}
    for key, (wall, cpu) in medians.items():
        if ":" in key:
            op = ops.setdefault(key.split(":", 1)[1], {"calls": 0, "us": 0.0, "cpu_us": 0.0})
            op["calls"] += 1
            op["us"] += wall
            op["cpu_us"] += cpu
    wall, cpu = medians["forward"]
    arithmetic = sum(op["us"] for op in ops.values())
    host, host_cpu = wall - arithmetic, cpu - sum(op["cpu_us"] for op in ops.values())
    row = {
        "launches_per_forward": launches,
        "host_us_per_forward": host,
        "host_us_per_launch": host / launches if launches else None,
        "host_cpu_us_per_forward": host_cpu,
        "wall_us_per_forward": wall,
        "thread_cpu_us_per_forward": cpu,
        "cpu_arithmetic_us_per_forward": arithmetic,
        "cpu_arithmetic_ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["us"])),
        "launches_by_kernel": {i: n for i, n in by_kernel.items() if n},
    }
    if baseline is not None:
        eager, eager_cpu = medians["baseline"]
        row.update(eager_host_us_per_forward=eager, eager_host_cpu_us_per_forward=eager_cpu,
                   host_over_eager=host / eager, host_cpu_over_eager_cpu=host_cpu / eager_cpu)
    return row
