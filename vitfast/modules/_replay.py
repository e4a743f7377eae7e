"""Settled calls: a stand-in's fused forward recorded once per call signature, then replayed as its
Triton launches alone.

A forward of a ViT block makes seven launches, and before each the ops validate their arguments,
choose a path, allocate the output and bind the kernel's arguments: tens of microseconds of Python
per launch, which decide the speed of batch 1 to 64 on a GPU. All of it depends only on what the
call's key holds (the shapes, strides, dtypes, devices and alignment of its tensors, its other
arguments, the global switches the ops read) and on the module's state (its plan, ``_fused.Plan``,
and the metadata of the parameters the launches read). So the first call with a key runs the
checked path while ``Recorder`` watches it, and later calls with that key replay what it saw:
allocate the same buffers, launch the same compiled kernels with the new tensors' addresses.

A recording becomes a replay only when it is exact by construction:

* every aten op the fused path ran was an allocation, a fill of a fresh allocation or a view (a
  ``TorchDispatchMode`` watches them; the ops call their custom ops' functions directly while it
  records); anything else (a copy, an arithmetic op, a random draw, a host read of a value such as
  ``bool(mask.any())``) leaves the call on the checked path for good;
* every tensor a launch reads is the call's input, a parameter or buffer of the module, or an
  allocation of the recorded forward, and so is everything the forward returns;
* gradients are off, there is no autocast, tracing, compiling or mode, the tensors are plain.

The module's state is checked on every replay: the plan (objects, classes, forwards, attribute
values and hooks of the module and all below it) and the shape, strides, dtype, device and
alignment of each parameter a launch reads (``.data`` may have been replaced).
"""
from __future__ import annotations

import functools
import inspect
import math
import operator
import sys
import threading
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from .. import runtime
from ..kernels import _precompile
from ..ops import _dispatch

NOT_SETTLED = object()  # ``settled``'s answer when the call runs the checked path
_MAX_KEYS = 8  # replays kept per plan (input signatures a module meets: batch sizes, resolutions)
_SCALARS = (type(None), bool, int, float, str, torch.dtype)

_aten = torch.ops.aten
_FRESH = {_aten.empty, _aten.empty_strided, _aten.new_empty, _aten.new_empty_strided, _aten.empty_like}
_FILLED = {_aten.full: lambda args: args[1], _aten.zeros: lambda args: 0.0, _aten.new_zeros: lambda args: 0.0,
           _aten.new_full: lambda args: args[2]}
_IN_PLACE_FILLS = {_aten.fill_: lambda args: args[1], _aten.zero_: lambda args: 0.0}
_VIEWS = {_aten.view, _aten._unsafe_view, _aten._reshape_alias, _aten.as_strided, _aten.t, _aten.transpose,
          _aten.permute, _aten.expand, _aten.unsqueeze, _aten.squeeze, _aten.select, _aten.slice, _aten.split,
          _aten.split_with_sizes, _aten.unbind, _aten.narrow, _aten.detach, _aten.alias, _aten.lift_fresh,
          _aten.sym_size, _aten.sym_stride, _aten.sym_numel, _aten.sym_storage_offset,
          _aten.promote_types, _aten.result_type, _aten.can_cast, _aten.is_same_size}  # and these read only metadata
# Views when they can be, copies otherwise (seen as such under inference mode): allowed as views only.
_VIEWS_OR_COPIES = {_aten.reshape, _aten.flatten, _aten.unflatten, _aten.reshape_as, _aten.view_as,
                    _aten.contiguous, _aten.expand_as, _aten.movedim, _aten.swapaxes}

_active = threading.local()  # .busy: a replay or recording runs on this thread (nested calls run checked)
_recording = threading.Lock()  # one recording at a time: the launch hooks and the listener are global
_IN, _BUF, _PARAM = 0, 1, 2


def _key(args: tuple, kwargs: dict, switches: tuple) -> tuple | None:
    """The call's signature, or None when it cannot be replayed (see the module docstring).
    ``switches``: the global settings the stand-in's own forward reads (``Fused._vitfast_switches``)."""
    if (torch.is_grad_enabled() or runtime._force_fallback or _precompile.active() or _tuning()
            or torch.jit.is_tracing()
            or torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
            or torch._C._len_torch_dispatch_stack() or torch._C._functorch.maybe_current_level() is not None):
        return None
    parts: list = [torch.is_inference_mode_enabled(), torch.backends.cuda.matmul.allow_tf32, switches]
    tensors: list[Tensor] = []
    for name, value in (*enumerate(args), *kwargs.items()):
        if type(value) is Tensor:
            same = next((i for i, t in enumerate(tensors) if t is value), None)
            if same is None:
                tensors.append(value)
                if value.device.type not in ("cpu", "cuda") or torch.is_autocast_enabled(value.device.type):
                    return None
                parts.append((name, value.shape, value.stride(), value.dtype, value.device, value.data_ptr() % 16))
            else:
                parts.append((name, same))
        elif type(value) in _SCALARS:
            parts.append((name, type(value), value))
        else:
            return None
    return tuple(parts)


