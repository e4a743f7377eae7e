"""Compile every vitfast kernel for Hopper (sm_90) without a GPU: ``triton.compile`` to PTX and cubin.

    python benchmarks/hopper_compile.py          # each kernel variant in its first config after pruning
    python benchmarks/hopper_compile.py --all    # every config the autotuner would keep

The interpreter proves what the kernels compute; this proves the installed Triton turns them into
sm_90 code (wgmma where the tiles allow it) and reports the shared memory each config uses. Run it
with the Triton of the GPU image (3.6) before a GPU session to find compile errors for free.
``TRITON_INTERPRET`` must be unset: the interpreter replaces the kernels with Python functions.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Variant:
    name: str
    kernel: object  # the @triton.jit function, or the Autotuner wrapping it
    pointers: dict[str, str]  # argument -> element type ("bf16", "fp32", "u8", ...)
    constexprs: dict[str, object]
    prune_args: dict[str, object] = field(default_factory=dict)  # what the autotune pruner reads
    floats: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)  # fixed launch config for kernels without autotuning


def variants() -> list[Variant]:
    from vitfast.kernels import attention as A
    from vitfast.kernels import gated_linear as G
    from vitfast.kernels import layer_norm as LN
    from vitfast.kernels import linear as L
    from vitfast.kernels import _random as R
    from vitfast.kernels import patch_embed as PE

    bf, f32 = "bf16", "fp32"
    out: list[Variant] = []
    bm, bn, warps = LN._launch_config(768)
    ln_cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=1)
    out.append(Variant("layer_norm fwd + residual, 768", LN._layer_norm_fwd_kernel,
                       dict(X=bf, R=bf, Y=bf, S=bf, W=f32, B=f32, MEAN=f32, RSTD=f32),
                       dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=True, STORE_STATS=True),
                       floats=("eps",), config=ln_cfg))
    out.append(Variant("layer_norm bwd, 768", LN._layer_norm_bwd_kernel,
                       dict(DY=bf, DS=bf, XIN=bf, W=f32, MEAN=f32, RSTD=f32, DX=bf, DW_PART=f32, DB_PART=f32),
                       dict(HAS_DS=True, HAS_WEIGHT=True, COMPUTE_DX=True, COMPUTE_DW=True, COMPUTE_DB=True),
                       config=ln_cfg))
    big = dict(M=50432, N=3072, K=768, X=torch.empty(0, dtype=torch.bfloat16))
    drop = ("dropout_p", "keep_scale")
    # (dtype, activation, precision, dropout and row scale): the last is an out-projection in training.
    for dtype, act, prec, dropping in ((bf, "gelu", "ieee", False), (bf, "none", "ieee", False),
                                       (f32, "gelu_tanh", "tf32", False), (bf, "none", "ieee", True)):
        ptrs = {n: dtype for n in ("X", "W", "B", "R", "Y", "Z")}
        tensor = torch.empty(0, dtype=torch.bfloat16 if dtype == bf else torch.float32)
        label = f"linear {dtype} {act} + residual{' + scale' if act == 'none' else ''}"
        out.append(Variant(label + (" + dropout + row scale" if dropping else ""), L._linear_kernel,
                           {**ptrs, "S": f32, "SEED": "i64", "ROW_SCALE": f32},
                           dict(ACTIVATION=act, HAS_BIAS=True, HAS_SCALE=act == "none", HAS_RESIDUAL=True,
                                STORE_PREACT=act != "none", DROPOUT=dropping, HAS_ROW_SCALE=dropping,
                                INPUT_PRECISION=prec), {**big, "X": tensor}, floats=drop))
    epilogue_cfg = dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=1)
    for act, scale, dropping in (("gelu", False, False), ("gelu", True, False), ("none", True, False),
                                 ("silu", False, False), ("gelu", False, True), ("none", True, True)):
        label = f"linear epilogue bwd {act}{' + scale' if scale else ''}{' + dropout + row scale' if dropping else ''}"
        out.append(Variant(label, L._epilogue_bwd_kernel,
                           dict(DY=bf, Z=bf, S=f32, DZ=bf, DS_PART=f32, SEED="i64", ROW_SCALE=f32),
                           dict(ACTIVATION=act, HAS_SCALE=scale, STORE_DZ=True, COMPUTE_DSCALE=scale, READ_Z=True,
                                DROPOUT=dropping, HAS_ROW_SCALE=dropping), config=epilogue_cfg, floats=drop))
    # EVA02-B's SwiGLU fc1 at batch 256: 256·257 tokens, 768 -> 2·2048.
    gated = dict(M=65792, H=2048, K=768)
    for dtype, act, preact, prec, dropping in ((bf, "silu", True, "ieee", False), (bf, "gelu", False, "ieee", False),
                                               (f32, "silu", True, "tf32", False), (bf, "silu", True, "ieee", True)):
        tensor = torch.empty(0, dtype=torch.bfloat16 if dtype == bf else torch.float32)
        label = f"gated_linear {dtype} {act}{' + preact' if preact else ''}{' + dropout' if dropping else ''}"
        out.append(Variant(label, G._gated_linear_kernel,
                           {**{n: dtype for n in ("X", "WG", "WV", "BG", "BV", "Y", "Z")}, "SEED": "i64"},
                           dict(ACTIVATION=act, HAS_GATE_BIAS=True, HAS_VALUE_BIAS=True, STORE_PREACT=preact,
                                DROPOUT=dropping, INPUT_PRECISION=prec), {**gated, "X": tensor}, floats=drop))
    for dropping in (False, True):
        out.append(Variant(f"gated_linear epilogue bwd silu{' + dropout' if dropping else ''}",
                           G._gated_epilogue_bwd_kernel, dict(DY=bf, Z=bf, DZ=bf, SEED="i64"),
                           dict(ACTIVATION="silu", DROPOUT=dropping), config=epilogue_cfg, floats=drop))
    pe_prune = dict(D=768, K=768, TOKENS_PER_SPLIT=50176, X=torch.empty(0, dtype=torch.bfloat16),
                    W=torch.empty(0, dtype=torch.bfloat16))
    pe_common = dict(P=16, PREFIX=1, INPUT_PRECISION="ieee")
    out.append(Variant("patch_embed fwd 224/16 + CLS + pos", PE._patch_embed_autotuned,
                       dict(X=bf, W=bf, BIAS=f32, CLS=f32, CLS_POS=f32, POS=f32, OUT=bf),
                       dict(pe_common, HAS_BIAS=True, HAS_CLS_POS=True, HAS_POS=True), pe_prune))
    out.append(Variant("patch_embed dweight", PE._dweight_autotuned, dict(DT=bf, X=bf, DW=f32), pe_common, pe_prune))
    out.append(Variant("patch_embed dimages", PE._dimages_autotuned, dict(DT=bf, W=bf, DX=bf), pe_common, pe_prune))
    # (head size, mask kind, padding-mask kind, causal, rope kind, queries, dropout): masks, RoPE (1
    # interleaved, 2 half, on a head size that is not a power of two), short queries (16-row tiles) and
    # dropout on the probabilities.
    for d, mask_kind, kpm_kind, causal, rope, n_q, dropping in (
            (64, 0, 0, False, 0, 197, False), (80, 1, 2, True, 0, 197, False), (128, 2, 1, False, 0, 197, False),
            (64, 0, 0, False, 1, 257, False), (80, 0, 1, True, 2, 257, False), (64, 0, 1, False, 0, 1, False),
            (64, 0, 0, False, 0, 197, True), (80, 0, 1, True, 1, 257, True)):
        mask_t = {0: f32, 1: "u8", 2: bf}[mask_kind]
        kpm_t = {0: f32, 1: "u8", 2: bf}[kpm_kind]
        consts = dict(HEAD_DIM=d, MASK_KIND=mask_kind, KPM_KIND=kpm_kind, IS_CAUSAL=causal, ROPE=rope,
                      DROPOUT=dropping, BLOCK_D=1 << (d - 1).bit_length())
        prune = dict(N_Q=n_q, N_KV=n_q if rope else 197, HEAD_DIM=d, Q=torch.empty(0, dtype=torch.bfloat16))
        label = (f"d={d} mask={mask_kind} kpm={kpm_kind}{' causal' if causal else ''}"
                 f"{f' rope={rope}' if rope else ''}{f' N_Q={n_q}' if n_q < 16 else ''}"
                 f"{' dropout' if dropping else ''}")
        out.append(Variant(f"attention fwd {label}", A._fwd_autotuned,
                           dict(Q=bf, K=bf, V=bf, O=bf, LSE=f32, MASK=mask_t, KPM=kpm_t, TAB=f32, SEED="i64"), consts,
                           prune, floats=("qk_scale", *drop)))
        bwd = dict(Q=bf, K=bf, V=bf, DO=bf, LSE=f32, DELTA=f32, DK=bf, DV=bf, DQ=bf, MASK=mask_t, KPM=kpm_t,
                   TAB=f32, SEED="i64")
        out.append(Variant(f"attention bwd dK/dV {label}", A._dkdv_autotuned, bwd, consts, prune,
                           floats=("qk_scale", "sm_scale", *drop)))
        out.append(Variant(f"attention bwd dQ {label}", A._dq_autotuned, bwd, consts, prune,
                           floats=("qk_scale", "sm_scale", *drop)))
    out.append(Variant("attention bwd delta d=64", A._attention_bwd_delta_kernel,
                       dict(O=bf, DO=bf, DLSE=f32, DELTA=f32), dict(HEAD_DIM=64, HAS_DLSE=True, BLOCK_D=64),
                       config=dict(BLOCK_M=64, num_warps=4, num_stages=1)))
    out.append(Variant("dropout keep mask (tests)", R._keep_mask_kernel, dict(SEED="i64", OUT="u8"),
                       dict(SITE=R.ATTENTION, BLOCK=128), floats=("p",), config=dict(num_warps=4, num_stages=1)))
    return out


def _configs(v: Variant, every: bool) -> list[tuple[dict, int, int]]:
    """(constexpr tile sizes, num_warps, num_stages) to compile, as the autotuner would keep them."""
    if v.config:
        c = dict(v.config)
        return [(c, c.pop("num_warps"), c.pop("num_stages"))]
    tuner = v.kernel
    configs = tuner.configs
    prune = getattr(tuner, "early_config_prune", None)
    if prune is not None:
        configs = prune(configs, {**v.constexprs, **v.prune_args})
    configs = configs if every else configs[:1]
    return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in configs]


def compile_variant(v: Variant, tiles: dict, num_warps: int, num_stages: int, capability: int = 90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = v.kernel if isinstance(v.kernel, JITFunction) else v.kernel.fn  # the Autotuner's JITFunction
    constexprs = {**v.constexprs, **tiles}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in v.pointers:
            signature[name] = "*" + v.pointers[name]
        else:
            signature[name] = "fp32" if name in v.floats else "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): x for k, x in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="every config the autotuner keeps, not just the first")
    p.add_argument("-k", default="", help="only variants whose name contains this")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter has no compiler to check")
    import triton

    print(f"triton {triton.__version__}, target sm_90", flush=True)
    failures = 0
    count = 0
    for v in variants():
        if a.k not in v.name:
            continue
        for tiles, warps, stages in _configs(v, a.all):
            t0 = time.perf_counter()
            label = f"{v.name} {tiles} warps={warps} stages={stages}"
            try:
                k = compile_variant(v, tiles, warps, stages)
            except Exception as e:  # noqa: BLE001 - report every failing variant, then fail
                failures += 1
                print(f"FAIL {label}: {type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}", flush=True)
                continue
            count += 1
            ptx = k.asm.get("ptx", "")
            print(f"ok   {label}: shared {k.metadata.shared} B, wgmma {'wgmma' in ptx}, "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
    print(f"{count} compiled, {failures} failed")
    return 1 if failures or not count else 0


if __name__ == "__main__":
    sys.exit(main())
