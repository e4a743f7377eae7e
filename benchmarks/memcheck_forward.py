"""One small vitfast forward for ``compute-sanitizer --tool memcheck`` (run by ``gpu_suite.sh``).

A ViT-Ti-sized model (width 192, 3 heads, head size 64) at 224 px, so 197 tokens that fit no tile
exactly, two layers, batch 2, bf16, converted by ``vitfast.optimize``: each kernel of the forward
runs under the memory checker at ragged sizes. Exits non-zero when there is no GPU, when the
converter is missing, or when the output is not finite; the checker itself fails the run on any
out-of-bounds or misaligned access (the suite passes ``--error-exitcode``).

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/memcheck_forward.py
"""
from __future__ import annotations

import copy
import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("memcheck_forward: needs a CUDA device")
        return 1
    from vitfast import reference

    try:
        from vitfast import optimize
    except ImportError as e:
        print(f"memcheck_forward: vitfast.optimize is not available ({e})")
        return 1
    torch.manual_seed(0)
    model = reference.vit_tiny(n_layers=2).eval().to("cuda", torch.bfloat16)
    fast = optimize(copy.deepcopy(model), inplace=True)
    print(getattr(fast, "vitfast_report", "vitfast.optimize returned no report"))
    x = torch.randn(2, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        out, ref = fast(x), model(x)
    torch.cuda.synchronize()
    finite = bool(torch.isfinite(out).all())
    print(f"memcheck_forward: output {tuple(out.shape)} {out.dtype}, finite: {finite}, "
          f"max |vitfast - reference| = {(out.float() - ref.float()).abs().max().item():.3g}")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
