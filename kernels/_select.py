"""The config of each launch: a tuned pick when the tuned-picks file has one, else the rule; measured on
the spot while a tuning session is open.

A launcher describes its launch by a key (``_configs``) and hands ``config`` a function that runs the
kernel in a given config. Outside a session the answer costs a dictionary lookup after the first
launch of each key: the rule, or the file's pick (read lazily on a device's first launch), is
remembered per (kernel, device, key) for the life of the process. Inside a session
(``vitfast.tuning.tune``) each key not yet measured in it is measured: every candidate the kernel's
pruner keeps is compiled (all at once, ``_precompile``) and run under the session's timer, the
fastest is kept, launched, and saved with the others when the session closes. Sessions are
process-wide: tune from one thread.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import triton
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError

from . import _configs, _precompile, _tuned
from ._tuning import device_facts, interpreting

# A timer takes a function that launches the kernel once and returns its time in ms.
Timer = Callable[[Callable[[], None]], float]
# What a candidate may fail with on the GPU: it does not fit (Triton's autotuner skips the same).
_UNFIT = (OutOfResources, CompileTimeAssertionFailure, PTXASError)


@dataclass(eq=False)
class Kernel:
    """A kernel whose launch config is chosen per launch key.

    name: its name in the tuned-picks file; fn: the ``@triton.jit`` function (its source hash keys
    the picks); rule(arch, key), candidates(key), interpreter(key): from ``_configs``.
    """
    name: str
    fn: Any
    rule: Callable[[int | str, tuple], triton.Config]
    candidates: Callable[[tuple], list[triton.Config]]
    interpreter: Callable[[tuple], triton.Config]
    chosen: dict[tuple[int, tuple], triton.Config] = field(default_factory=dict)


@dataclass
class _File:
    path: Path
    kernels: dict[str, _tuned.KernelPicks]


@dataclass
class Session:
    """What one tuning session measured, (kernel, device, key) -> the fastest config and its time, and,
    once closed, the files it wrote."""
    timer: Timer
    measured: dict[tuple[Kernel, int, tuple], _tuned.Pick] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)


_kernels: list[Kernel] = []  # every kernel whose choices ``reset`` forgets
_files: dict[str, _File] = {}  # by GPU name: its tuned-picks file as loaded
_session: Session | None = None
# Bumped whenever the configs chosen may change (a tuning session closed, ``reset``): a settled call's
# key holds it, so that what it recorded before is not replayed with the old configs (modules/_replay.py).
generation = 0


def kernel(name: str, fn: Any, rule: Callable[[int | str, tuple], triton.Config],
           candidates: Callable[[tuple], list[triton.Config]], interpreter: Callable[[tuple], triton.Config]) -> Kernel:
    """Declare a kernel (at import of its module); see ``Kernel``."""
    k = Kernel(name, fn, rule, candidates, interpreter)
    _kernels.append(k)
    return k


def tile_meta(config: triton.Config) -> dict:
    """A config's launch keywords: its constexprs, num_warps and num_stages."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def config(k: Kernel, device: int, key: tuple, run: Callable[[triton.Config], None]) -> triton.Config:
    """The config to launch ``k`` with for ``key`` on ``device`` (``Tensor.get_device()``). ``run(c)``
    launches the kernel in config ``c``; only a tuning session calls it, to time candidates."""
    if _session is not None:
        return _measure(_session, k, device, key, run)
    chosen = k.chosen.get((device, key))
    if chosen is None:
        chosen = k.chosen[device, key] = _default(k, device, key)
    return chosen


def _default(k: Kernel, device: int, key: tuple) -> triton.Config:
    name, arch = device_facts(device)
    fallback = k.interpreter(key) if interpreting() else k.rule(arch, key)
    loaded = _files.get(name)
    if loaded is None:
        path = _tuned.default_path(name)
        loaded = _files[name] = _File(path, _tuned.load(path, name))
    tuned = _tuned.pick(loaded.path, loaded.kernels, k.name, k.fn, key, set(fallback.kwargs))
    return fallback if tuned is None else tuned


def _measure(session: Session, k: Kernel, device: int, key: tuple, run: Callable[[triton.Config], None]
             ) -> triton.Config:
    done = session.measured.get((k, device, key))
    if done is not None:
        return done.config
    best = _tuned.Pick(_default(k, device, key), None)
    candidates = k.candidates(key)
    if not interpreting():  # compile them all at once, on every core, before timing them one by one
        with _precompile.compiling():
            for candidate in candidates:
                run(candidate)
    for candidate in candidates:
        try:
            ms = session.timer(lambda: run(candidate))
        except _UNFIT:
            continue
        if math.isfinite(ms) and (best.ms is None or ms < best.ms):
            best = _tuned.Pick(candidate, ms)
    if best.ms is not None:  # no candidate ran: nothing to save, the default stays
        session.measured[k, device, key] = best
    k.chosen[device, key] = best.config
    return best.config


def measuring() -> bool:
    """Whether a tuning session is open (its launches time candidates: nothing to record for replay)."""
    return _session is not None


def open_session(timer: Timer) -> Session:
    """Start measuring every launch key met from now on, until ``close_session``."""
    global _session
    if _session is not None:
        raise RuntimeError("a tuning session is already open in this process")
    _session = Session(timer)
    return _session


def close_session(session: Session) -> None:
    """End ``session`` and save what it measured into each device's tuned-picks file
    (``session.written``)."""
    global _session, generation
    if _session is not session:
        raise RuntimeError("close_session: this session is not the open one")
    _session = None
    generation += 1
    by_device: dict[int, dict[str, _tuned.KernelPicks]] = {}
    for (k, device, key), found in session.measured.items():
        picks = by_device.setdefault(device, {}).setdefault(k.name, _tuned.KernelPicks(_tuned.source_hash(k.fn), {}))
        picks.picks[_configs.key_text(key)] = found
    for device, measured in by_device.items():
        name, _ = device_facts(device)
        path = _tuned.default_path(name)
        _tuned.save(path, name, measured)
        _files.pop(name, None)  # read again, with what was just saved, on the next new key
        session.written.append(path)


def reset() -> None:
    """Forget every choice, loaded file and warning: the next launch of each key chooses again and
    reads the tuned-picks file anew (for tests, and a process that changed VITFAST_TUNING_FILE)."""
    global generation
    generation += 1
    for k in _kernels:
        k.chosen.clear()
    _files.clear()
    _tuned.forget_warnings()
