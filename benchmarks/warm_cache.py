"""Compile the kernels of an optimized ViT's bf16 forward, on every core, into Triton's disk cache.

    python benchmarks/warm_cache.py --model vit_base --batch 1 64 256 [--train]

Each kernel runs the config its rule (or this GPU's tuned picks) chooses, so a forward compiles one
kernel per launch variant; ``vitfast.compile_ahead`` compiles them all at once on a thread pool
instead of one after the other as the first forward reaches them. The next process that runs the
model (the profile, the bench) finds the binaries in Triton's disk cache. Needs a GPU.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--train", action="store_true", help="the training step's kernels too (backward, autocast)")
    p.add_argument("--workers", type=int, default=None, help="compile threads (default: one per CPU)")
    a = p.parse_args(argv)
    import torch

    import vitfast
    from vitfast import reference

    if not torch.cuda.is_available():
        raise SystemExit("warm_cache.py needs a GPU")
    start = time.perf_counter()
    model = getattr(reference, a.model)().cuda()
    model = vitfast.optimize(model if a.train else model.to(torch.bfloat16).eval(), inplace=True)
    for batch in a.batch:
        x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float32 if a.train else torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.train):
            vitfast.compile_ahead(model, x, backward=a.train, workers=a.workers)
    print(f"warm_cache: {a.model} bf16 batch {a.batch}{' training step' if a.train else ''} compiled in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
