"""A recorded forward as a replay (``_replay.py`` records it): its buffers laid out once, its launches
made straight from the arguments they were recorded with.

Buffers. Those the forward returns are allocated on every replay, as they were recorded. The others
never leave the forward (a LayerNorm's output, the packed q/k/v, the MLP's hidden layer): they are
placed in one workspace, a byte buffer allocated per replay, at offsets where no two of them that are
alive at the same step overlap (``pack``). One allocation instead of one per buffer, freed when the
replay returns (on a GPU the caching allocator hands the same block to the next replay, on the same
stream). The price is memory held for the whole replay: a ViT block's workspace is the peak of its
inner buffers (6 activations: the residual stream, the second LayerNorm's output and the MLP's hidden
layer), and with its output allocated from the start the block holds 7 where its recorded forward
held at most 6.

Launches. For compiled kernels the replay is one generated function: per launch, a call of the
kernel's launcher with its grid, its constants and the addresses of its tensors (an input's, a
parameter's or a buffer's address plus the recorded byte offset): what ``CompiledKernel.run`` takes,
without re-binding anything. Under Triton's interpreter the same steps run as a loop that passes the
kernels views of the same memory, so that the layout CI checks numerically is the one a GPU runs.
A GEMM site on its cuBLAS tactic adds ``call`` steps: the aten product (``torch.mm``/``addmm`` with
``out=``) made again on views of the same slots.
"""
from __future__ import annotations

import math
import operator
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from .. import runtime

_IN, _BUF, _PARAM = 0, 1, 2  # where a recorded tensor came from (``_replay.Recorder``)
_WS, _OWN = 3, 4  # where a replayed buffer lives: the workspace, or an allocation of its own
_ALIGN = 256  # bytes: every workspace offset (Triton specializes pointers on divisibility by 16)