def _tuning() -> bool:
    """Whether a tuning session times candidates (kernels/_select.py, imported with Triton only)."""
    select = sys.modules.get("vitfast.kernels._select")
    return select is not None and select.measuring()


def _inputs(args: tuple, kwargs: dict) -> list[Tensor]:
    """The call's distinct tensors, in ``_key``'s order."""
    out: list[Tensor] = []
    for value in (*args, *kwargs.values()):
        if type(value) is Tensor and not any(t is value for t in out):
            out.append(value)
    return out


def settled(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """The output of ``module``'s fused forward on these arguments through its replay, recording
    one first if this call signature has none; ``NOT_SETTLED`` when the call takes the checked path."""
    if getattr(_active, "busy", False):
        return NOT_SETTLED
    plan = module.__dict__.get("_vitfast_plan")
    if plan is None or not plan.complete:
        return NOT_SETTLED
    key = _key(args, kwargs, module._vitfast_switches())
    if key is None:
        return NOT_SETTLED
    replays = plan.replays
    replay = replays.get(key, plan)  # the plan itself stands for "not recorded yet"
    if replay is None:
        return NOT_SETTLED
    if replay is not plan and replay.parameters_hold():
        return replay.run(_inputs(args, kwargs))
    inputs = _inputs(args, kwargs)
    if not inputs or not runtime.use_triton(inputs[0]):  # the ops run PyTorch: nothing to replay
        replays[key] = None
        return NOT_SETTLED
    if not _recording.acquire(blocking=False):
        return NOT_SETTLED
    try:
        if key not in replays and len(replays) >= _MAX_KEYS:
            del replays[next(iter(replays))]  # the signature recorded longest ago
        replays[key] = None  # a recording that raises (Unfusable) leaves the call checked
        out, replays[key] = Recorder(module, inputs).record(args, kwargs)
    finally:
        _recording.release()
    return out


class _Watch(TorchDispatchMode):
    """Every aten op of the recorded forward goes past ``Recorder.saw``."""

    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.recorder.saw(func, args, out)
        return out


class Recorder:
    """Watches one fused forward: its aten ops, its Triton launches and the launches the ops count."""

    def __init__(self, module: torch.nn.Module, inputs: list[Tensor]):
        self.module = module
        self.thread = threading.get_ident()
        self.inputs = inputs
        self.spoiled: str | None = None
        self.quiet = 0  # inside a Triton launch: the interpreter's own tensor work is not the forward's
        self.buffers: list[_Buffer] = []  # what each allocation was (the tensors themselves are not kept)
        self.steps: list[tuple] = []  # ("alloc", j) / ("fill", j, value) / ("launch", ...), in order
        self.counted: list[tuple[str, tuple[torch.dtype, ...]]] = []
        self.storages: dict[int, tuple[int, Tensor | int]] = {}
        known = [(_IN, i, t) for i, t in enumerate(inputs)]
        known += [(_PARAM, t, t) for t in (*module.parameters(), *module.buffers())]
        for kind, base, t in known:
            if t.numel() and self.storages.setdefault(t.untyped_storage().data_ptr(), (kind, base))[1] is not base:
                self.spoiled = "two of its tensors share storage"  # a launch's tensor could not be placed

    def spoil(self, why: str) -> None:
        self.spoiled = self.spoiled or why

    def record(self, args: tuple, kwargs: dict) -> tuple[Any, Replay | None]:
        """Run the fused forward; (its output, the replay made of it or None)."""
        _launches.install()
        _active.busy = True
        _dispatch.recording_thread = self.thread
        runtime.launch_listener = self.count
        _launches.recorder = self
        try:
            with _Watch(self):
                out = self.module._fused_forward(*args, **kwargs)
        finally:
            _active.busy = False
            _dispatch.recording_thread = None
            runtime.launch_listener = None
            _launches.recorder = None
        return out, (None if self.spoiled else self._replay(out))

    def count(self, op: str, dtypes: tuple[torch.dtype, ...]) -> None:
        if threading.get_ident() == self.thread:
            self.counted.append((op, dtypes))

    def saw(self, func, args: tuple, out: Any) -> None:
        if self.quiet:
            return
        packet = func.overloadpacket
        if packet in _VIEWS:
            return
        if packet in _VIEWS_OR_COPIES and isinstance(out, Tensor) and isinstance(args[0], Tensor) and (
                out.untyped_storage().data_ptr() == args[0].untyped_storage().data_ptr()):
            return
        if packet in _FRESH or packet in _FILLED:
            self._fresh(out, _FILLED[packet](args) if packet in _FILLED else None)
            return
        j = self._buffer_of(args[0]) if packet in _IN_PLACE_FILLS and isinstance(args[0], Tensor) else None
        if j is not None:
            self.steps.append(("fill", j, _IN_PLACE_FILLS[packet](args)))
        else:
            self.spoil(f"the fused path ran {func}")

    def _fresh(self, t: Tensor, fill: float | None) -> None:
        if not t.numel():
            return  # read by no launch (zero-size tensors are passed on as they are)
        j = len(self.buffers)
        self.buffers.append(_Buffer(t))
        # An address freed earlier in the forward and reused now names the new allocation.
        self.storages[t.untyped_storage().data_ptr()] = (_BUF, j)
        self.steps.append(("alloc", j))
        if fill is not None:
            self.steps.append(("fill", j, fill))

    def _buffer_of(self, t: Tensor) -> int | None:
        """The allocation ``t`` covers whole, or None."""
        kind, j = self.storages.get(t.untyped_storage().data_ptr(), (None, None))
        if kind != _BUF or t.data_ptr() != self.buffers[j].data_ptr or t.numel() != self.buffers[j].numel:
            return None
        return j

    def slot(self, t: Tensor) -> tuple | None:
        """Where a tensor the forward passes on comes from: (kind, base, byte offset, view), or None.
        The view (shape, strides, element offset from the base, dtype) rebuilds it in the interpreter."""
        kind, base = self.storages.get(t.untyped_storage().data_ptr(), (None, None))
        if kind is None:
            return None
        if kind == _BUF:
            ptr, size = self.buffers[base].data_ptr, self.buffers[base].element_size
        else:
            ref = self.inputs[base] if kind == _IN else base
            ptr, size = ref.data_ptr(), ref.element_size()
        offset = t.data_ptr() - ptr
        if size != t.element_size() or offset % size:
            self.spoil("a tensor views its storage with another element size")
            return None
        return kind, base, offset, (tuple(t.shape), t.stride(), offset // size, t.dtype)

    def launched(self, fn, kernel, grid, args: tuple, kwargs: dict) -> None:
        names, defaults = fn.arg_names, _defaults(fn)
        values = list(args) + [kwargs[n] if n in kwargs else defaults[n] for n in names[len(args):]]
        options = {k: v for k, v in kwargs.items() if k not in names and k not in ("grid", "warmup")}
        if callable(grid):
            grid = grid({**dict(zip(names, values)), **options})
        slots = []
        for pos, v in enumerate(values):
            if isinstance(v, Tensor) and v.numel() > 0:
                where = self.slot(v)
                if where is None:
                    self.spoil(f"a launch of {fn.__name__} reads a tensor made outside the forward's allocations")
                    return
                slots.append((pos, *where))
                values[pos] = None  # filled in per replay: no tensor of this call is kept alive
        self.steps.append(("launch", fn, kernel, tuple(grid), values, options, slots))

    def _replay(self, out: Any) -> Replay | None:
        outputs = _template(out, self)
        if self.spoiled:
            return None
        return Replay(self, outputs)


def _template(out: Any, recorder: Recorder) -> Any:
    """``out`` with each tensor replaced by its slot (spoiling the recording for an unknown one)."""
    if isinstance(out, Tensor):
        where = recorder.slot(out)
        if where is None or where[0] == _PARAM or type(out) is not Tensor:
            recorder.spoil("the forward returns a tensor it did not allocate")
        return where
    if type(out) in (tuple, list):
        return type(out)(_template(o, recorder) for o in out)
    if out is None:
        return None
    recorder.spoil(f"the forward returns a {type(out).__name__}")
    return None


class Replay:
    """A recorded forward as steps: allocate, fill, launch (compiled kernels with raw addresses, or
    the interpreter's functions with views), then the outputs rebuilt from the buffers."""

    def __init__(self, recorder: Recorder, outputs: Any):
        bufs = recorder.buffers
        used = {slot[2] for step in recorder.steps if step[0] == "launch" for slot in step[6] if slot[1] == _BUF}
        escaping = {j for where, j, _, _ in _slots(outputs) if where == _BUF}
        self.allocs = {j: (b.shape, b.stride, b.dtype, b.device) for j, b in enumerate(bufs)}
        self.steps: list[tuple] = []
        last_use: dict[int, int] = {}
        for step in recorder.steps:
            kind, j = step[0], step[1] if step[0] != "launch" else None
            if kind in ("alloc", "fill") and j not in used and j not in escaping:
                continue
            if kind == "launch":
                _, fn, kernel, grid, values, options, slots = step
                for _, where, base, _, _ in slots:
                    if where == _BUF:
                        last_use[base] = len(self.steps)
                self.steps.append(("launch", fn, kernel, grid + (1,) * (3 - len(grid)), values, options,
                                   tuple(slots)))
            else:
                self.steps.append(step)
        self.frees = {i: tuple(j for j, last in last_use.items() if last == i and j not in escaping)
                      for i in range(len(self.steps))}
        for where, j, _, (size, stride, offset, _) in _slots(outputs):
            if where == _BUF and offset == 0 and math.prod(size) == math.prod(self.allocs[j][0]) and _contiguous(
                    size, stride):
                _, _, dtype, device = self.allocs[j]
                self.allocs[j] = (size, stride, dtype, device)  # allocated as returned: no view to make
        self.outputs = outputs
        self.counted = tuple(recorder.counted)
        launches = [step for step in self.steps if step[0] == "launch"]
        self.compiled = bool(launches) and all(step[2] is not None for step in launches)
        params = {id(s[2]): s[2] for step in self.steps if step[0] == "launch" for s in step[6] if s[1] == _PARAM}
        self.params = tuple(params.values())
        self.param_meta = _meta(self.params)
        device = recorder.inputs[0].device if recorder.inputs else None
        self.device_index = device.index if device is not None and device.type == "cuda" else None

    def parameters_hold(self) -> bool:
        """The parameters the launches read still have the shapes, strides, dtypes, devices and
        alignment they were recorded with (``.data`` may have been replaced since)."""
        params, (ptrs, *rest) = self.params, self.param_meta
        now_ptrs, *now_rest = _meta(params)
        if now_rest != rest:
            return False
        return now_ptrs == ptrs or all(a % 16 == b % 16 for a, b in zip(now_ptrs, ptrs))

    def run(self, inputs: list[Tensor]) -> Any:
        counting = runtime._launch_counts is not None or runtime._launch_dtypes is not None
        _active.busy = True
        profiling = torch.autograd.profiler._is_profiler_enabled
        scope = torch.profiler.record_function("vitfast::replay") if profiling else None
        try:
            if scope is not None:
                scope.__enter__()
            if self.device_index is not None and self.device_index != torch.cuda.current_device():
                with torch.cuda.device(self.device_index):
                    bufs = self._run(inputs)
            elif self.compiled:
                bufs = self._run(inputs)
            else:
                with runtime._interpreter_lock:
                    bufs = self._run(inputs)
        finally:
            _active.busy = False
            if scope is not None:
                scope.__exit__(None, None, None)
        if counting:
            for op, dtypes in self.counted:
                runtime.record_replayed_launch(op, dtypes)
        return _rebuild(self.outputs, inputs, bufs)

    def _run(self, inputs: list[Tensor]) -> list[Tensor | None]:
        bufs: list[Tensor | None] = [None] * len(self.allocs)
        compiled = self.compiled
        if compiled:
            from triton import knobs
            from triton.runtime import driver

            active = driver.active
            stream = active.get_current_stream(active.get_current_device())
            enter, exit_ = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
            if not getattr(enter, "calls", True) and not getattr(exit_, "calls", True):
                enter = exit_ = None  # empty hook chains: the launcher then calls nothing, as Triton's would
        poison = runtime._poison
        for i, step in enumerate(self.steps):
            kind = step[0]
            if kind == "alloc":
                size, stride, dtype, device = self.allocs[step[1]]
                bufs[step[1]] = (runtime.empty_strided(size, stride, dtype=dtype, device=device) if poison
                                 else torch.empty_strided(size, stride, dtype=dtype, device=device))
            elif kind == "fill":
                bufs[step[1]].fill_(step[2])
            else:
                _, fn, kernel, grid, values, options, slots = step
                values = values.copy()
                if compiled:
                    for pos, where, base, offset, _ in slots:
                        values[pos] = (inputs[base] if where == _IN else bufs[base] if where == _BUF
                                       else base).data_ptr() + offset
                    meta = None if enter is None else kernel.launch_metadata(grid, stream, *values)
                    kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, meta,
                               enter, exit_, *values)
                else:
                    for pos, where, base, _, view in slots:
                        values[pos] = _view(inputs[base] if where == _IN else bufs[base] if where == _BUF else base,
                                            view)
                    fn[grid](*values, **options)
                for j in self.frees[i]:
                    bufs[j] = None
        return bufs


class _Buffer:
    """What a recorded allocation was: where, and how to allocate it again."""

    __slots__ = ("data_ptr", "numel", "element_size", "shape", "stride", "dtype", "device")

    def __init__(self, t: Tensor):
        self.data_ptr, self.numel, self.element_size = t.data_ptr(), t.numel(), t.element_size()
        self.shape, self.stride, self.dtype, self.device = tuple(t.shape), t.stride(), t.dtype, t.device


def _view(ref: Tensor, view: tuple) -> Tensor:
    """The recorded view (shape, strides, element offset, dtype) of ``ref``, for the interpreter."""
    size, stride, offset, dtype = view
    if ref.dtype != dtype:
        ref = ref.view(dtype)
    return ref.as_strided(size, stride, ref.storage_offset() + offset)


_SHAPE, _DTYPE, _DEVICE = (operator.attrgetter(name) for name in ("shape", "dtype", "device"))


def _meta(tensors: tuple[Tensor, ...]) -> list[tuple]:
    """[addresses, shapes, strides, dtypes, devices] of ``tensors``, each a tuple (built in C)."""
    return [tuple(map(Tensor.data_ptr, tensors)), tuple(map(_SHAPE, tensors)), tuple(map(Tensor.stride, tensors)),
            tuple(map(_DTYPE, tensors)), tuple(map(_DEVICE, tensors))]


def _is_slot(template: Any) -> bool:
    return type(template) is tuple and len(template) == 4 and isinstance(template[0], int)


def _slots(template: Any) -> list[tuple]:
    """The tensor slots of an output template, in order."""
    if _is_slot(template):
        return [template]
    if type(template) in (tuple, list):
        return [s for t in template for s in _slots(t)]
    return []


def _contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for n, st in zip(reversed(size), reversed(stride)):
        if n != 1 and st != expected:
            return False
        expected *= n
    return True


@functools.cache
def _defaults(fn) -> dict[str, Any]:
    """A Triton kernel's parameters' defaults (a compiled JITFunction's or an interpreted one's)."""
    params = getattr(fn, "params", None)
    if params is not None:
        return {p.name: p.default for p in params}
    return {n: p.default for n, p in inspect.signature(fn.fn).parameters.items()}


def _rebuild(template: Any, inputs: list[Tensor], bufs: list[Tensor | None]) -> Any:
    if _is_slot(template):
        where, base, _, view = template
        ref = inputs[base] if where == _IN else bufs[base]
        if ref.shape == view[0] and ref.stride() == view[1] and view[2] == 0 and ref.dtype == view[3]:
            return ref
        return _view(ref, view)
    if type(template) in (tuple, list):
        return type(template)(_rebuild(t, inputs, bufs) for t in template)
    return template


class _Launches:
    """The hook on Triton's launch path (``JITFunction.run`` and the interpreter's ``run``): every launch
    of the recording thread's forward is recorded with the arguments it really took. (vitfast's kernels
    have no autotuners; tuning sessions, whose timing launches are not a forward's, record nothing.)"""

    def __init__(self):
        self.recorder: Recorder | None = None
        self.installed = False

    def install(self) -> None:
        if self.installed:
            return
        from triton.runtime import interpreter, jit

        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            cls.run = self._wrap(cls.run)
        self.installed = True

    def _wrap(self, run):
        launches = self

        def recorded_run(fn, *args, grid, warmup, **kwargs):
            recorder = launches.recorder
            if recorder is None or warmup or recorder.quiet or recorder.thread != threading.get_ident():
                return run(fn, *args, grid=grid, warmup=warmup, **kwargs)
            recorder.quiet += 1
            try:
                kernel = run(fn, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                recorder.quiet -= 1
            recorder.launched(fn, kernel if hasattr(kernel, "packed_metadata") else None, grid, args, kwargs)
            return kernel
        return recorded_run


_launches = _Launches()
