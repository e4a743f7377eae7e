"""A stand-in for Triton's CUDA driver: the GPU code path on CPU tensors, with launches counted, not run.

While it is active (``triton.runtime.driver.set_active``), vitfast's ops send CPU tensors down the path
CUDA tensors take (``vitfast.runtime``), and everything Triton does between a ``kernel[grid](...)`` call
and the driver runs for real: the JIT's binder and argument specialization (16-byte alignment of the
CPU tensors' pointers, divisibility of the integers), its kernel cache, the NVIDIA backend compiling for
``GPUTarget("cuda", 90, 32)`` (TTIR, TTGIR, LLVM, PTX, then a cubin from the wheel's ptxas) and
``CompiledKernel``'s loading checks against H100's limits. Only the driver's side is stood in for:
the current device (0) and stream (0), H100's device properties, ``load_binary`` (a fake handle, with
the cubin's real register and spill counts) and the launcher, which counts the launch and returns.
What a real launch adds on top (the C launcher packing the arguments, ``cuLaunchKernelEx``, a few µs
each on an H100 host) is not in a figure taken here.

Tuning would time no-op launches: the stand-in's benchmarker runs each candidate once (so it compiles,
as on a GPU), counted in ``benchmark_calls``, and calls every candidate equally fast. vitfast's kernels
take their configs from rules (``kernels/_configs.py``) unless a tuning session runs, so a forward
measured here runs the configs a GPU's first call would.

>>> from vitfast.bench import host_driver
>>> with host_driver.active() as drv:             # doctest: +SKIP
...     model(x)                                  # CPU tensors, compiled for sm_90, nothing launched
...     print(drv.launch_count(), [k.name for k in drv.kernels])
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.backends.nvidia.driver import ty_to_cpp
from triton.runtime import driver as triton_driver

from .. import runtime
from .cubin import elf_resources

TARGET = GPUTarget("cuda", 90, 32)
# What CUDA reports for an H100 SXM (cuDeviceGetAttribute; clocks in kHz, bus width in bits).
H100_PROPERTIES = {
    "max_shared_mem": 232448, "max_num_regs": 65536, "multiprocessor_count": 132, "warpSize": 32,
    "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120,
}
DEVICE = 0
STREAM = 0


@dataclasses.dataclass
class LoadedKernel:
    """One compiled kernel variant that the JIT loaded through the stand-in, and its launches."""

    jit_function: Any  # the JITFunction it was compiled from
    src: Any  # Triton's ASTSource: the signature and constexprs it was specialized for
    metadata: Any  # Triton's kernel metadata: num_warps, num_stages, shared (dynamic shared memory, bytes)
    cubin: bytes = b""
    registers: int = 0
    spilled_bytes: int = 0
    launches: int = 0

    @property
    def name(self) -> str:
        return self.metadata.name

    def constexprs(self) -> dict[str, Any]:
        """The constexpr arguments it was compiled for, by name."""
        names = self.jit_function.arg_names
        out = {}
        for key, value in self.src.constants.items():
            index = key[0] if isinstance(key, tuple) else key
            name = names[index] if isinstance(index, int) else index
            out[name] = value.value if hasattr(value, "value") else value
        return out


class _Launcher:
    """What the stand-in gives ``CompiledKernel`` as its launcher: one count per launch, no work.

    Called as Triton 3.6 and 3.8 call a CUDA launcher; like the real one it launches nothing for an
    empty grid and calls the launch hooks (profilers) that Triton passes."""

    __slots__ = ("kernel", "owner")

    def __init__(self, kernel: LoadedKernel, owner: "StandInDriver"):
        self.kernel, self.owner = kernel, owner

    def __call__(self, grid_x: int, grid_y: int, grid_z: int, stream: int, function: int, packed_metadata: Any,
                 launch_metadata: Any, enter_hook: Any, exit_hook: Any, *args: Any) -> None:
        if grid_x * grid_y * grid_z <= 0:
            return
        if enter_hook is not None:
            enter_hook(launch_metadata)
        self.kernel.launches += 1
        if self.owner.trace is not None:
            self.owner.trace.append((self.kernel, (grid_x, grid_y, grid_z), args))
        if exit_hook is not None:
            exit_hook(launch_metadata)


class _Utils:
    """The stand-in's ``driver.utils``: loading, unloading and the device's properties."""

    def __init__(self, owner: "StandInDriver"):
        self._owner = owner

    def load_binary(self, name: str, cubin: bytes, shared: int, device: int) -> tuple[int, int, int, int, int]:
        """(module, function, registers, spills in 4-byte words, max threads per block), as the CUDA
        driver's ``load_binary`` returns them; the handles are indices into ``StandInDriver.kernels``."""
        kernel = self._owner.kernels[-1]  # CompiledKernel makes its launcher just before it loads
        if kernel.name != name:
            raise RuntimeError(f"stand-in driver: loading {name!r}, but the last launcher made was for {kernel.name!r}")
        res = elf_resources(cubin, name)
        kernel.cubin, kernel.registers, kernel.spilled_bytes = cubin, res.registers, res.stack_bytes
        handle = len(self._owner.kernels)
        return handle, handle, res.registers, res.stack_bytes // 4, res.max_threads

    def unload_module(self, module: int) -> None:
        """Nothing was loaded."""

    def get_device_properties(self, device: int) -> dict[str, int]:
        return dict(H100_PROPERTIES)

    def set_printf_fifo_size(self, size: int) -> None:
        """No device printf buffer to size."""