def pack(buffers: list[tuple[int, int, int]]) -> tuple[list[int], int]:
    """Offsets for buffers given as (first step, last step, bytes), in order of first step, such that
    two buffers whose steps overlap never share a byte; and the total size. Each goes to the lowest
    aligned offset that is free over its whole lifetime."""
    placed: list[tuple[int, int, int, int]] = []  # first, last, offset, end
    offsets = []
    for first, last, size in buffers:
        size = -(-size // _ALIGN) * _ALIGN
        alive = sorted((o, e) for f, l, o, e in placed if f <= last and first <= l)
        offset = 0
        for o, e in alive:
            if offset + size <= o:
                break
            offset = max(offset, e)
        placed.append((first, last, offset, offset + size))
        offsets.append(offset)
    return offsets, max((e for *_, e in placed), default=0)


def span_bytes(shape: tuple[int, ...], stride: tuple[int, ...], element_size: int) -> int:
    """The bytes a strided tensor of this shape covers (0 when empty)."""
    if math.prod(shape) == 0:
        return 0
    return (1 + sum((n - 1) * st for n, st in zip(shape, stride))) * element_size


class Replay:
    """A recorded forward: its owned and workspace buffers, fills and launches, and its outputs.

    Built from a ``_replay.Recorder``'s buffers and steps and the output template (slots
    ``(where, base, byte offset, view)``)."""

    def __init__(self, recorder, outputs: Any):
        bufs, steps = recorder.buffers, recorder.steps
        escaping = [j for where, j, _, _ in _slots(outputs) if where == _BUF]
        live: dict[int, list[int]] = {}  # buffer -> [first step, last step] among the launches and fills
        launched: set[int] = set()  # the buffers a launch reads or writes
        for i, step in enumerate(steps):
            if step[0] in ("launch", "call"):
                touched = [s[2] for s in step[6] if s[1] == _BUF]
                launched.update(touched)
            else:  # an allocation takes no step of its own; a fill does
                touched = [step[1]] if step[0] == "fill" else []
            for j in touched:
                live.setdefault(j, [i, i])[1] = i
        owned = list(dict.fromkeys(escaping))  # returned: allocated as they were recorded
        inner = [j for j in sorted(live, key=lambda j: live[j][0]) if j in launched and j not in owned]
        self.spans = {j: span_bytes(bufs[j].shape, bufs[j].stride, bufs[j].element_size) for j in inner}
        offsets, self.workspace = pack([(*live[j], self.spans[j]) for j in inner])
        home = {j: (_OWN, k) for k, j in enumerate(owned)}
        home.update({j: (_WS, off) for j, off in zip(inner, offsets)})
        self.allocs = [[b.shape, b.stride, b.dtype] for b in map(bufs.__getitem__, owned)]
        device = recorder.inputs[0].device if recorder.inputs else bufs[0].device if bufs else torch.device("cpu")
        self.device = device
        self.device_index = device.index if device.type == "cuda" else None
        params: dict[int, Tensor] = {}
        self.steps: list[tuple] = []
        for step in steps:
            if step[0] == "fill" and step[1] in home:
                where, at = home[step[1]]
                self.steps.append(("fill", where, at, self.spans.get(step[1]), bufs[step[1]].dtype, step[2]))
            elif step[0] in ("launch", "call"):
                kind, fn, kernel, grid, values, options, slots = step
                args = []
                for pos, where, base, offset, view in slots:
                    if where == _BUF:
                        where, at = home[base]
                        args.append((pos, where, at, offset, view, self.spans.get(base)))
                    else:
                        at = base if where == _IN else params.setdefault(id(base), (len(params), base))[0]
                        args.append((pos, where, at, offset, view, None))
                grid = grid + (1,) * (3 - len(grid)) if kind == "launch" else None
                self.steps.append((kind, fn, kernel, grid, values, options, tuple(args)))
        self.params = tuple(p for _, p in params.values())
        self.param_ptrs, self.param_meta = tuple(map(Tensor.data_ptr, self.params)), _meta(self.params)
        self.outputs = _placed(outputs, home, self.allocs)
        self.counted = tuple(recorder.counted)
        launches = [step for step in self.steps if step[0] == "launch"]
        self.compiled = bool(launches) and all(step[2] is not None for step in launches)
        self._runners = _generate(self) if self.compiled else None

    def parameters_hold(self) -> tuple[int, ...] | None:
        """The addresses of the parameters the launches read, when they still have the shapes, strides,
        dtypes, devices and alignment they were recorded with (``.data`` may have been replaced)."""
        params, ptrs = self.params, self.param_ptrs
        now = tuple(map(Tensor.data_ptr, params))
        if now != ptrs and any(a % 16 != b % 16 for a, b in zip(now, ptrs)):
            return None
        return now if _meta(params) == self.param_meta else None

    def run(self, inputs: list[Tensor], ptrs: tuple[int, ...]) -> Any:
        """The recorded forward on ``inputs`` (the call's distinct tensors), the parameters at ``ptrs``."""
        counting = runtime._launch_counts is not None or runtime._launch_dtypes is not None
        scope = torch.profiler.record_function("vitfast::replay") if torch.autograd.profiler._is_profiler_enabled \
            else None
        if scope is not None:
            scope.__enter__()
        try:
            if self.device_index is not None and self.device_index != torch.cuda.current_device():
                with torch.cuda.device(self.device_index):
                    owned = self._run(inputs, ptrs)
            else:
                owned = self._run(inputs, ptrs)
        finally:
            if scope is not None:
                scope.__exit__(None, None, None)
        if counting:
            for op, dtypes in self.counted:
                runtime.record_replayed_launch(op, dtypes)
        return _rebuild(self.outputs, inputs, owned)

    def _run(self, inputs: list[Tensor], ptrs: tuple[int, ...]) -> tuple[Tensor, ...]:
        if self._runners is not None:
            plain, hooked, driver, knobs = self._runners
            active, hooks = driver.active, knobs.runtime
            index = self.device_index if self.device_index is not None else active.get_current_device()
            stream = active.get_current_stream(index)
            enter, exit_ = hooks.launch_enter_hook, hooks.launch_exit_hook
            if getattr(enter, "calls", True) or getattr(exit_, "calls", True):
                return hooked(inputs, ptrs, stream, enter, exit_)
            return plain(inputs, ptrs, stream)  # empty hook chains: Triton's launch calls nothing
        with runtime._interpreter_lock:
            return self._interpret(inputs)

    def _interpret(self, inputs: list[Tensor]) -> tuple[Tensor, ...]:
        """The steps with Triton's interpreter: the kernels read and write views of the same layout."""
        owned, ws = self._allocate()
        for step in self.steps:
            if step[0] == "fill":
                _, where, at, span, dtype, value = step
                (owned[at] if where == _OWN else ws.narrow(0, at, span).view(dtype)).fill_(value)
                continue
            kind, fn, _, grid, values, options, args = step
            values = values.copy()
            for pos, where, at, _, view, span in args:
                ref = (inputs[at] if where == _IN else self.params[at] if where == _PARAM
                       else owned[at] if where == _OWN else ws.narrow(0, at, span))
                values[pos] = _view(ref, view)
            if kind == "call":  # options: the names of the trailing keyword arguments
                fn(*values[:len(values) - len(options)], **dict(zip(options, values[len(values) - len(options):])))
            else:
                fn[grid](*values, **options)
        return owned

    def _allocate(self) -> tuple[tuple[Tensor, ...], Tensor]:
        owned = tuple(torch.empty_strided(size, stride, dtype=dtype, device=self.device)
                      for size, stride, dtype in self.allocs)
        ws = torch.empty(self.workspace, dtype=torch.uint8, device=self.device)
        if runtime._poison:
            _poison(owned, ws)
        return owned, ws


def _poison(owned: tuple[Tensor, ...], ws: Tensor | None) -> None:
    """NaN in every buffer before the kernels write it (``runtime.poison_outputs``): all-ones bytes are a
    NaN in every floating dtype."""
    if ws is not None:
        ws.fill_(255)
    for t in owned:
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))


