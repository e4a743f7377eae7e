"""Where an optimized ViT forward spends its GPU time, kernel by kernel (torch.profiler).

    python benchmarks/profile_vit.py                         # ViT-B/16, 224 px, bf16, batch 64
    python benchmarks/profile_vit.py --model vit_large --batch 32 --baseline

Prints the CUDA kernels sorted by total device time, for the vitfast model and, with
``--baseline``, for the reference ViT eager, so a gap in benchmarks/NOTES.md can be traced to a
kernel. Needs a GPU.
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch.profiler import ProfilerActivity, profile

import vitfast
from vitfast import reference


def _profile(model: torch.nn.Module, x: torch.Tensor, label: str, rows: int) -> None:
    with torch.no_grad():
        for _ in range(3):  # compilation stays out of the profile
            model(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model(x)
            torch.cuda.synchronize()
    print(f"\n== {label}: CUDA kernels over 5 forwards")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base", choices=sorted(reference.CONFIGS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--baseline", action="store_true", help="profile the reference ViT eager too")
    p.add_argument("--kernel-stats", action="store_true",
                   help="after the vitfast profile, print registers, spills and shared memory per compiled kernel")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_vit.py needs a GPU")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    model = getattr(reference, a.model)().cuda().eval().to(dtype)
    x = torch.randn(a.batch, 3, 224, 224, device="cuda", dtype=dtype)
    fast = vitfast.optimize(copy.deepcopy(model))
    _profile(fast, x, f"vitfast {a.model} batch {a.batch} {a.dtype}", a.rows)
    if a.kernel_stats:
        import kernel_stats  # beside this script

        kernel_stats.print_kernel_stats()
    if a.baseline:
        _profile(model, x, f"reference eager {a.model} batch {a.batch} {a.dtype}", a.rows)


if __name__ == "__main__":
    main()
