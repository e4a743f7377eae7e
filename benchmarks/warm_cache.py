"""Compile the kernels an optimized ViT forward autotunes over, in parallel, into Triton's disk cache.

    python benchmarks/warm_cache.py --model vit_base --batch 1 64 256 --procs 12

Triton's autotuner compiles each candidate config in turn, about a second each, so the first
autotuned forward of ViT-B spends a minute or more compiling on one core. Here each of ``--procs``
processes runs the same bf16 forwards with the autotuner's (pruned) list cut to every
``procs``-th config, so together they compile every candidate once; the next process that autotunes
(the profile, the bench) finds the binaries on disk and only times them. The kernels' own choices are
untouched: nothing here runs outside this script's processes. Needs a GPU.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _worker(shard: int, procs: int, model_name: str, batches: list[int]) -> None:
    import triton.runtime.autotuner as autotuner

    full = autotuner.Autotuner.prune_configs

    def one_share(self, kwargs):
        configs = full(self, kwargs)
        return configs[shard::procs] or configs[:1]

    autotuner.Autotuner.prune_configs = one_share

    import torch

    import vitfast
    from vitfast import reference

    model = getattr(reference, model_name)().cuda().eval().to(torch.bfloat16)
    fast = vitfast.optimize(model, inplace=True)
    with torch.inference_mode():
        for batch in batches:
            fast(torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--procs", type=int, default=12)
    p.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.procs < 1:
        p.error(f"--procs must be at least 1, got {a.procs}")
    if a.shard is not None:
        _worker(a.shard, a.procs, a.model, a.batch)
        return 0
    start = time.perf_counter()
    cmd = [sys.executable, os.path.abspath(__file__), "--model", a.model, "--procs", str(a.procs),
           "--batch", *map(str, a.batch)]
    workers = [subprocess.Popen([*cmd, "--shard", str(i)]) for i in range(a.procs)]
    codes = [w.wait() for w in workers]
    print(f"warm_cache: {a.procs} processes, {a.model} bf16 batch {a.batch}, exit codes {codes}, "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    return 0 if not any(codes) else 1


if __name__ == "__main__":
    sys.exit(main())