def _generate(replay: Replay) -> tuple:
    """The compiled replay as two Python functions, without and with launch hooks: straight-line code
    that allocates, fills and launches, each launch's constants bound by name; and Triton's driver
    config and knobs, which give a launch its stream and hooks."""
    from triton import knobs
    from triton.runtime import driver

    names: dict[str, Any] = {"_empty": torch.empty, "_empty_strided": torch.empty_strided, "_u8": torch.uint8,
                             "_dev": replay.device, "_rt": runtime, "_poison": _poison, "_v": _view,
                             "_params": replay.params}
    head = (["    ws = _empty(%d, dtype=_u8, device=_dev)" % replay.workspace, "    w = ws.data_ptr()"]
            if replay.workspace else ["    ws = None"])
    for k, (size, stride, dtype) in enumerate(replay.allocs):
        names[f"_dtype{k}"] = dtype
        head.append(f"    b{k} = _empty_strided({tuple(size)}, {tuple(stride)}, dtype=_dtype{k}, device=_dev)")
        head.append(f"    o{k} = b{k}.data_ptr()")
    owned = "(" + "".join(f"b{k}, " for k in range(len(replay.allocs))) + ")"
    head.append(f"    if _rt._poison:\n        _poison({owned}, ws)")
    if any(getattr(step[2].metadata, "global_scratch_size", 0) for step in replay.steps if step[0] == "launch"):
        # A kernel that makes tensor descriptors needs Triton's scratch allocator, set per thread context.
        from ..kernels.linear_tma import ensure_allocator
        names["_scratch"] = ensure_allocator
        head.append("    _scratch()")
    used = sorted({a[2] for step in replay.steps if step[0] == "launch" for a in step[6] if a[1] == _IN})
    head += [f"    i{i} = inputs[{i}].data_ptr()" for i in used]
    if replay.params:
        head.append("    " + "".join(f"p{k}, " for k in range(len(replay.params))) + "= ptrs")
    plain, hooked = [], []
    for n, step in enumerate(replay.steps):
        if step[0] == "fill":
            _, where, at, span, dtype, value = step
            names[f"_fill{n}"] = (dtype, value)
            target = f"b{at}" if where == _OWN else f"ws.narrow(0, {at}, {span}).view(_fill{n}[0])"
            plain.append(f"    {target}.fill_(_fill{n}[1])")
            hooked.append(plain[-1])
            continue
        if step[0] == "call":
            plain.append(_call_line(n, step, names))
            hooked.append(plain[-1])
            continue
        _, _, kernel, grid, values, _, args = step
        exprs = _constants(n, values, names)
        for pos, where, at, offset, _, _ in args:
            exprs[pos] = (f"i{at} + {offset}" if where == _IN else f"p{at} + {offset}" if where == _PARAM
                          else f"o{at} + {offset}" if where == _OWN else f"w + {at + offset}")
        names.update({f"_run{n}": kernel.run, f"_fn{n}": kernel.function, f"_pm{n}": kernel.packed_metadata,
                      f"_meta{n}": kernel.launch_metadata, f"_grid{n}": grid})
        call_args = ", ".join(exprs)
        start = f"    _run{n}({grid[0]}, {grid[1]}, {grid[2]}, stream, _fn{n}, _pm{n}, "
        plain.append(start + f"None, None, None, {call_args})")
        hooked.append(start + f"_meta{n}(_grid{n}, stream, {call_args}), enter, exit_, {call_args})")
    source = "\n".join(["def plain(inputs, ptrs, stream):", *head, *plain, f"    return {owned}",
                        "def hooked(inputs, ptrs, stream, enter, exit_):", *head, *hooked, f"    return {owned}"])
    exec(compile(source, f"<vitfast replay of {len(replay.steps)} steps>", "exec"), names)
    return names["plain"], names["hooked"], driver, knobs


