"""Attention forward vs PyTorch: SDPA with each of its backends, and eager softmax(QKᵀ)V.

Every implementation reads the same packed in-projection output [B, N, 3·D]. vitfast takes it as
is and writes [B, N, D] ready for the out-projection; the baselines get [B, h, N, d] views of it and
return [B, h, N, d] (the transpose back to [B, N, D] is not timed, which favours them). On a GPU:
ViT shapes in bf16; on the CPU a tiny smoke run through Triton's interpreter so the harness itself
is tested (SDPA's flash and memory-efficient backends are GPU-only here).
"""
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitfast import runtime
from vitfast.ops.attention import attention
from vitfast.testing import assert_parity

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# (batch, heads, tokens, head size): ViT-B/16 at 224, ViT-L/16, ViT-H/14, ViT-B/16 at 384.
SHAPES = [(256, 12, 197, 64), (64, 16, 197, 64), (64, 16, 257, 80), (16, 12, 577, 64)] if ON_GPU else [(1, 2, 17, 16)]
ROUNDS = dict(warmup_rounds=10, rounds=50) if ON_GPU else dict(warmup_rounds=1, rounds=3)
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa-math": SDPBackend.MATH}


def _eager(q, k, v):
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1) @ v


IMPLS = [
    "vitfast", "eager", "sdpa-math",
    pytest.param("sdpa-flash", marks=pytest.mark.gpu), pytest.param("sdpa-efficient", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-h{}-N{}-d{}".format(*s))
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_attention(benchmark, impl, shape):
    B, H, N, d = shape
    benchmark.group = f"attention B={B} h={H} N={N} d={d} {DTYPE}"
    qkv = torch.randn(B, N, 3 * H * d, device=DEVICE, dtype=DTYPE)
    q, k, v = qkv.unflatten(-1, (3, H, d)).permute(2, 0, 3, 1, 4)
    if impl == "vitfast":
        fn = lambda: attention(qkv, H)  # noqa: E731
    elif impl == "eager":
        fn = lambda: _eager(q, k, v)  # noqa: E731
    else:
        fn = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731

    def timed():
        out = fn()
        if ON_GPU:
            torch.cuda.synchronize()  # the kernels' time, not the launch's
        return out

    backend = sdpa_kernel([SDPA_BACKENDS[impl]]) if impl in SDPA_BACKENDS else nullcontext()
    with torch.no_grad(), backend, runtime.count_launches() as launches:
        out = benchmark.pedantic(timed, iterations=1, **ROUNDS)
    assert bool(launches) == (impl == "vitfast"), f"{impl} launched {launches}"
    if impl == "vitfast":
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        pt = F.scaled_dot_product_attention(q, k, v)
        assert_parity(out, pt.transpose(1, 2).flatten(2), ref.transpose(1, 2).flatten(2))
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if ON_GPU else "cpu (Triton interpreter)",
        torch=torch.__version__, triton=triton.__version__, dtype=str(DTYPE), batch=B, heads=H, tokens=N,
        head_dim=d, tflops=4.0 * B * H * N * N * d / median / 1e12, tokens_per_s=B * N / median,
    )
