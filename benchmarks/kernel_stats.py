"""Registers, spills and shared memory of the Triton kernels this process has compiled and run.

``print_kernel_stats()`` walks the jit functions of ``vitfast.kernels``, and for each one prints every
compiled variant that ran: for an autotuned kernel only the configs its autotuner picked, with the
autotune key they were picked for. Read off Triton's compiled-kernel metadata (``n_regs`` and
``n_spills`` come from loading the binary on the GPU), so it needs a GPU and a model that has run.
``profile_vit.py --kernel-stats`` calls it after the vitfast profile, for benchmarks/NOTES.md.
"""
from __future__ import annotations

import importlib

MODULES = ("attention", "linear", "gated_linear", "layer_norm", "patch_embed", "_rope", "_random")


def _unwrap(obj):
    """(jit function, {autotune key: picked config}) of a jit/autotuned/heuristics object, else None."""
    from triton.runtime.jit import JITFunction

    picked = {}
    for _ in range(4):
        if isinstance(obj, JITFunction):
            return obj, picked
        if hasattr(obj, "cache") and hasattr(obj, "configs"):  # triton.autotune
            picked.update(obj.cache)
        if not hasattr(obj, "fn"):
            return None
        obj = obj.fn
    return None


def _constants(kernel, fn) -> dict:
    out = {}
    for key, value in getattr(kernel.src, "constants", {}).items():
        idx = key[0] if isinstance(key, tuple) and len(key) == 1 else None
        if isinstance(idx, int) and idx < len(fn.arg_names) and isinstance(value, (bool, int, float, str)):
            out[fn.arg_names[idx]] = value
    return out


def _matches(kernel, consts: dict, config) -> bool:
    md = kernel.metadata
    return (all(consts.get(k) == v for k, v in config.kwargs.items())
            and md.num_warps == config.num_warps and md.num_stages == config.num_stages)


def print_kernel_stats() -> None:
    seen = set()
    print("\n== compiled Triton kernels that ran (autotuned ones: the picked configs only)")
    print(f"{'kernel':34} {'warps':>5} {'stages':>6} {'regs':>5} {'spills':>6} {'smem KiB':>8}  "
          "constexprs / autotune key")
    for name in MODULES:
        module = importlib.import_module(f"vitfast.kernels.{name}")
        for obj in list(vars(module).values()):
            found = _unwrap(obj)
            if found is None or id(found[0]) in seen:
                continue
            fn, picked = found
            seen.add(id(fn))
            for device_cache in getattr(fn, "device_caches", {}).values():
                for kernel in list(device_cache[0].values()):
                    try:
                        _print_one(fn, kernel, picked)
                    except Exception as e:  # noqa: BLE001 - one odd entry must not hide the others
                        print(f"{fn.__name__}: {type(e).__name__}: {e}")


def _print_one(fn, kernel, picked: dict) -> None:
    regs = getattr(kernel, "n_regs", None)
    if regs is None:  # never loaded on the GPU: compiled for a benchmark run only, or not run at all
        return
    consts = _constants(kernel, fn)
    keys = [k for k, cfg in picked.items() if _matches(kernel, consts, cfg)]
    if picked and not keys:
        return  # an autotune candidate that lost
    md = kernel.metadata
    shown = {k: v for k, v in consts.items() if k.isupper()}
    tail = f"  picked for {keys}" if keys else ""
    print(f"{fn.__name__[:34]:34} {md.num_warps:>5} {md.num_stages:>6} {regs:>5} {kernel.n_spills:>6} "
          f"{md.shared / 1024:>8.1f}  {shown}{tail}")