def _constants(n: int, values: list, names: dict[str, Any]) -> list[str]:
    """The generated names of step ``n``'s recorded argument values (``_c<n>_<pos>``, bound in ``names``):
    the expressions a step's argument list starts from, before its tensor slots replace theirs."""
    for pos, value in enumerate(values):
        names[f"_c{n}_{pos}"] = value
    return [f"_c{n}_{pos}" for pos in range(len(values))]


def _call_line(n: int, step: tuple, names: dict[str, Any]) -> str:
    """The generated line of a ``call`` step: the aten op on views rebuilt from the recorded slots (a
    tensor object per argument, which launches avoid by passing addresses; these are cuBLAS products,
    rare and long on the GPU)."""
    _, func, _, _, values, kwnames, args = step
    exprs = _constants(n, values, names)
    for pos, where, at, _, view, span in args:
        names[f"_view{n}_{pos}"] = view
        ref = (f"inputs[{at}]" if where == _IN else f"_params[{at}]" if where == _PARAM else f"b{at}" if where == _OWN
               else f"ws.narrow(0, {at}, {span})")
        exprs[pos] = f"_v({ref}, _view{n}_{pos})"
    names[f"_op{n}"] = func
    positional = exprs[:len(exprs) - len(kwnames)]
    keywords = [f"{k}={e}" for k, e in zip(kwnames, exprs[len(exprs) - len(kwnames):])]
    return f"    _op{n}({', '.join(positional + keywords)})"


def _view(ref: Tensor, view: tuple) -> Tensor:
    """The recorded view (shape, strides, element offset, dtype) of ``ref``, for the interpreter and
    the ``call`` steps."""
    size, stride, offset, dtype = view
    if ref.dtype != dtype:
        ref = ref.view(dtype)
    return ref.as_strided(size, stride, ref.storage_offset() + offset)


_DTYPE, _DEVICE = (operator.attrgetter(name) for name in ("dtype", "device"))


def _meta(tensors: tuple[Tensor, ...]) -> tuple:
    """The shapes, strides, dtypes and devices of ``tensors``, in one tuple (built in C)."""
    # size() rather than the shape property: the same torch.Size, at two thirds of the cost.
    return tuple(chain(map(Tensor.size, tensors), map(Tensor.stride, tensors), map(_DTYPE, tensors),
                       map(_DEVICE, tensors)))


def is_slot(template: Any) -> bool:
    return type(template) is tuple and len(template) == 4 and isinstance(template[0], int)


def _slots(template: Any) -> list[tuple]:
    """The tensor slots of an output template, in order."""
    if is_slot(template):
        return [template]
    if type(template) in (tuple, list):
        return [s for t in template for s in _slots(t)]
    return []


def _placed(template: Any, home: dict[int, tuple[int, int]], allocs: list[list], claimed: set | None = None) -> Any:
    """The output template with buffers renamed to their owned allocation, and a slot's view None where
    the allocation is the tensor returned (its shape and strides made the returned ones, for the first
    output a buffer has when that output covers it whole)."""
    claimed = set() if claimed is None else claimed
    if is_slot(template):
        where, base, _, view = template
        if where == _BUF:
            where, base = home[base]
            alloc = allocs[base]
            size, stride, offset, dtype = view
            if base not in claimed and offset == 0 and dtype == alloc[2] and math.prod(size) == math.prod(
                    alloc[0]) and _contiguous(size, stride) and _contiguous(alloc[0], alloc[1]):
                claimed.add(base)
                alloc[0], alloc[1] = size, stride  # allocated as returned: no view to make
                return (where, base, None, None)
            claimed.add(base)  # its shape is fixed now: later outputs of the buffer are views
        return (where, base, None, view)
    if type(template) in (tuple, list):
        return type(template)(_placed(t, home, allocs, claimed) for t in template)
    return template


def _contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for n, st in zip(reversed(size), reversed(stride)):
        if n != 1 and st != expected:
            return False
        expected *= n
    return True


def _rebuild(template: Any, inputs: list[Tensor], owned: tuple[Tensor, ...]) -> Any:
    if is_slot(template):
        where, base, _, view = template
        if where == _OWN:
            return owned[base] if view is None else _view(owned[base], view)
        ref = inputs[base]
        if ref.shape == view[0] and ref.stride() == view[1] and view[2] == 0 and ref.dtype == view[3]:
            return ref
        return _view(ref, view)
    if type(template) in (tuple, list):
        return type(template)(_rebuild(t, inputs, owned) for t in template)
    return template
