"""Compile the kernels of an optimized ViT's bf16 forward into Triton's disk cache.

    python benchmarks/warm_cache.py --model vit_base --batch 1 64 256

Each kernel runs the one config its rule chooses (kernels/_configs.py), so a forward per batch size
compiles what the model needs there; the next process that runs the model (the profile, the bench)
finds the binaries in Triton's disk cache. Needs a GPU.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    a = p.parse_args(argv)
    import torch

    import vitfast
    from vitfast import reference

    if not torch.cuda.is_available():
        raise SystemExit("warm_cache.py needs a GPU")
    start = time.perf_counter()
    model = vitfast.optimize(getattr(reference, a.model)().cuda().eval().to(torch.bfloat16), inplace=True)
    with torch.inference_mode():
        for batch in a.batch:
            model(torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    print(f"warm_cache: {a.model} bf16 batch {a.batch} compiled in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
