"""Static facts of the kernel variants the JIT compiled under the stand-in driver: registers, spill stack
and shared memory from the cubin (``cuobjdump``), the config and constexprs it was specialized for, and
whether its PTX uses wgmma and TMA. What the GPU would load, read on any machine.

>>> with host_driver.active() as drv:      # doctest: +SKIP
...     model(x)
...     rows = static_facts(drv)           # while active: the PTX is read from the JIT's cache
"""
from __future__ import annotations

import hashlib

from .cubin import cuobjdump_resources
from .host_driver import DEVICE, LoadedKernel, StandInDriver

# The launch configuration among a kernel's constexprs (the rest are its feature flags and the JIT's
# specializations, e.g. a unit stride).
_TILE_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D", "GROUP_M", "BLOCK_KV", "KV_CHUNKS")


def _ptx(kernel: LoadedKernel) -> str:
    """The PTX of the JIT's compiled kernel whose cubin the stand-in loaded."""
    cache = kernel.jit_function.device_caches.get(DEVICE)
    for compiled in (cache[0].values() if cache else ()):
        if compiled.kernel is kernel.cubin:
            return compiled.asm["ptx"]
    raise LookupError(f"{kernel.name}: no compiled kernel in the JIT's cache holds this cubin (read the facts "
                      "while the stand-in driver is still active)")


def _divisible_integers(kernel: LoadedKernel) -> list[str]:
    """The integer arguments the JIT specialized as multiples of 16 (pointers always are, here): two
    variants with the same constexprs differ by these, e.g. M = 197 tokens at batch 1 and 6,304 at 32."""
    names = kernel.jit_function.arg_names
    out = []
    for path, attrs in kernel.src.attrs.items():
        name = names[path[0]] if len(path) == 1 else None
        if name and not str(kernel.src.signature.get(name, "")).startswith("*") and \
                any(attr[0] == "tt.divisibility" for attr in attrs):
            out.append(name)
    return out


def variant_id(kernel: LoadedKernel) -> str:
    """A short stable name for one compiled variant: the kernel's name and its cubin's hash."""
    return f"{kernel.name}:{hashlib.sha1(kernel.cubin).hexdigest()[:8]}"


def static_facts(drv: StandInDriver) -> list[dict]:
    """One row per distinct variant loaded by ``drv`` (``variant_id``), in load order. The JIT may load one
    binary more than once (two specializations, say a size divisible by 16 or not, that compile to the
    same code); ``loads`` counts them."""
    rows: dict[str, dict] = {}
    for kernel in drv.kernels:
        variant = variant_id(kernel)
        if variant in rows:
            rows[variant]["loads"] += 1
            continue
        usage = cuobjdump_resources(kernel.cubin)[kernel.name]
        if (usage["registers"], usage["stack_bytes"]) != (kernel.registers, kernel.spilled_bytes):
            raise RuntimeError(f"{kernel.name}: cuobjdump reads {usage}, the cubin's .nv.info "
                               f"{kernel.registers} registers and {kernel.spilled_bytes} spill bytes")
        ptx = _ptx(kernel)
        constexprs = kernel.constexprs()
        md = kernel.metadata
        rows[variant] = {
            "variant": variant,
            "kernel": kernel.name,
            "tile": {k: constexprs[k] for k in _TILE_NAMES if k in constexprs},
            "num_warps": md.num_warps,
            "num_stages": md.num_stages,
            "registers": usage["registers"],
            "spilled_bytes": usage["stack_bytes"],
            "static_shared_bytes": usage["static_shared_bytes"],
            "dynamic_shared_bytes": md.shared,
            "wgmma": "wgmma.mma_async" in ptx,
            "tma": "cp.async.bulk.tensor" in ptx,
            "constexprs": {k: v for k, v in constexprs.items() if k not in _TILE_NAMES},
            "divisible_by_16": _divisible_integers(kernel),
            "loads": 1,
        }
    return list(rows.values())
