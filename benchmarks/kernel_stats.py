"""Registers, spills and shared memory of the Triton kernels a process ran, for benchmarks/NOTES.md.

    ...                   # run the model
    print_kernel_stats()  # one row per compiled variant

Each launch runs the one config its rule or tuned pick chose (``vitfast.kernels._select``), so every
variant loaded on the GPU is one that ran: a row per jit function of ``vitfast.kernels`` and
constexpr combination (tile sizes, activation, epilogue flags), followed by the launch keys that
chose its config (the GEMM sites' N and K tell QKV from fc1). Read off Triton's compiled-kernel
metadata (``n_regs``, and ``n_spills`` in 4-byte words, shown here as bytes; both exist once the
binary is loaded on the GPU), so it needs a GPU. ``profile_vit.py --kernel-stats`` calls it.
"""
from __future__ import annotations

import importlib

MODULES = ("attention", "linear", "gated_linear", "layer_norm", "patch_embed", "_rope", "_random")


def _jit_functions() -> dict[str, object]:
    from triton.runtime.jit import JITFunction

    return {obj.__name__: obj for name in MODULES
            for obj in vars(importlib.import_module(f"vitfast.kernels.{name}")).values()
            if isinstance(obj, JITFunction)}


def _constants(kernel, fn) -> dict:
    out = {}
    for key, value in getattr(kernel.src, "constants", {}).items():
        idx = key[0] if isinstance(key, tuple) and len(key) == 1 else None
        if isinstance(idx, int) and idx < len(fn.arg_names) and isinstance(value, (bool, int, float, str)):
            out[fn.arg_names[idx]] = value
    return out


def _loaded(fn):
    """(kernel, its constexprs) for every variant of ``fn`` that was loaded on a GPU."""
    for device_cache in getattr(fn, "device_caches", {}).values():
        for kernel in list(device_cache[0].values()):
            if getattr(kernel, "n_regs", None) is not None:
                yield kernel, _constants(kernel, fn)


def _chosen_for(fn, kernel, consts: dict) -> list[str]:
    """The launch keys whose chosen config this variant runs (same tiles, warps and stages)."""
    from vitfast.kernels import _configs, _select

    md = kernel.metadata
    return [_configs.key_text(key) for k in _select._kernels if k.fn is fn for (_, key), c in k.chosen.items()
            if all(consts.get(p) == v for p, v in c.kwargs.items())
            and (c.num_warps, c.num_stages) == (md.num_warps, md.num_stages)]


def print_kernel_stats() -> None:
    print("\n== Triton kernels that ran, one row per compiled variant (and the launch keys that chose its config)")
    print(f"{'kernel':30} {'warps':>5} {'stages':>6} {'regs':>5} {'spill B':>7} {'smem KiB':>8}  constexprs")
    for name, fn in sorted(_jit_functions().items()):
        for kernel, consts in _loaded(fn):
            md = kernel.metadata
            shown = {k: v for k, v in consts.items() if k.isupper()}
            print(f"{name[:30]:30} {md.num_warps:>5} {md.num_stages:>6} {kernel.n_regs:>5} {4 * kernel.n_spills:>7} "
                  f"{md.shared / 1024:>8.1f}  {shown}")
            for key in _chosen_for(fn, kernel, consts):
                print(f"{'':30}   chosen for {key}")
