"""Settled calls: a stand-in's fused forward recorded once per call signature, then replayed as its
Triton launches alone.

A forward of a ViT block makes seven launches, and before each the ops validate their arguments,
choose a path, allocate the output and bind the kernel's arguments: tens of microseconds of Python
per launch, which decide the speed of batch 1 to 64 on a GPU. All of it depends only on what the
call's key holds (the shapes, strides, dtypes, devices and alignment of its tensors, its other
arguments, the global switches the ops read) and on the module's state (its plan, ``_fused.Plan``,
and the metadata of the parameters the launches read). So the first call with a key runs the
checked path while ``Recorder`` watches it, and later calls with that key replay what it saw
(``_replay_steps.Replay``): the buffers it returns allocated again, the others laid out in one
workspace, the same compiled kernels launched with the new tensors' addresses.

A recording becomes a replay only when it is exact by construction:

* every aten op the fused path ran was an allocation, a fill of a fresh allocation, a view, or a
  cuBLAS product written into an allocation (``_CALLS``, replayed as a call) (a ``TorchDispatchMode``
  watches them; the ops call their custom ops' functions directly while it records); anything else (a
  copy, an arithmetic op, a random draw, a host read of a value such as ``bool(mask.any())``) leaves the
  call on the checked path for good;
* every tensor a launch reads is the call's input, a parameter or buffer of the module, or an
  allocation of the recorded forward, and so is everything the forward returns;
* gradients are off, there is no autocast, tracing, compiling or mode, the tensors are plain.

Every replay checks, first thing in the stand-in's forward (``replayed``): the call's key, the plan
(objects, classes, forwards, attribute values and hooks of the module and all below it), that the
stand-in fuses this call, and the shape, strides, dtype, device and alignment of each parameter a
launch reads (``.data`` may have been replaced). Any of them failing sends the call down the checked
path, which re-plans, and records again where the key is new.

A stand-in whose fused forward calls children as modules (timm's ``VisionTransformer`` calls its blocks,
the reference ViT its encoder, the encoder its layers) records too, as one unit: what the stand-ins it
calls launch is part of its recording, and its replay makes a whole model's launches from one call.
It does so only while nothing below it has a hook and every module its forward reaches is a stand-in
running its own forward or a passive torch module (``_plan.unit``), and its replays also check the plan
of all below (``Plan.below``) and the global settings the stand-ins below read. A stand-in below that
runs its original forward while the unit records spoils the recording (``left_fused``).
"""
from __future__ import annotations

import functools
import inspect
import sys
import threading
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from .. import runtime
from ..kernels import _precompile
from ..ops import _dispatch
from ._plan import unit
from ._replay_steps import _BUF, _IN, _PARAM, Replay

NOT_SETTLED = object()  # ``settled``'s answer when the call runs the checked path
_MAX_KEYS = 8  # replays kept per plan (input signatures a module meets: batch sizes, resolutions)
_LOOK_AGAIN = 64  # a unit that does not replay compares what is below it once per this many calls
_SCALARS = (type(None), bool, int, float, str, torch.dtype)

_aten = torch.ops.aten
_FRESH = {_aten.empty, _aten.empty_strided, _aten.new_empty, _aten.new_empty_strided, _aten.empty_like}
_FILLED = {_aten.full: lambda args: args[1], _aten.zeros: lambda args: 0.0, _aten.new_zeros: lambda args: 0.0,
           _aten.new_full: lambda args: args[2]}
_IN_PLACE_FILLS = {_aten.fill_: lambda args: args[1], _aten.zero_: lambda args: 0.0}
# Ops a replay makes again, with out= into an allocation of the forward: cuBLAS's products, which a GEMM
# site's cuBLAS tactic runs (kernels/gemm_tactic.py).
_CALLS = {_aten.mm.out, _aten.addmm.out}
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


