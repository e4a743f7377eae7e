"""Fused GEMM epilogues vs PyTorch: fc1 + GELU, fc2 + residual, the whole MLP, and the plain GEMM.

Baselines, each measured in the same run: the eager composite (F.linear, F.gelu, add),
``torch.compile(mode="max-autotune")`` of that composite, and for the plain GEMM ``torch.matmul``
(cuBLAS). On a GPU: ViT-B MLP sizes (256 images × 197 tokens, 768 → 3072 → 768) in bf16; on the CPU
a tiny smoke run through Triton's interpreter so the harness itself is tested (compile is GPU-only).
"""
import functools

import pytest
import torch
import torch.nn.functional as F
import triton

from vitfast.ops.linear import linear, mlp
from vitfast.testing import assert_parity
from _harness import time_calls

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TOKENS, WIDTH, HIDDEN, DTYPE = (256 * 197, 768, 3072, torch.bfloat16) if ON_GPU else (34, 64, 128, torch.float32)
ROUNDS = dict(warmup_rounds=10, rounds=50) if ON_GPU else dict(warmup_rounds=1, rounds=3)


def _eager_fc1(x, w1, b1, **_):
    return F.gelu(F.linear(x, w1, b1))


def _eager_fc2(h, w2, b2, x, **_):
    return F.linear(h, w2, b2) + x


def _eager_mlp(x, w1, b1, w2, b2, **_):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2) + x


def _matmul(x, w1, **_):
    return torch.matmul(x, w1.t())


# op -> (vitfast, PyTorch composite, (m, n, k) of each GEMM in it)
OPS = {
    "fc1+gelu": (lambda x, w1, b1, **_: linear(x, w1, b1, "gelu"), _eager_fc1, [(TOKENS, HIDDEN, WIDTH)]),
    "fc2+residual": (lambda h, w2, b2, x, **_: linear(h, w2, b2, residual=x), _eager_fc2, [(TOKENS, WIDTH, HIDDEN)]),
    "mlp": (lambda x, w1, b1, w2, b2, **_: mlp(x, w1, b1, w2, b2, "gelu", residual=x), _eager_mlp,
            [(TOKENS, HIDDEN, WIDTH), (TOKENS, WIDTH, HIDDEN)]),
    "gemm": (lambda x, w1, **_: linear(x, w1), _matmul, [(TOKENS, HIDDEN, WIDTH)]),
}


@functools.cache
def _compiled(op: str):
    return torch.compile(OPS[op][1], mode="max-autotune")


def _impl(op: str, impl: str):
    vitfast_fn, composite, _ = OPS[op]
    return {"vitfast": vitfast_fn, "eager": composite, "torch.matmul": composite,
            "compile": lambda **a: _compiled(op)(**a)}[impl]


def _inputs(dtype=DTYPE):
    make = lambda *shape, scale=1.0: torch.randn(*shape, device=DEVICE, dtype=dtype) * scale  # noqa: E731
    return dict(x=make(TOKENS, WIDTH), h=make(TOKENS, HIDDEN), w1=make(HIDDEN, WIDTH, scale=WIDTH**-0.5),
                b1=make(HIDDEN), w2=make(WIDTH, HIDDEN, scale=HIDDEN**-0.5), b2=make(WIDTH))


CASES = [(op, impl) for op in ("fc1+gelu", "fc2+residual", "mlp") for impl in ("vitfast", "eager")]
CASES += [("gemm", "vitfast"), ("gemm", "torch.matmul")]
CASES += [pytest.param(op, "compile", marks=pytest.mark.gpu) for op in ("fc1+gelu", "fc2+residual", "mlp", "gemm")]


@pytest.mark.parametrize("op, impl", CASES)
def test_bench_linear(benchmark, op, impl):
    gemms = OPS[op][2]
    benchmark.group = f"{op} " + " then ".join(f"[{m}x{k}]·[{k}x{n}]" for m, n, k in gemms) + f" {DTYPE}"
    args = _inputs()
    fn = _impl(op, impl)
    out = time_calls(benchmark, lambda: fn(**args), impl == "vitfast", ROUNDS)
    composite = OPS[op][1]
    with torch.no_grad():
        assert_parity(out, composite(**args), composite(**{k: v.double() for k, v in args.items()}), what=impl)
    median = benchmark.stats.stats.median
    flops = sum(2.0 * m * n * k for m, n, k in gemms)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if ON_GPU else "cpu (Triton interpreter)",
        torch=torch.__version__, triton=triton.__version__, dtype=str(DTYPE), tokens=TOKENS,
        tflops=flops / median / 1e12, tokens_per_s=TOKENS / median,
    )