class StandInDriver(DriverBase):
    """Answers what Triton 3.6 and 3.8 ask of the CUDA driver between a JIT call and the launch.

    ``kernels`` lists every variant loaded while it was active, in load order, each with its launch
    count; ``launch_count()`` sums them. While ``trace`` is a list, each launch appends to it
    ``(kernel, grid, arguments)``: the arguments as the launcher got them (tensors from the JIT, addresses
    from a settled call's replay).
    """

    def __init__(self) -> None:
        super().__init__()
        self.kernels: list[LoadedKernel] = []
        self.trace: list[tuple[LoadedKernel, tuple[int, int, int], tuple]] | None = None
        self.benchmark_calls = 0
        self.utils = _Utils(self)

    @classmethod
    def is_active(cls) -> bool:
        return False  # never Triton's choice of default driver; only set_active makes it current

    def launcher_cls(self, src: Any, metadata: Any) -> _Launcher:
        """Called by ``CompiledKernel`` as it loads a kernel, just before ``utils.load_binary``."""
        kernel = LoadedKernel(src.fn, src, metadata)
        self.kernels.append(kernel)
        return _Launcher(kernel, self)

    def launch_count(self) -> int:
        return sum(k.launches for k in self.kernels)

    def get_current_device(self) -> int:
        return DEVICE

    def set_current_device(self, device: int) -> None:
        if device != DEVICE:
            raise ValueError(f"device must be {DEVICE} under the stand-in driver, got {device!r}")

    def get_current_stream(self, device: int | None = None) -> int:
        return STREAM

    def get_device_capability(self, device: int | None = None) -> tuple[int, int]:
        return TARGET.arch // 10, TARGET.arch % 10

    def get_current_target(self) -> GPUTarget:
        return TARGET

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")  # where the tensors that stand in for CUDA tensors live

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty_to_cpp(ty)

    def get_benchmarker(self) -> Callable[..., Any]:
        return self._benchmark

    def _benchmark(self, kernel_call: Callable[[], object], *, quantiles: Sequence[float] | None = None,
                   **_: Any) -> list[float] | float:
        """Runs the candidate once and reports it as taking no time: nothing can be timed here."""
        self.benchmark_calls += 1
        kernel_call()
        return [0.0] * len(quantiles) if quantiles else 0.0


_current: StandInDriver | None = None
_previous: Any = None  # the driver to restore, None if Triton had chosen none yet


def activate() -> StandInDriver:
    """Make a fresh stand-in Triton's active driver and send vitfast's CPU tensors down the Triton path.

    Refused under ``TRITON_INTERPRET=1`` (the interpreter has replaced the kernels with Python, so
    nothing would compile), once CUDA is initialized in this process (the JIT caches kernels per device
    index, and the stand-in answers device 0) and while a stand-in is already active.
    """
    global _current, _previous
    if runtime.interpreter_enabled():
        raise RuntimeError("the stand-in driver needs compiled kernels: unset TRITON_INTERPRET (it is "
                           "'1', so Triton's interpreter replaced every kernel with Python)")
    if torch.cuda.is_initialized():
        raise RuntimeError("the stand-in driver answers device 0, whose kernels the JIT may already hold "
                           "for the real GPU: use it in a process that has not initialized CUDA")
    if _current is not None:
        raise RuntimeError("a stand-in driver is already active: deactivate() it first")
    _current, _previous = StandInDriver(), triton_driver._active  # DriverConfig has no getter that creates none
    triton_driver.set_active(_current)
    runtime.set_stand_in_driver(True)
    return _current


def deactivate() -> None:
    """Undo ``activate``: forget the kernels the JIT compiled under the stand-in (their handles are fake,
    and a real driver must compile its own) and restore the driver that was active before."""
    global _current, _previous
    if _current is None:
        raise RuntimeError("deactivate() without a matching activate()")
    for fn in {id(k.jit_function): k.jit_function for k in _current.kernels}.values():
        cache = fn.device_caches.pop(DEVICE, None)
        for compiled in (cache[0].values() if cache else ()):
            compiled.module = None  # so that CompiledKernel.__del__ unloads nothing through the real driver
    triton_driver.set_active(_previous)
    runtime.set_stand_in_driver(False)
    _current, _previous = None, None


@contextmanager
def active() -> Iterator[StandInDriver]:
    """``activate()`` for the block, ``deactivate()`` after it; yields the stand-in."""
    drv = activate()
    try:
        yield drv
    finally:
        deactivate()