_C = torch._C
_tf32 = getattr(_C, "_get_cublas_allow_tf32", None) or (lambda: torch.backends.cuda.matmul.allow_tf32)
_any_autocast = getattr(_C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"))


def _key(args: tuple, kwargs: dict, switches: tuple) -> tuple | None:
    """The call's signature, or None when it cannot be replayed (see the module docstring).
    ``switches``: the global settings the stand-in's own forward reads (``Fused._vitfast_switches``)."""
    configs = _configs_generation()
    if (_C.is_grad_enabled() or runtime._force_fallback or _precompile.active() or configs is None
            or _C._get_tracing_state() is not None or torch.compiler.is_compiling()
            or _C._is_torch_function_mode_enabled() or _C._len_torch_dispatch_stack()
            or _C._functorch.maybe_current_level() is not None or _any_autocast()):
        return None
    parts: list = [_C.is_inference_mode_enabled(), _tf32(), runtime._stand_in_driver, configs, switches]
    tensors: list[Tensor] = []
    for name, value in (*enumerate(args), *kwargs.items()):
        if type(value) is Tensor:
            same = next((i for i, t in enumerate(tensors) if t is value), None)
            if same is None:
                if not (value.is_cuda or value.is_cpu) or value.is_nested or value.layout is not torch.strided:
                    return None
                tensors.append(value)
                parts.append((name, value.shape, value.stride(), value.dtype, value.device, value.data_ptr() % 16))
            else:
                parts.append((name, same))
        elif type(value) in _SCALARS:
            parts.append((name, type(value), value))
        else:
            return None
    return tuple(parts)


def _configs_generation() -> int | None:
    """None while a tuning session times candidates (its launches are not a forward's); otherwise how
    often the kernels' config choices may have changed in this process (``_select.generation``:
    a tuning session closed, a reset), so that a settled call recorded before replays no old config.
    kernels/_select.py is imported with Triton only."""
    select = sys.modules.get("vitfast.kernels._select")
    if select is None:
        return 0
    return None if select.measuring() else select.generation


def _switches(module: torch.nn.Module, plan) -> tuple:
    """The global settings the stand-in's fused forward reads, and those of the stand-ins a unit calls."""
    own = module._vitfast_switches()
    return own + plan.switches() if plan.switchers else own


def left_fused() -> None:
    """A stand-in runs its original forward: a recording on this thread (a unit calling it) is spoiled,
    since what that forward does depends on more than the recorder sees."""
    recorder = _launches.recorder
    if recorder is not None and recorder.thread == threading.get_ident():
        recorder.spoil("a stand-in it calls ran its original forward")


def _inputs(args: tuple, kwargs: dict) -> list[Tensor]:
    """The call's distinct tensors, in ``_key``'s order."""
    out: list[Tensor] = []
    for value in (*args, *kwargs.values()):
        if type(value) is Tensor and not any(t is value for t in out):
            out.append(value)
    return out


def replayed(module: torch.nn.Module, plan, args: tuple, kwargs: dict) -> Any:
    """A settled call's output, from its replay, when everything the replay was recorded under holds:
    the call's key, the plan (``_fused.Plan.holds``), the stand-in's will to fuse this call and the
    parameters' metadata; ``NOT_SETTLED`` otherwise (the stand-in then runs its checked path, which may
    record). The common case of every stand-in's forward, so its checks come cheapest first."""
    key = _key(args, kwargs, _switches(module, plan))
    replay = plan.replays.get(key) if key is not None else None
    if (replay is None or getattr(_active, "busy", False) or not plan.holds(module)
            or module._vitfast_declines(*args, **kwargs) or not (plan.complete or plan.below.quiet(module))):
        return NOT_SETTLED
    ptrs = replay.parameters_hold()
    return NOT_SETTLED if ptrs is None else replay.run(_inputs(args, kwargs), ptrs)


def settled(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """On the checked path (the plan holds; the stand-in fuses this call, which ``replayed`` did not
    replay): the output of ``module``'s fused forward, recorded for replay where this call signature has
    no recording yet or its parameters changed since; ``NOT_SETTLED`` when the call runs the fused
    forward itself."""
    if getattr(_active, "busy", False):
        return NOT_SETTLED
    plan = module.__dict__.get("_vitfast_plan")
    if plan is None:
        return NOT_SETTLED
    is_unit = not plan.complete
    if is_unit and plan.unit_reason is not None and not _looks_again(module, plan):
        return NOT_SETTLED
    key = _key(args, kwargs, _switches(module, plan))
    if key is None:
        return NOT_SETTLED
    replays = plan.replays
    if key in replays and replays[key] is None and not (is_unit and _looks_again(module, plan)):
        return NOT_SETTLED  # a signature that does not replay
    inputs = _inputs(args, kwargs)
    if not inputs or not runtime.use_triton(inputs[0]):  # the ops run PyTorch: nothing to replay
        replays[key] = None
        return NOT_SETTLED
    if is_unit:  # the children it calls are replayed too, so their plan must hold
        if not unit(module, plan):
            return NOT_SETTLED
        key = _key(args, kwargs, _switches(module, plan))  # their switches, as the plan has them now
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


def _looks_again(module: torch.nn.Module, plan) -> bool:
    """For a unit whose modules below cannot be replayed past, or whose recording of this call signature
    did not replay (a stand-in below ran its original forward, a dropout drew): on every
    ``_LOOK_AGAIN``-th such call, whether anything below changed since, so that it is planned and
    recorded again (its own plan, which would drop it, holds only what it bypasses)."""
    plan.misses += 1
    if plan.misses % _LOOK_AGAIN:
        return False
    return plan.below is None or not plan.below.quiet(module)


class _Watch(TorchDispatchMode):
    """Every aten op of the recorded forward goes past ``Recorder.saw``."""

    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.recorder.saw(func, args, out, kwargs)
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
        self.steps: list[tuple] = []  # ("alloc", j) / ("fill", j, value) / ("launch" | "call", ...), in order
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

    def saw(self, func, args: tuple, out: Any, kwargs: dict | None = None) -> None:
        if self.quiet:
            return
        if func in _CALLS:
            self._called(func, args, kwargs or {})
            return
        packet = func.overloadpacket
        if packet in _VIEWS:
            return
        if packet is _aten.dropout and out is args[0]:
            return  # in eval or with p = 0 dropout hands back its input
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

    def _called(self, func, args: tuple, kwargs: dict) -> None:
        """An aten op the replay makes again (``_CALLS``): its arguments, each tensor by its slot, and
        its output (``out=``) an allocation of the recorded forward."""
        values = [*args, *kwargs.values()]
        slots = []
        for pos, v in enumerate(values):
            if isinstance(v, Tensor):
                where = self.slot(v)
                if where is None or (pos == len(values) - 1 and where[0] != _BUF):
                    self.spoil(f"the fused path ran {func} on a tensor made outside the forward's allocations")
                    return
                slots.append((pos, *where))
                values[pos] = None
        if list(kwargs) != ["out"]:
            self.spoil(f"the fused path ran {func} without out=")
            return
        self.steps.append(("call", func, None, None, values, tuple(kwargs), tuple(slots)))

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


class _Buffer:
    """What a recorded allocation was: where, and how to allocate it again."""

    __slots__ = ("data_ptr", "numel", "element_size", "shape", "stride", "dtype", "device")

    def __init__(self, t: Tensor):
        self.data_ptr, self.numel, self.element_size = t.data_ptr(), t.numel(), t.element_size()
        self.shape, self.stride, self.dtype, self.device = tuple(t.shape), t.stride(), t.dtype, t.device


@functools.cache
def _defaults(fn) -> dict[str, Any]:
    """A Triton kernel's parameters' defaults (a compiled JITFunction's or an interpreted one's)."""
    params = getattr(fn, "params", None)
    if params is not None:
        return {p.name: p.default for p in params}
    return {n: p.default for n, p in inspect.signature(fn.fn).parameters.items()}


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
