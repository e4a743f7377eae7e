"""How a run measures: the timer, the peaks it reports against, and one row's first call, median and memory."""
from __future__ import annotations

import dataclasses
import functools
import gc
import statistics
import time
from typing import Callable

import torch
from torch import nn

from .implementations import Impl


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _set_grads_to_none(tensors: list[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


@dataclasses.dataclass(frozen=True)
class Timer:
    """Median milliseconds of a call: ``do_bench`` on CUDA, a host clock around synchronous CPU work."""

    device: torch.device
    quick: bool

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return f"triton.testing.do_bench median (warmup {self._budget[0]} ms, rep {self._budget[1]} ms)"
        return f"time.perf_counter median of {self._budget[1]} synchronous CPU calls after {self._budget[0]} warm-up"

    @property
    def _budget(self) -> tuple[int, int]:
        if self.device.type == "cuda":
            return (10, 40) if self.quick else (25, 100)
        return (1, 5) if self.quick else (2, 10)

    def __call__(self, fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> float:
        """``grad_to_none``: tensors whose ``.grad`` is set to None before each timed call, outside its time."""
        warmup, rep = self._budget
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(rep):
            _set_grads_to_none(grad_to_none)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3


def measure_peaks(device: torch.device, timer: Timer) -> dict:
    """The peaks the run reports against: matmul TFLOP/s and copy GB/s (bytes read plus written)."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024  # on the CPU, large enough that call overhead does not dominate
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU bf16 matmul is no meaningful peak
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    mm_ms = timer(functools.partial(torch.mm, a, b, out=c))  # partial: the names go at the del below
    del a, b, c
    elems = (1 << 28) if cuda else (1 << 22)  # 1 GiB / 16 MiB of fp32
    src = torch.randn(elems, device=device)
    dst = torch.empty_like(src)
    copy_ms = timer(functools.partial(dst.copy_, src))
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return {"matmul_tflops": 2 * n ** 3 / mm_ms / 1e9, "matmul_shape": f"{n}x{n}x{n}",
            "matmul_dtype": str(dtype).replace("torch.", ""), "copy_gbs": nbytes / copy_ms / 1e6,
            "copy_mib": nbytes / 2 / 2 ** 20}


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def release_memory(device: torch.device) -> None:
    """Collect what the last measurement left, so the next one starts from the same free memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_row(impl: Impl, x: torch.Tensor, timer: Timer) -> dict:
    """First call (compile, autotune, capture) timed apart; then the steady-state median.

    Peak memory: the most allocated from the start of the batch's setup through two calls, counting
    the implementation's weights (CUDA only). A training step (``impl.zero_grads``) starts each of
    those calls, and each timed one, with the gradients set to None, so every call allocates them anew.
    """
    device = x.device
    grads = list(impl.module.parameters()) if impl.zero_grads else None
    _set_grads_to_none(grads)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    fn = impl.prepare(x)
    fn()
    _sync(device)  # a host clock is right here: this is wall time of setup work, synchronised
    first_call_s = time.perf_counter() - t0
    _set_grads_to_none(grads)
    fn()
    _sync(device)
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base + _param_bytes(impl.module)) / 2 ** 20
    ms = timer(fn, grads)
    _set_grads_to_none(grads)
    return {"median_ms": ms, "peak_mem_mib": peak, "first_call_s": first_call_s}
