"""Each ViT attention shape's forward timed on a GPU, every way it could run, side by side; JSON out.

    python benchmarks/attention_shapes.py --json OUT/attention-shapes.json      # every shape, batch 1, 32, 256
    python benchmarks/attention_shapes.py --json F --shapes vit_b16_224 --batch 256 --budget 60

For each launch of ``vitfast/bench/attention_shapes.py`` (ViT-S/B/L, ViT-L/14, ViT-B/16 at 384, EVA02-B
with and without RoPE, SigLIP-So400m at 224 and 384) in bf16, q, k and v views of one packed QKV buffer:

* ``route``: what ``kernels.attention.attention_fwd`` runs, the resident-K/V kernel
  (``kernels/attention_resident.py``) in its rule's config or the general kernel, and why;
* ``resident``: every candidate config of the resident kernel that tuning would measure, the rule's
  pick marked (where the route takes the shape);
* ``general_ms``: the general FlashAttention-2 kernel in its rule's config, what ran before (both
  kernels launched bare, without the op's checks: ``attention.forward_launchers``);
* ``sdpa_flash_ms``, ``sdpa_cudnn_ms``, ``sdpa_efficient_ms``: ``F.scaled_dot_product_attention`` held
  to each backend (None, with the error, where a backend does not take the shape; RoPE rows rotate
  nothing for SDPA, so they compare the kernels only);
* the traffic bound: the compulsory bytes (Q, K, V read once, O and the log-sum-exp written once) at
  the device-copy bandwidth measured at the start of the same run, beside each time.

Times are ``triton.testing.do_bench``'s (ms, L2 flushed between runs), in one process; each row is
written as soon as it is done, so a run cut short by ``--budget`` (or a timeout) keeps what it
measured. Every launch runs its rule's config: the script reads no tuned-picks file. ``--section``
writes the document under that key of the JSON file, beside what other scripts wrote there (the GPU
suite brings back at most eight files). Needs a CUDA GPU; the resident kernel needs sm_90.
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from vitfast.bench import attention_shapes
from vitfast.bench.results import (gpu_script_parser, save_section, start_gpu_script, time_candidates, time_or_record,
                                   timed_rows)


def _bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40))


def _sdpa_backends() -> dict:
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def shape_row(launch, dtype: torch.dtype, copy_gbs: float | None, device: str = "cuda", bench=_bench,
              backends: dict | None = None) -> dict:
    """Time every way of running ``launch`` (an ``attention_shapes.Launch``) with ``bench`` (a function of
    a launch, its ms); tests run it in the interpreter with a fake timer and no SDPA backends."""
    from torch.nn.attention import sdpa_kernel

    from vitfast.kernels import _precompile, _resident_configs, _select, attention
    from vitfast.kernels._tuning import interpreting

    t = attention_shapes.tensors(launch, dtype, device, fill=True)
    row = {"shape": launch.shape, "batch": launch.batch, "variant": launch.variant, "heads": launch.heads,
           "tokens": launch.tokens, "head_dim": launch.head_dim, "flops": launch.flops, "bytes": launch.bytes(),
           "resident": []}
    attention.ran.clear()
    try:  # the route as the op takes it (compiles its kernel)
        attention.attention_fwd(**t)
        row["route"] = attention.routes()[0]
    except Exception as e:  # noqa: BLE001 - recorded; the kernels and SDPA are still timed
        row["route"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    key, general, resident = attention.forward_launchers(t["q"], t["k"], t["v"], t["o"], t["lse"], t["scale"],
                                                         rope=t["rope"])
    general_cfg = _select.config(attention.ATTENTION_FWD, t["q"].get_device(), key, general)
    row["general_ms"] = time_or_record(row, "general kernel", bench, lambda: general(general_cfg))
    if _resident_configs.reason(key) is None:
        row["resident"] = time_candidates(row, _resident_configs.candidates(key), _resident_configs.rule(90, key),
                                          resident, bench, None if interpreting() else _precompile.compiling)
    q, k, v = t["q"], t["k"], t["v"]
    for name, backend in (backends if backends is not None else _sdpa_backends()).items():
        row[f"sdpa_{name}_ms"] = None
        try:
            with sdpa_kernel(backend):
                row[f"sdpa_{name}_ms"] = time_or_record(row, f"sdpa {name}", bench,
                                                        lambda: F.scaled_dot_product_attention(q, k, v))
        except Exception as e:  # noqa: BLE001 - a backend this torch cannot select
            row.setdefault("errors", []).append(f"sdpa {name}: {type(e).__name__}: {e}"[:300])
    row["summary"] = _summary(row, copy_gbs)
    return row


def _summary(row: dict, copy_gbs: float | None) -> dict:
    timed = [r["ms"] for r in row["resident"] if r["ms"] is not None]
    rule_ms = next((r["ms"] for r in row["resident"] if r["rule"]), None)
    sdpa = [row[k] for k in row if k.startswith("sdpa_") and row[k] is not None]
    best_sdpa = min(sdpa) if sdpa else None
    route_ms = row["general_ms"] if row["route"].get("kernel") == "attention_fwd" else rule_ms
    return {
        "route_ms": route_ms, "best_resident_ms": min(timed) if timed else None, "best_sdpa_ms": best_sdpa,
        "route_vs_best_sdpa": best_sdpa / route_ms if best_sdpa and route_ms else None,
        "route_vs_general": row["general_ms"] / route_ms if route_ms and row["general_ms"] else None,
        "traffic_bound_ms": row["bytes"] / copy_gbs / 1e6 if copy_gbs else None,
        "route_tflops": row["flops"] / route_ms / 1e9 if route_ms else None,
    }


def _line(row: dict) -> str:
    s = row["summary"]
    return (f"{row['route'].get('kernel', row['route'].get('error'))} {s['route_ms']} ms, "
            f"general {row['general_ms']}, best SDPA {s['best_sdpa_ms']} "
            f"(best SDPA / route {s['route_vs_best_sdpa']}), traffic bound {s['traffic_bound_ms']}")


def main(argv: list[str] | None = None) -> int:
    p = gpu_script_parser(__doc__, 150.0, "shape")
    p.add_argument("--shapes", nargs="+", default=list(attention_shapes.SHAPES), choices=list(attention_shapes.SHAPES))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    a = p.parse_args(argv)
    doc = start_gpu_script("attention_shapes.py")
    from vitfast.bench.measure import Timer, measure_peaks

    start = time.perf_counter()
    device = torch.device("cuda")
    peaks = doc["peaks"] = measure_peaks(device, Timer(device, quick=True))
    timed_rows(list(attention_shapes.launches(a.shapes, a.batch)), a.budget - (time.perf_counter() - start), doc,
               lambda launch: shape_row(launch, torch.bfloat16, peaks["copy_gbs"]), _line,
               lambda: save_section(a.json, a.section, doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
