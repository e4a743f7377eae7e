"""Compile every vitfast kernel for Hopper (sm_90) without a GPU: ``triton.compile`` to PTX and cubin.

    python benchmarks/hopper_compile.py                     # each kernel variant in the config its sm_90 rule picks
    python benchmarks/hopper_compile.py --batch 1 32 256    # ... at these batch sizes (default 256)
    python benchmarks/hopper_compile.py --all               # every candidate that tuning would measure
    python benchmarks/hopper_compile.py --vit-sites --json PATH   # each ViT GEMM site's pick, as the JIT specializes it
    python benchmarks/hopper_compile.py --vit-attention --json PATH   # each ViT attention shape's route and pick

The interpreter proves what the kernels compute; this proves the installed Triton turns them into
sm_90 code (wgmma where the tiles allow it) in the configs the rules pick, and that each fits the
227 KiB of shared memory an sm_90 block may use (a config over it fails here, as it would fail to
load on the GPU). Run it with the Triton of the GPU image (3.6) before a GPU session to find compile
errors for free. ``TRITON_INTERPRET`` must be unset: the interpreter replaces the kernels with Python
functions. Variants are ViT-B/16 shapes at 224 px (197 tokens, 12 heads) unless their name says.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


SMEM_LIMIT = 227 * 1024  # what one sm_90 block may use


@dataclass
class Variant:
    name: str
    kernel: object  # the @triton.jit function, or the kernels._select.Kernel whose config a rule picks
    pointers: dict[str, str]  # argument -> element type ("bf16", "fp32", "u8", ...)
    constexprs: dict[str, object]
    key: Callable[[int], tuple] | None = None  # batch size -> the launch key the rule and candidates read
    floats: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)  # fixed launch config of a kernel without a rule


def variants() -> list[Variant]:
    import triton

    from vitfast.kernels import _configs as C
    from vitfast.kernels import attention as A
    from vitfast.kernels import attention_resident as AR
    from vitfast.kernels import gated_linear as G
    from vitfast.kernels import layer_norm as LN
    from vitfast.kernels import linear as L
    from vitfast.kernels import _random as R
    from vitfast.kernels import patch_embed as PE

    bf, f32 = "bf16", "fp32"
    torch_dtype = {bf: torch.bfloat16, f32: torch.float32}
    tokens = 197
    out: list[Variant] = []
    bm, bn, warps = C.layer_norm_config(768)
    ln_cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=1)
    out.append(Variant("layer_norm fwd + residual, 768", LN._layer_norm_fwd_kernel,
                       dict(X=bf, R=bf, Y=bf, S=bf, W=f32, B=f32, MEAN=f32, RSTD=f32),
                       dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=True, STORE_STATS=True),
                       floats=("eps",), config=ln_cfg))
    out.append(Variant("layer_norm bwd, 768", LN._layer_norm_bwd_kernel,
                       dict(DY=bf, DS=bf, XIN=bf, W=f32, MEAN=f32, RSTD=f32, DX=bf, DW_PART=f32, DB_PART=f32),
                       dict(HAS_DS=True, HAS_WEIGHT=True, COMPUTE_DX=True, COMPUTE_DW=True, COMPUTE_DB=True),
                       config=ln_cfg))
    drop = ("dropout_p", "keep_scale")

    def gemm_key(n, k, dtype, prec, act, residual, dropping):
        return lambda batch: C.GemmKey(triton.next_power_of_2(batch * tokens), n, k, torch_dtype[dtype],
                                       torch_dtype[dtype], True, True, prec, act, residual, act != "none", dropping)

    # ViT-B's GEMM sites (QKV, fc1 + GELU, fc2 + residual + LayerScale, fc1 in fp32 with TF32) and an
    # out-projection in training (dropout and stochastic depth's row scale).
    for site, dtype, (n, k), act, residual, prec, dropping in (
            ("qkv", bf, (2304, 768), "none", False, "ieee", False),
            ("fc1", bf, (3072, 768), "gelu", False, "ieee", False),
            ("fc2", bf, (768, 3072), "none", True, "ieee", False),
            ("fc1", f32, (3072, 768), "gelu_tanh", False, "tf32", False),
            ("proj", bf, (768, 768), "none", True, "ieee", True)):
        label = (f"linear {dtype} {site} {act}{' + residual + scale' if residual else ''}"
                 f"{' + dropout + row scale' if dropping else ''}")
        out.append(Variant(label, L.LINEAR, {**{p: dtype for p in ("X", "W", "B", "R", "Y", "Z")},
                                            "S": f32, "SEED": "i64", "ROW_SCALE": f32},
                           dict(ACTIVATION=act, HAS_BIAS=True, HAS_SCALE=residual, HAS_RESIDUAL=residual,
                                STORE_PREACT=act != "none", DROPOUT=dropping, HAS_ROW_SCALE=dropping,
                                INPUT_PRECISION=prec), gemm_key(n, k, dtype, prec, act, residual, dropping),
                           floats=drop))
    epilogue_cfg = dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=1)
    for act, scale, dropping in (("gelu", False, False), ("gelu", True, False), ("none", True, False),
                                 ("silu", False, False), ("gelu", False, True), ("none", True, True)):
        label = f"linear epilogue bwd {act}{' + scale' if scale else ''}{' + dropout + row scale' if dropping else ''}"
        out.append(Variant(label, L._epilogue_bwd_kernel,
                           dict(DY=bf, Z=bf, S=f32, DZ=bf, DS_PART=f32, SEED="i64", ROW_SCALE=f32),
                           dict(ACTIVATION=act, HAS_SCALE=scale, STORE_DZ=True, COMPUTE_DSCALE=scale, READ_Z=True,
                                DROPOUT=dropping, HAS_ROW_SCALE=dropping), config=epilogue_cfg, floats=drop))
    # EVA02-B's SwiGLU fc1: 257 tokens per image, 768 -> 2·2048.
    for dtype, act, preact, prec, dropping in ((bf, "silu", True, "ieee", False), (bf, "gelu", False, "ieee", False),
                                               (f32, "silu", True, "tf32", False), (bf, "silu", True, "ieee", True)):
        label = f"gated_linear {dtype} {act}{' + preact' if preact else ''}{' + dropout' if dropping else ''}"

        def gated_key(batch, dtype=dtype, prec=prec, act=act, preact=preact, dropping=dropping):
            return C.GemmKey(triton.next_power_of_2(batch * 257), 2048, 768, torch_dtype[dtype], torch_dtype[dtype],
                             True, True, prec, act, False, preact, dropping)
        out.append(Variant(label, G.GATED_LINEAR,
                           {**{n: dtype for n in ("X", "WG", "WV", "BG", "BV", "Y", "Z")}, "SEED": "i64"},
                           dict(ACTIVATION=act, HAS_GATE_BIAS=True, HAS_VALUE_BIAS=True, STORE_PREACT=preact,
                                DROPOUT=dropping, INPUT_PRECISION=prec), gated_key, floats=drop))
    for dropping in (False, True):
        out.append(Variant(f"gated_linear epilogue bwd silu{' + dropout' if dropping else ''}",
                           G._gated_epilogue_bwd_kernel, dict(DY=bf, Z=bf, DZ=bf, SEED="i64"),
                           dict(ACTIVATION="silu", DROPOUT=dropping), config=epilogue_cfg, floats=drop))
    pe_common = dict(P=16, PREFIX=1, INPUT_PRECISION="ieee")
    patches, width, pixels = tokens - 1, 768, 3 * 16 * 16

    def patch_key(rows, cols, reduction, splits=lambda batch: 1):
        return lambda batch: C.PatchKey(triton.next_power_of_2(rows(batch)), cols, reduction(batch), splits(batch),
                                        torch.bfloat16, "ieee")
    out.append(Variant("patch_embed fwd 224/16 + CLS + pos", PE.PATCH_EMBED,
                       dict(X=bf, W=bf, BIAS=f32, CLS=f32, CLS_POS=f32, POS=f32, OUT=bf),
                       dict(pe_common, HAS_BIAS=True, HAS_CLS_POS=True, HAS_POS=True),
                       patch_key(lambda b: b * patches, width, lambda b: pixels)))
    out.append(Variant("patch_embed dweight", PE.PATCH_EMBED_DWEIGHT, dict(DT=bf, X=bf, DW=f32), pe_common,
                       patch_key(lambda b: width, pixels, lambda b: 1024, lambda b: max(1, b * patches // 1024))))
    out.append(Variant("patch_embed dimages", PE.PATCH_EMBED_DIMAGES, dict(DT=bf, W=bf, DX=bf), pe_common,
                       patch_key(lambda b: b * patches, pixels, lambda b: width)))
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
        def attention_key(batch, d=d, mask_kind=mask_kind, kpm_kind=kpm_kind, causal=causal, rope=rope, n_q=n_q,
                          dropping=dropping):
            return C.AttentionKey(triton.next_power_of_2(batch * 12), n_q, n_q if rope else tokens, d, torch.bfloat16,
                                  mask_kind, kpm_kind, causal, rope, dropping)
        label = (f"d={d} mask={mask_kind} kpm={kpm_kind}{' causal' if causal else ''}"
                 f"{f' rope={rope}' if rope else ''}{f' N_Q={n_q}' if n_q < 16 else ''}"
                 f"{' dropout' if dropping else ''}")
        out.append(Variant(f"attention fwd {label}", A.ATTENTION_FWD,
                           dict(Q=bf, K=bf, V=bf, O=bf, LSE=f32, MASK=mask_t, KPM=kpm_t, TAB=f32, SEED="i64"), consts,
                           attention_key, floats=("qk_scale", *drop)))
        bwd = dict(Q=bf, K=bf, V=bf, DO=bf, LSE=f32, DELTA=f32, DK=bf, DV=bf, DQ=bf, MASK=mask_t, KPM=kpm_t,
                   TAB=f32, SEED="i64")
        out.append(Variant(f"attention bwd dK/dV {label}", A.ATTENTION_DKDV, bwd, consts, attention_key,
                           floats=("qk_scale", "sm_scale", *drop)))
        out.append(Variant(f"attention bwd dQ {label}", A.ATTENTION_DQ, bwd, consts, attention_key,
                           floats=("qk_scale", "sm_scale", *drop)))
    # The resident-K/V forward (kernels/attention_resident.py): ViT-B's 197 tokens in one pass, 257 in
    # chunks with RoPE, and a head size that pads to 128 columns, causal.
    for d, causal, rope, n in ((64, False, 0, 197), (64, False, 2, 257), (80, True, 0, 257)):
        def resident_key(batch, d=d, causal=causal, rope=rope, n=n):
            return C.AttentionKey(triton.next_power_of_2(batch * 12), n, n, d, torch.bfloat16, 0, 0, causal, rope,
                                  False)
        label = f"d={d} N={n}{' causal' if causal else ''}{f' rope={rope}' if rope else ''}"
        out.append(Variant(f"attention resident fwd {label}", AR.ATTENTION_RESIDENT,
                           dict(Q=bf, K=bf, V=bf, O=bf, LSE=f32, TAB=f32),
                           dict(HEAD_DIM=d, IS_CAUSAL=causal, ROPE=rope, BLOCK_D=1 << (d - 1).bit_length()),
                           resident_key, floats=("qk_scale",)))
    out.append(Variant("attention bwd delta d=64", A._attention_bwd_delta_kernel,
                       dict(O=bf, DO=bf, DLSE=f32, DELTA=f32), dict(HEAD_DIM=64, HAS_DLSE=True, BLOCK_D=64),
                       config=dict(BLOCK_M=64, num_warps=4, num_stages=1)))
    out.append(Variant("dropout keep mask (tests)", R._keep_mask_kernel, dict(SEED="i64", OUT="u8"),
                       dict(SITE=R.ATTENTION, BLOCK=128), floats=("p",), config=dict(num_warps=4, num_stages=1)))
    return out


def _configs(v: Variant, every: bool, batches: list[int]) -> list[tuple[dict, int, int]]:
    """(constexpr tile sizes, num_warps, num_stages) to compile, each once: the sm_90 rule's pick at each
    batch size, or every candidate tuning would measure there."""
    if v.config:
        c = dict(v.config)
        return [(c, c.pop("num_warps"), c.pop("num_stages"))]
    out = []
    for batch in batches:
        key = v.key(batch)
        for c in v.kernel.candidates(key) if every else [v.kernel.rule(90, key)]:
            entry = (dict(c.kwargs), c.num_warps, c.num_stages)
            if entry not in out:
                out.append(entry)
    return out


def compile_variant(v: Variant, tiles: dict, num_warps: int, num_stages: int, capability: int = 90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = v.kernel if isinstance(v.kernel, JITFunction) else v.kernel.fn  # the _select.Kernel's JITFunction
    # A config's launch arguments that are no constexprs (the resident attention's GROUPS) stay integers.
    declared = {p.name for p in fn.params if p.is_constexpr}
    constexprs = {k: x for k, x in {**v.constexprs, **tiles}.items() if k in declared}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in v.pointers:
            signature[name] = "*" + v.pointers[name]
        else:
            signature[name] = "fp32" if name in v.floats else "i32"
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): x for k, x in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="every candidate tuning measures, not just the rule's pick")
    p.add_argument("--batch", type=int, nargs="+", default=[256],
                   help="batch sizes whose picks to compile (default 256)")
    p.add_argument("-k", default="", help="only variants whose name contains this")
    p.add_argument("--vit-sites", action="store_true",
                   help="instead: every ViT GEMM site and epilogue variant (vitfast/bench/gemm_sites.py) at the "
                        "batch sizes given, compiled through the stand-in driver as the JIT specializes it: "
                        "the rule's kernel and config, registers, spills, shared memory, TMA, wgmma")
    p.add_argument("--vit-attention", action="store_true",
                   help="instead: every ViT attention shape (vitfast/bench/attention_shapes.py) at the batch sizes "
                        "given, compiled through the stand-in driver as the JIT specializes it: the forward its "
                        "route takes (and why, for the general kernel), its config, registers, spills, shared "
                        "memory, TMA, wgmma, beside the general kernel's")
    p.add_argument("--shapes", nargs="+", default=None, help="--vit-attention: shapes (default: all)")
    p.add_argument("--models", nargs="+", default=None,
                   help="--vit-sites: models (default: ViT-S/B/L/H and EVA02-B's SwiGLU fc1)")
    p.add_argument("--variants", nargs="+", default=None, help="--vit-sites, --vit-attention: variants (default: all)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="--vit-sites: the operands' dtype (default bfloat16)")
    p.add_argument("--tf32", action="store_true",
                   help="--vit-sites: allow TF32 (torch.backends.cuda.matmul.allow_tf32), as fp32 GEMMs need "
                        "for the descriptor kernel")
    p.add_argument("--json", type=Path, default=None, help="--vit-sites, --vit-attention: write the table here")
    p.add_argument("--markdown", type=Path, default=None,
                   help="--vit-sites, --vit-attention: write the table here as Markdown, one line per site (shape) "
                        "and variant")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter has no compiler to check")
    if a.vit_sites:
        return vit_sites(a)
    if a.vit_attention:
        return vit_attention(a)
    import triton

    print(f"triton {triton.__version__}, target sm_90", flush=True)
    failures = 0
    count = 0
    for v in variants():
        if a.k not in v.name:
            continue
        for tiles, warps, stages in _configs(v, a.all, a.batch):
            t0 = time.perf_counter()
            label = f"{v.name} {tiles} warps={warps} stages={stages}"
            try:
                k = compile_variant(v, tiles, warps, stages)
            except Exception as e:  # noqa: BLE001 - report every failing variant, then fail
                failures += 1
                print(f"FAIL {label}: {type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}", flush=True)
                continue
            ptx = k.asm.get("ptx", "")
            verdict = "ok  " if k.metadata.shared <= SMEM_LIMIT else "FAIL"
            failures += verdict == "FAIL"
            count += verdict == "ok  "
            print(f"{verdict} {label}: shared {k.metadata.shared} B (sm_90 allows {SMEM_LIMIT}), "
                  f"wgmma {'wgmma' in ptx}, {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"{count} compiled, {failures} failed")
    return 1 if failures or not count else 0


def _static_report(a: argparse.Namespace, table: list[dict], meets, describe, totals: str, markdown) -> int:
    """Print each row of a static table (``describe(row)``, marked by ``meets(row)``) and ``totals``
    with the misses counted, write the JSON and Markdown asked for; 1 when a row misses the target."""
    import json

    import triton

    misses = 0
    for row in table:
        ok = meets(row)
        misses += not ok
        print(f"{'ok  ' if ok else 'MISS'} {describe(row)}", flush=True)
    print(totals.format(met=len(table) - misses, rows=len(table)))
    if a.json:
        a.json.write_text(json.dumps({"triton": triton.__version__, "target": "sm_90", "rows": table}, indent=1))
    if a.markdown:
        a.markdown.write_text(markdown(table, a.batch))
    return 1 if misses else 0


def vit_sites(a: argparse.Namespace) -> int:
    """``--vit-sites``: print and save the static table; fail when a pick misses the target (no spill,
    TMA and wgmma on the descriptor kernel)."""
    from vitfast.bench import gemm_sites

    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    t0 = time.perf_counter()
    table = gemm_sites.static_table(a.models or [*gemm_sites.MODELS, *gemm_sites.GATED], a.batch,
                                    a.variants or list(gemm_sites.VARIANTS), getattr(torch, a.dtype))

    def describe(row: dict) -> str:
        before = row["pointer"]
        return (f"{row['model']} b{row['batch']} {row['site']} {row['variant']}: {row.get('kernel')} "
                f"{row.get('config')} regs {row.get('registers')} spill {row.get('spilled_bytes')} "
                f"smem {row.get('dynamic_shared_bytes')} tma {row.get('tma')} wgmma {row.get('wgmma')} | "
                f"pointer kernel: regs {before.get('registers')} spill {before.get('spilled_bytes')} "
                f"tma {before.get('tma')}")

    return _static_report(a, table, gemm_sites.meets_target, describe,
                          f"{{met}} of {{rows}} picks without spills, on TMA and wgmma "
                          f"({time.perf_counter() - t0:.0f} s)",
                          _markdown)


def vit_attention(a: argparse.Namespace) -> int:
    """``--vit-attention``: print and save the static table; fail when a resident pick misses the target
    (no spill, TMA and wgmma)."""
    from vitfast.bench import attention_shapes

    t0 = time.perf_counter()
    table = attention_shapes.static_table(a.shapes or list(attention_shapes.SHAPES), a.batch,
                                          a.variants or list(attention_shapes.VARIANTS), getattr(torch, a.dtype))

    def describe(row: dict) -> str:
        general = row["general"]
        why = f" ({row['reason']})" if "reason" in row else ""
        return (f"{row['shape']} b{row['batch']} {row['variant']}: {row['kernel']} {row['config']} regs "
                f"{row['registers']} spill {row['spilled_bytes']} smem {row['dynamic_shared_bytes']} tma {row['tma']} "
                f"wgmma {row['wgmma']}{why} | general kernel: {general['config']} regs {general['registers']} "
                f"spill {general['spilled_bytes']}")

    resident = sum(row["kernel"] == "_attention_resident_fwd_kernel" for row in table)
    return _static_report(a, table, attention_shapes.meets_target, describe,
                          f"{resident} of {{rows}} launches on the resident kernel, {{met}} meet the target "
                          f"({time.perf_counter() - t0:.0f} s)", _attention_markdown)


def _attention_markdown(table: list[dict], batches: list[int]) -> str:
    """One line per (shape, variant): per batch size the route's pick (query rows, chunks × keys,
    programs per head, warps), registers, spilled bytes, shared memory; then the general kernel's
    registers and spilled bytes at the largest batch."""
    def pick(r: dict) -> str:
        c = r["config"]
        if "reason" in r:
            return (f"general {c['BLOCK_M']}×{c['BLOCK_N']} w{c['num_warps']}: {r['registers']} r, "
                    f"{r['spilled_bytes']} B")
        return (f"{c['BLOCK_M']} × {c['KV_CHUNKS']}·{c['BLOCK_KV']} g{c['GROUPS']} w{c['num_warps']}: "
                f"{r['registers']} r, {r['spilled_bytes']} B, {r['dynamic_shared_bytes'] // 1024} KiB")

    by_line: dict[tuple, dict[int, dict]] = {}
    for r in table:
        by_line.setdefault((r["shape"], r["variant"]), {})[r["batch"]] = r
    head = ["shape", "H × N × d", "variant", *[f"batch {b}" for b in batches],
            f"general kernel at batch {batches[-1]}"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (shape, variant), rows in by_line.items():
        last = rows[batches[-1]]
        general = last["general"]
        cells = [shape, f"{last['heads']} × {last['tokens']} × {last['head_dim']}", variant,
                 *[pick(rows[b]) for b in batches],
                 f"{general['config']['BLOCK_M']}×{general['config']['BLOCK_N']} w{general['config']['num_warps']}: "
                 f"{general['registers']} r, {general['spilled_bytes']} B"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _markdown(table: list[dict], batches: list[int]) -> str:
    """One line per (model, site, variant): per batch size the pick (BLOCK_M×BLOCK_N×BLOCK_K, warps,
    stages, epilogue slices), its registers, its spilled bytes and the wave use, then the pointer
    kernel's registers and spilled bytes at the largest batch."""
    def pick(r: dict) -> str:
        c = r["config"]
        return (f"{c['BLOCK_M']}×{c['BLOCK_N']}×{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']} "
                f"e{c['EPILOGUE_SLICES']}: {r['registers']} r, {r['spilled_bytes']} B, {r['wave_use']:.2f}")

    by_line: dict[tuple, dict[int, dict]] = {}
    for r in table:
        by_line.setdefault((r["model"], r["site"], r["variant"]), {})[r["batch"]] = r
    head = ["model", "site", "variant", *[f"batch {b}: pick: regs, spill, wave use" for b in batches],
            f"pointer kernel at batch {batches[-1]}: regs, spill"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (model, site, variant), rows in by_line.items():
        last = rows[batches[-1]]["pointer"]
        cells = [model, site, variant, *[pick(rows[b]) if "config" in rows[b] else rows[b].get("kernels", "?")
                                         for b in batches], f"{last.get('registers')} r, {last.get('spilled_bytes')} B"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
