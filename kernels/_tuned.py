"""The tuned-picks file: the configs ``python -m vitfast tune`` measured, read back by later processes.

Where: ``$VITFAST_TUNING_FILE`` when set, else ``tuning-<gpu>.json`` in ``$XDG_CACHE_HOME/vitfast``
(``~/.cache/vitfast`` when that is unset), one file per GPU name. What (JSON)::

    {"schema": 1, "gpu": "NVIDIA H100 80GB HBM3", "triton": "3.6.0",
     "kernels": {"linear": {"source": "<sha256 of the jit function>",
                            "picks": {"m=256 n=2304 k=768 dtype=bfloat16 ...":
                                      {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8,
                                       "num_warps": 4, "num_stages": 5, "ms": 0.0123}}}}}

A pick is used only where the file's GPU name and Triton version are this process's and the kernel's
source hash is that of the kernel now loaded. Anything else is ignored with one ``TuningFileWarning``
per file and reason, never an exception: a corrupt file (unreadable, not JSON, another schema), a
foreign one (another GPU or Triton version), stale picks (a kernel whose source changed since).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import triton

from ._configs import key_text

SCHEMA = 1
_SETTINGS = ("num_warps", "num_stages")  # a pick's launch settings besides its constexprs
_warned: set[tuple[str, str]] = set()


class TuningFileWarning(UserWarning):
    """A tuned-picks file, or part of it, is ignored: the rules choose instead."""


def warn_once(path: Path, reason: str, message: str) -> None:
    """Warn about ``path`` once per ``reason`` ("corrupt", "foreign", "stale") in this process."""
    if (str(path), reason) not in _warned:
        _warned.add((str(path), reason))
        warnings.warn(f"vitfast: {message}", TuningFileWarning, stacklevel=3)


def forget_warnings() -> None:
    """Let every file warn again (``_select.reset``)."""
    _warned.clear()


def default_path(gpu: str) -> Path:
    """The tuned-picks file for GPU ``gpu``: ``$VITFAST_TUNING_FILE`` when set, else
    ``$XDG_CACHE_HOME/vitfast/tuning-<gpu>.json`` (``~/.cache`` when XDG_CACHE_HOME is unset)."""
    chosen = os.environ.get("VITFAST_TUNING_FILE")
    if chosen:
        return Path(chosen)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    return Path(cache) / "vitfast" / f"tuning-{slug}.json"


def source_hash(fn: Any) -> str:
    """The hash that ties picks to a kernel's code: Triton's own key of a jit function (its source and
    that of the jit functions and constexpr globals it uses), or, under the interpreter, which has
    none, the sha256 of the kernel's source."""
    key = getattr(fn, "cache_key", None)
    if key is not None:
        return key
    return hashlib.sha256(inspect.getsource(fn.fn).encode()).hexdigest()


class Pick(NamedTuple):
    """A measured config and its median time in ms (None where not recorded)."""
    config: triton.Config
    ms: float | None


class KernelPicks(NamedTuple):
    """One kernel's section of a file: the source hash it was tuned with, its picks by key text."""
    source: str
    picks: dict[str, Pick]


class _Corrupt(ValueError):
    """The file's content does not follow the schema (the message says where)."""


def _pick(where: str, entry: Any) -> Pick:
    if not isinstance(entry, dict) or not all(k in entry for k in _SETTINGS):
        raise _Corrupt(f"{where}: expected an object with {', '.join(_SETTINGS)}")
    params = {k: v for k, v in entry.items() if k not in (*_SETTINGS, "ms")}
    for name, value in [*params.items(), *((k, entry[k]) for k in _SETTINGS)]:
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise _Corrupt(f"{where}: {name} is {value!r}, expected a positive integer")
    ms = entry.get("ms")
    if ms is not None and not (isinstance(ms, (int, float)) and not isinstance(ms, bool) and math.isfinite(ms)):
        raise _Corrupt(f"{where}: ms is {ms!r}, expected a number")
    return Pick(triton.Config(params, num_warps=entry["num_warps"], num_stages=entry["num_stages"]), ms)


