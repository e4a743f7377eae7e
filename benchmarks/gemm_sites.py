"""Each ViT GEMM site timed on a GPU, every way vitfast could run it, side by side; JSON out.

    python benchmarks/gemm_sites.py --json OUT/gemm-sites.json                 # ViT-B and ViT-L, batch 1, 32, 256
    python benchmarks/gemm_sites.py --json F --models vit_b --batch 256 --budget 120

For each site (QKV; proj + residual; fc1 + GELU; fc2 + residual; ``vitfast/bench/gemm_sites.py``) at
M = 197 × batch in bf16, with the epilogue of inference:

* ``descriptor``: every candidate config of the descriptor kernel (``kernels/linear_tma.py``) that
  tuning would measure, the rule's pick marked;
* ``pointer``: the pointer kernel (``linear._linear_kernel``) in its rule's config, what ran before;
* ``cublas_mm``: cuBLAS on the bare product (``torch.mm``), the yardstick of the issue's target;
* ``cublas_addmm``: cuBLAS with the bias (``torch.addmm``), all of QKV's epilogue;
* ``cublas_epilogue``: the cuBLAS tactic, cuBLAS and then the epilogue's own kernel
  (``kernels/gemm_tactic.py``), the same result as the fused kernels.

Times are ``triton.testing.do_bench``'s (ms, L2 flushed between runs), in one process, one after the
other; each site's row is written as soon as it is done, so a run cut short by ``--budget`` (or a
timeout) keeps what it measured. Every launch runs its rule's config and tactic: the script reads no
tuned-picks file. ``--section`` writes the document under that key of the JSON file, beside what other
scripts wrote there (the GPU suite brings back at most eight files). Needs a CUDA GPU; the descriptor
kernel needs sm_90.
"""
from __future__ import annotations

import sys

import torch

from vitfast.bench import gemm_sites
from vitfast.bench.results import gpu_script_parser, save_section, start_gpu_script, time_candidates, timed_rows


def _bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40))


def site_row(launch, dtype: torch.dtype, device: str = "cuda", bench=_bench) -> dict:
    """Time every way of running ``launch`` (a ``gemm_sites.Launch``) with ``bench`` (a function of a
    launch, its ms); tests run it in the interpreter with a fake timer."""
    from vitfast.kernels import _configs, _precompile, gemm_tactic, linear, linear_tma
    from vitfast.kernels._tuning import interpreting

    t = gemm_sites.tensors(launch, dtype, device, fill=True)
    key = linear.gemm_key(t["x"], t["weight"], t["y"], t["activation"], t["residual"], t["z"], t["seed"])
    meta = dict(ACTIVATION=t["activation"], HAS_BIAS=t["bias"] is not None, HAS_SCALE=t["scale"] is not None,
                HAS_RESIDUAL=t["residual"] is not None, STORE_PREACT=t["z"] is not None,
                DROPOUT=t["seed"] is not None, HAS_ROW_SCALE=t["row_scale"] is not None,
                INPUT_PRECISION=key.precision)
    run = linear_tma.launcher(t["x"], t["weight"], t["bias"], t["scale"], t["residual"], t["y"], t["z"], t["seed"],
                              t["row_scale"], t["dropout_p"], t["keep_scale"], meta)
    row = {"site": launch.site, "model": launch.model, "batch": launch.batch, "m": launch.m, "n": launch.n,
           "k": launch.k, "flops": launch.flops, "key": _configs.key_text(key)}
    row["descriptor"] = time_candidates(row, _configs.linear_tma_candidates(key), _configs.linear_tma_rule(90, key),
                                        run, bench, None if interpreting() else _precompile.compiling)

    takes = linear_tma.arch_takes_descriptors
    linear_tma.arch_takes_descriptors = lambda device: False
    try:
        row["pointer_ms"] = bench(lambda: linear.linear_fwd(**t))
        row["pointer_config"] = str(linear.LINEAR.chosen.get((t["x"].get_device(), key)))
    finally:
        linear_tma.arch_takes_descriptors = takes
    x, w, b = t["x"], t["weight"], t["bias"]
    out = torch.empty_like(t["y"])
    row["cublas_mm_ms"] = bench(lambda: torch.mm(x, w.t(), out=out))
    row["cublas_addmm_ms"] = bench(lambda: torch.addmm(b, x, w.t(), out=out))
    row["cublas_epilogue_ms"] = bench(lambda: gemm_tactic.cublas_fwd(**t))
    timed = [d["ms"] for d in row["descriptor"] if d["ms"] is not None]
    best = min(timed) if timed else None
    rule_ms = next((d["ms"] for d in row["descriptor"] if d["rule"]), None)
    row["summary"] = {
        "best_descriptor_ms": best, "rule_descriptor_ms": rule_ms,
        "best_vs_cublas_mm": row["cublas_mm_ms"] / best if best else None,
        "rule_vs_cublas_mm": row["cublas_mm_ms"] / rule_ms if rule_ms else None,
        "faster_tactic": "fused" if best and best <= row["cublas_epilogue_ms"] else "cublas",
        "cublas_tflops": launch.flops / row["cublas_mm_ms"] / 1e9,
        "best_descriptor_tflops": launch.flops / best / 1e9 if best else None,
    }
    return row


def _line(row: dict) -> str:
    s = row["summary"]
    return (f"cuBLAS mm {row['cublas_mm_ms']:.4f} ms ({s['cublas_tflops']:.0f} TFLOP/s), cuBLAS+epilogue "
            f"{row['cublas_epilogue_ms']:.4f}, pointer {row['pointer_ms']:.4f}, descriptor rule "
            f"{s['rule_descriptor_ms']}, best {s['best_descriptor_ms']} (cuBLAS mm / best: {s['best_vs_cublas_mm']}), "
            f"faster tactic {s['faster_tactic']}")


def main(argv: list[str] | None = None) -> int:
    p = gpu_script_parser(__doc__, 280.0, "site")
    p.add_argument("--models", nargs="+", default=["vit_b", "vit_l"], choices=list(gemm_sites.MODELS))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--sites", nargs="+", default=list(gemm_sites.SITES), choices=list(gemm_sites.SITES))
    a = p.parse_args(argv)
    doc = start_gpu_script("gemm_sites.py")  # the pointer column is the pointer kernel's rule
    todo = list(gemm_sites.launches(a.models, a.batch, sites=a.sites, variants=["inference"]))
    timed_rows(todo, a.budget, doc, lambda launch: site_row(launch, torch.bfloat16), _line,
               lambda: save_section(a.json, a.section, doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
