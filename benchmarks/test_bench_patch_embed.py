"""Fused patch embedding vs the eager composite (Conv2d + flatten + transpose + cat + add) and
``torch.compile`` of that composite. On a GPU: ViT-B/16 at 224, batch 256, bf16; on the CPU a tiny
smoke run through Triton's interpreter (torch.compile joins on the GPU only)."""
import pytest
import torch

from vitfast.checks.patch_embed import composite
from vitfast.ops.patch_embed import patch_embed
from vitfast.testing import assert_parity

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# batch, channels, image side, patch, width, dtype
SHAPE = (256, 3, 224, 16, 768, torch.bfloat16) if ON_GPU else (2, 3, 32, 8, 64, torch.float32)
ROUNDS = dict(warmup_rounds=10, rounds=50) if ON_GPU else dict(warmup_rounds=1, rounds=3)

_compiled = None


def _compiled_composite(**args):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(composite)
    return _compiled(**args)


IMPLS = {"vitfast": patch_embed, "eager": composite, "compile": _compiled_composite}


def _inputs():
    batch, channels, side, patch, width, dtype = SHAPE
    n = (side // patch) ** 2
    make = lambda *shape: torch.randn(*shape, device=DEVICE, dtype=dtype)  # noqa: E731
    return dict(images=make(batch, channels, side, side), weight=make(width, channels, patch, patch) / patch,
                bias=make(width), cls_token=make(1, 1, width), pos_embed=make(1, n + 1, width))


def _work(args) -> tuple[float, float]:
    """(FLOPs, bytes read + written) of one call."""
    batch, _, side, patch, width, _ = SHAPE
    n = (side // patch) ** 2
    k = args["weight"][0].numel()
    out_bytes = batch * (n + 1) * width * args["images"].element_size()
    return 2.0 * batch * n * k * width, sum(t.nbytes for t in args.values()) + out_bytes


@pytest.mark.parametrize("impl", ["vitfast", "eager", pytest.param("compile", marks=pytest.mark.gpu)])
def test_bench_patch_embed(benchmark, impl):
    batch, channels, side, patch, width, dtype = SHAPE
    benchmark.group = f"patch_embed B={batch} {channels}x{side}x{side}/{patch} D={width} {dtype}"
    args = _inputs()
    fn = IMPLS[impl]

    def run():
        out = fn(**args)
        if ON_GPU:
            torch.cuda.synchronize()  # time the work, not the launch
        return out

    with torch.no_grad():
        out = benchmark.pedantic(run, iterations=1, **ROUNDS)
        ref = composite(**{k: v.double() for k, v in args.items()})
        assert_parity(out, composite(**args), ref, what=impl)
    flops, nbytes = _work(args)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if ON_GPU else "cpu (interpreter)",
                                torch=torch.__version__, images_per_s=batch / median,
                                tflops=flops / median / 1e12, gbps=nbytes / median / 1e9)
