"""The config of each launch: the rule for the GPU's architecture and the launch's key.

A launcher describes its launch by a key (``_configs``) and asks ``config`` for the config: the rule's
answer (the fixed tile under the interpreter) is computed on the first launch of each (kernel,
device, key) and remembered for the life of the process, so later launches pay a dictionary lookup.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import triton

from ._tuning import device_arch, interpreting


@dataclass(eq=False)
class Kernel:
    """A kernel whose launch config is chosen per launch key.

    name: what reports call it; fn: the ``@triton.jit`` function; rule(arch, key), candidates(key),
    interpreter(key): from ``_configs``.
    """
    name: str
    fn: Any
    rule: Callable[[int | str, tuple], triton.Config]
    candidates: Callable[[tuple], list[triton.Config]]
    interpreter: Callable[[tuple], triton.Config]
    chosen: dict[tuple[int, tuple], triton.Config] = field(default_factory=dict)


_kernels: list[Kernel] = []  # every kernel declared, for reports (benchmarks/kernel_stats.py)


def kernel(name: str, fn: Any, rule: Callable[[int | str, tuple], triton.Config],
           candidates: Callable[[tuple], list[triton.Config]], interpreter: Callable[[tuple], triton.Config]) -> Kernel:
    """Declare a kernel (at import of its module); see ``Kernel``."""
    k = Kernel(name, fn, rule, candidates, interpreter)
    _kernels.append(k)
    return k


def tile_meta(config: triton.Config) -> dict:
    """A config's launch keywords: its constexprs, num_warps and num_stages."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def config(k: Kernel, device: int, key: tuple) -> triton.Config:
    """The config to launch ``k`` with for ``key`` on ``device`` (``Tensor.get_device()``)."""
    chosen = k.chosen.get((device, key))
    if chosen is None:
        chosen = k.interpreter(key) if interpreting() else k.rule(device_arch(device), key)
        k.chosen[device, key] = chosen
    return chosen
