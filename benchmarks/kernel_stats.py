"""Registers, spills and shared memory of the Triton kernels a process ran, for benchmarks/NOTES.md.

    record_picks()        # before the first forward: remember what each autotuned launch ran
    ...                   # run the model
    print_kernel_stats()  # one row per launched variant

For an autotuned kernel the rows are the configs its autotuner picked, one per autotune key and
constexpr combination (a GEMM's activation and epilogue are constexprs, not part of the key); for the
other jit functions of ``vitfast.kernels``, every variant that was loaded. Read off Triton's
compiled-kernel metadata (``n_regs``, and ``n_spills`` in 4-byte words, shown here as bytes; both
exist once the binary is loaded on the GPU), so it needs a GPU. ``profile_vit.py --kernel-stats``
calls both.
"""
from __future__ import annotations

import importlib

MODULES = ("attention", "linear", "gated_linear", "layer_norm", "patch_embed", "_rope", "_random")

# (jit function name, constexpr kwargs of the launch, autotune key) -> the config the launch ran
_picks: dict[tuple[str, tuple, tuple], object] = {}


def record_picks() -> None:
    """Wrap ``Autotuner.run`` so that every autotuned launch of this process records its config."""
    from triton.runtime.autotuner import Autotuner

    if getattr(Autotuner.run, "_vitfast_records", False):
        return
    original = Autotuner.run

    def run(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        key = tuple(named.get(k) for k in self.keys)
        consts = tuple(sorted((k, v) for k, v in kwargs.items() if k.isupper() and isinstance(v, (bool, int, str))))
        _picks[(self.base_fn.__name__, consts, key)] = self.best_config
        return out

    run._vitfast_records = True
    Autotuner.run = run


def _jit_functions() -> dict[str, object]:
    from triton.runtime.jit import JITFunction

    found = {}
    for name in MODULES:
        for obj in vars(importlib.import_module(f"vitfast.kernels.{name}")).values():
            for _ in range(4):  # autotune / heuristics wrappers hold the jit function in .fn
                if isinstance(obj, JITFunction):
                    found[obj.__name__] = obj
                    break
                obj = getattr(obj, "fn", None)
    return found


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


def _row(name: str, kernel, consts: dict, tail: str = "") -> str:
    md = kernel.metadata
    shown = {k: v for k, v in consts.items() if k.isupper()}
    return (f"{name[:30]:30} {md.num_warps:>5} {md.num_stages:>6} {kernel.n_regs:>5} {4 * kernel.n_spills:>7} "
            f"{md.shared / 1024:>8.1f}  {shown}{tail}")


def print_kernel_stats() -> None:
    fns = _jit_functions()
    autotuned = {name for name, _, _ in _picks}
    print("\n== Triton kernels that ran: autotuned ones as picked per key and constexprs, the others as loaded")
    print(f"{'kernel':30} {'warps':>5} {'stages':>6} {'regs':>5} {'spill B':>7} {'smem KiB':>8}  constexprs")
    for (name, consts, key), config in sorted(_picks.items(), key=lambda item: str(item[0])):
        want = {**dict(consts), **config.kwargs}
        hits = [(k, c) for k, c in _loaded(fns.get(name)) if all(c.get(a) == v for a, v in want.items())
                and k.metadata.num_warps == config.num_warps and k.metadata.num_stages == config.num_stages]
        for kernel, c in hits[:1]:
            print(_row(name, kernel, c, f"  key {key}"))
        if not hits:
            print(f"{name[:30]:30} picked {config} for key {key}: no loaded variant matches")
    for name in sorted(set(fns) - autotuned):
        for kernel, c in _loaded(fns[name]):
            print(_row(name, kernel, c))
