"""What the kernel benchmarks share: one timed call per round, on a GPU the kernels' time."""
from __future__ import annotations

from typing import Callable

import torch

from vitfast import runtime


def time_calls(benchmark, fn: Callable[[], torch.Tensor], vitfast: bool, rounds: dict) -> torch.Tensor:
    """Time ``fn()`` under pytest-benchmark without autograd, one call per round; on a GPU each call
    waits for its kernels, so the median is their time and not the launch's. Asserts that ``fn``
    launched vitfast kernels exactly when ``vitfast`` (a baseline must not), and returns its output."""
    def timed():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    with torch.no_grad(), runtime.count_launches() as launches:
        out = benchmark.pedantic(timed, iterations=1, **rounds)
    assert bool(launches) == vitfast, f"launched {launches}"
    return out
