"""Where an op runs: compiled Triton, Triton's interpreter, or the plain-PyTorch fallback.

* CUDA tensors run the compiled Triton kernels.
* CPU tensors run the same kernels in Triton's interpreter when ``TRITON_INTERPRET=1`` was set
  before ``triton`` was imported (this is how CI, which has no GPU, tests every kernel).
* CPU tensors run the compiled kernels while a stand-in for Triton's CUDA driver is active
  (``vitfast.bench.host_driver``): they compile for sm_90 and launch as no-ops, to measure host time.
* CPU tensors otherwise run the plain-PyTorch fallback, so a converted model still runs anywhere.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

_warned: set[str] = set()
# Triton's interpreter keeps the running launch in module-level state: one launch at a time.
_interpreter_lock = threading.RLock()
_poison = False
_force_fallback = False
_stand_in_driver = False


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def stand_in_driver_active() -> bool:
    """True while a stand-in for Triton's CUDA driver is active (``vitfast.bench.host_driver``): CPU
    tensors then take the compiled Triton path, which launches nothing."""
    return _stand_in_driver


def set_stand_in_driver(active: bool) -> None:
    """Called by the stand-in driver as it becomes active and inactive; nothing else changes it."""
    global _stand_in_driver
    _stand_in_driver = active


def enable_interpreter() -> None:
    """Turn Triton's interpreter on; it only takes effect before ``triton`` is imported."""
    if "triton" in sys.modules and not interpreter_enabled():
        raise RuntimeError(
            "enable_interpreter() must run before triton is imported; "
            "set TRITON_INTERPRET=1 in the environment instead"
        )
    os.environ["TRITON_INTERPRET"] = "1"


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether the Triton kernels can take these tensors (all on one device, checked by the op)."""
    if _force_fallback or not triton_available():
        return False
    t = next((t for t in tensors if t is not None), None)
    if t is None:
        return False
    if t.is_cuda:
        return True
    # The flag first: under the stand-in, a CPU tensor then costs what a CUDA tensor does (no os.environ read).
    return t.device.type == "cpu" and (_stand_in_driver or interpreter_enabled())


@contextmanager
def launching(device: torch.device, dot_dtype: torch.dtype | None = None) -> Iterator[None]:
    """Wrap every kernel launch on tensors of ``device``; ``dot_dtype``: the dtype the kernels feed
    to ``tl.dot``, if they do.

    CPU tensors run in Triton's interpreter, whose state is global: two threads launching at once
    corrupt each other's kernels, so launches take a lock (one at a time). Its bf16 dots are wrong:
    the public ops take PyTorch for them, and a direct call of a custom op (an exported graph run
    under CPU bf16 autocast, say) raises rather than computing a wrong result. CUDA tensors take no
    lock; their device is made current when it is not, since Triton launches on the current device.
    Under the stand-in driver CPU tensors run no kernel: no lock, and bf16 dots are compiled as on a GPU.
    """
    interpreted = device.type == "cpu" and not _stand_in_driver
    if interpreted and dot_dtype == torch.bfloat16:
        raise RuntimeError("vitfast's kernels on CPU tensors run in Triton's interpreter, whose bfloat16 dots are "
                           "wrong: call the vitfast.ops functions (which compute bfloat16 with PyTorch on the "
                           "CPU), or use float16 or float32")
    if interpreted:
        with _interpreter_lock:
            yield
    elif device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            yield
    else:
        yield


def backend_name(device: torch.device | str) -> str:
    """Human-readable name of the path ops take for tensors on ``device``."""
    device = torch.device(device)
    if _force_fallback or not triton_available():
        return "pytorch-fallback"
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and interpreter_enabled():
        return "triton-interpreter"
    if device.type == "cpu" and _stand_in_driver:
        return "triton-stand-in-driver"
    return "pytorch-fallback"


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """True when a result must carry gradients: the ops then keep what their backward kernels need
    (LayerNorm statistics, the GEMM pre-activation)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def warn_once(key: str, message: str) -> None:
    """One warning per configuration, never one per call. Not while torch.compile traces (dynamo
    cannot trace ``warnings.warn``, and fullgraph would fail): the next eager call warns instead."""
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output buffer for a kernel; NaN-filled while poisoning is on, so an unwritten element shows."""
    if _poison and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def empty_strided(size: tuple[int, ...], stride: tuple[int, ...], *, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """``empty`` with given strides (a replayed forward's buffers, allocated as they are returned)."""
    out = torch.empty_strided(size, stride, dtype=dtype, device=device)
    return out.fill_(float("nan")) if _poison and dtype.is_floating_point else out


@contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Fill every kernel output with NaN before the kernel writes it (tests use this)."""
    global _poison
    old, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = old


@contextmanager
def fallback_only(enabled: bool = True) -> Iterator[None]:
    """Run every op on the plain-PyTorch path (for comparisons and debugging)."""
    global _force_fallback
    old, _force_fallback = _force_fallback, enabled
    try:
        yield
    finally:
        _force_fallback = old


_launch_counts: dict[str, int] | None = None
_launch_dtypes: dict[str, set[torch.dtype]] | None = None
# Called with (op, operand dtypes) for each recorded launch while a stand-in records its forward for
# replay (vitfast/modules/_replay.py), so that a replay counts what the recorded call counted.
launch_listener = None


def record_launch(op: str, *operands: torch.Tensor | None) -> None:
    """Called by each op when it takes the Triton path, with the tensors its kernels compute on;
    counted inside ``count_launches``, their dtypes collected inside ``launch_dtypes``."""
    if launch_listener is not None:
        launch_listener(op, tuple(t.dtype for t in operands if t is not None))
    if _launch_counts is not None or _launch_dtypes is not None:
        record_replayed_launch(op, tuple(t.dtype for t in operands if t is not None))


def record_replayed_launch(op: str, dtypes: tuple[torch.dtype, ...]) -> None:
    """``record_launch`` for a launch that a replay makes, with the operand dtypes recorded."""
    if _launch_counts is not None:
        _launch_counts[op] = _launch_counts.get(op, 0) + 1
    if _launch_dtypes is not None:
        _launch_dtypes.setdefault(op, set()).update(dtypes)


@contextmanager
def count_launches() -> Iterator[dict[str, int]]:
    """Count, per op, the calls that ran a Triton kernel (tests use it to prove the routing).

    >>> with count_launches() as counts:
    ...     model(x)
    >>> counts["attention"]
    """
    global _launch_counts
    old, _launch_counts = _launch_counts, {}
    try:
        yield _launch_counts
    finally:
        _launch_counts = old


@contextmanager
def launch_dtypes() -> Iterator[dict[str, set[torch.dtype]]]:
    """Collect, per op, the dtypes of the operands its kernels received (tests use it to prove that
    autocast reaches the kernels).

    >>> with torch.autocast("cuda", dtype=torch.bfloat16), launch_dtypes() as dtypes:
    ...     model(x)
    >>> dtypes["linear"]
    {torch.bfloat16}
    """
    global _launch_dtypes
    old, _launch_dtypes = _launch_dtypes, {}
    try:
        yield _launch_dtypes
    finally:
        _launch_dtypes = old