def _entry(pick: Pick) -> dict:
    c = pick.config
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages,
            **({} if pick.ms is None else {"ms": pick.ms})}


def _kernels(doc: Any) -> dict[str, KernelPicks]:
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise _Corrupt(f"schema {found!r}, expected {SCHEMA}")
    kernels = doc.get("kernels")
    if not isinstance(doc.get("gpu"), str) or not isinstance(doc.get("triton"), str) or not isinstance(kernels, dict):
        raise _Corrupt("expected string fields gpu and triton and an object kernels")
    out = {}
    for name, section in kernels.items():
        if (not isinstance(section, dict) or not isinstance(section.get("source"), str)
                or not isinstance(section.get("picks"), dict)):
            raise _Corrupt(f"kernel {name!r}: expected a string source and an object picks")
        out[name] = KernelPicks(section["source"], {key: _pick(f"kernel {name!r} key {key!r}", entry)
                                                    for key, entry in section["picks"].items()})
    return out


def _read(path: Path) -> Any:
    """The file's JSON; None when there is no file; raises _Corrupt when it cannot be read or parsed."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise _Corrupt(f"cannot be read ({type(e).__name__}: {e})") from e
    try:
        return json.loads(text)
    except ValueError as e:
        raise _Corrupt(f"is not JSON ({e})") from e


def load(path: Path, gpu: str) -> dict[str, KernelPicks]:
    """The picks of ``path`` for GPU ``gpu`` under this Triton, by kernel name; empty when the file is
    missing, and, with one warning, when it is corrupt or foreign."""
    try:
        doc = _read(path)
        if doc is None:
            return {}
        kernels = _kernels(doc)
    except _Corrupt as e:
        warn_once(path, "corrupt", f"tuned configs in {path} ignored: the file {e}; the rules choose "
                                   "(rerun `python -m vitfast tune` to replace it)")
        return {}
    if (doc["gpu"], doc["triton"]) != (gpu, triton.__version__):
        warn_once(path, "foreign", f"tuned configs in {path} ignored: tuned on {doc['gpu']} with Triton "
                                   f"{doc['triton']}, this is {gpu} with Triton {triton.__version__} "
                                   "(rerun `python -m vitfast tune`)")
        return {}
    return kernels


def pick(path: Path, kernels: dict[str, KernelPicks], name: str, fn: Any, key: tuple,
         params: set[str]) -> triton.Config | None:
    """Kernel ``name``'s pick for ``key`` in the loaded ``kernels`` of ``path``: None when there is
    none, and, with one warning per file, when the kernel's source changed since tuning (``fn`` is
    the jit function now loaded) or the pick does not set exactly the constexprs ``params``."""
    section = kernels.get(name)
    if section is None:
        return None
    if section.source != source_hash(fn):
        warn_once(path, "stale", f"tuned configs for {name} in {path} ignored: the kernel changed since "
                                 "they were measured; the rules choose (rerun `python -m vitfast tune`)")
        return None
    found = section.picks.get(key_text(key))
    if found is not None and set(found.config.kwargs) != params:
        warn_once(path, "corrupt", f"tuned configs for {name} in {path} ignored: a pick sets "
                                   f"{sorted(found.config.kwargs)}, the kernel takes {sorted(params)}")
        return None
    return None if found is None else found.config


def save(path: Path, gpu: str, measured: dict[str, KernelPicks]) -> None:
    """Write ``measured`` (kernel name -> source hash and picks by key text) into ``path`` for GPU
    ``gpu``, over the picks already there for this GPU, Triton version and kernel source; whatever
    else the file held is replaced. Atomic (a temporary file renamed over it): a reader never sees
    half a file."""
    kept = load(path, gpu)
    kernels = {}
    for name in sorted({*kept, *measured}):
        old, new = kept.get(name), measured.get(name)
        if old is not None and (new is None or new.source == old.source):
            new = KernelPicks(old.source, {**old.picks, **(new.picks if new else {})})
        kernels[name] = {"source": new.source, "picks": {key: _entry(p) for key, p in sorted(new.picks.items())}}
    doc = {"schema": SCHEMA, "gpu": gpu, "triton": triton.__version__, "kernels": kernels}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(f.name, path)
