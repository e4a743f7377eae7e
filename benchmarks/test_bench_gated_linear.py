"""The gated GEMM of a SwiGLU MLP, silu(x·Wgᵀ + bg) ⊙ (x·Wvᵀ + bv), vs PyTorch.

Baselines, each measured in the same run: the eager composite (two F.linear, F.silu, the product)
and ``torch.compile`` of that composite in its default mode (the suite's mode; max-autotune's GEMM
search would not fit the suite's time for these benchmarks). On a GPU: EVA02's SwiGLU fc1 sizes in
bf16 (B: 256 images × 257 tokens, 768 → 2·2048; L: 64 × 257 tokens, 1024 → 2·2730, a hidden width
that is not a multiple of any tile); on the CPU a tiny smoke run through Triton's interpreter so the
harness itself is tested (compile is GPU-only).

Counted per call, forward: FLOPs 2·M·K·2H (both products; the epilogue's few per output element are
not counted), compulsory bytes e·(M·K + 2·H·K + 2·H + M·H) (x, both weights and biases read once, y
written once).
"""
import functools

import pytest
import torch
import torch.nn.functional as F
import triton

from vitfast.ops import gated_linear
from vitfast.testing import assert_parity
from _harness import time_calls

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# name -> (M tokens, K width, H hidden)
SHAPES = {"eva02-b": (256 * 257, 768, 2048), "eva02-l": (64 * 257, 1024, 2730)} if ON_GPU else {"tiny": (34, 64, 96)}
ROUNDS = dict(warmup_rounds=10, rounds=50) if ON_GPU else dict(warmup_rounds=1, rounds=3)


def _eager(x, wg, bg, wv, bv):
    return F.silu(F.linear(x, wg, bg)) * F.linear(x, wv, bv)


@functools.cache
def _compiled():
    return torch.compile(_eager)


IMPLS = {"vitfast": lambda *a: gated_linear(*a, activation="silu"), "eager": _eager,
         "compile": lambda *a: _compiled()(*a)}


def _inputs(m: int, k: int, h: int) -> tuple[torch.Tensor, ...]:
    make = lambda *shape, scale=1.0: torch.randn(*shape, device=DEVICE, dtype=DTYPE) * scale  # noqa: E731
    return make(m, k), make(h, k, scale=k**-0.5), make(h), make(h, k, scale=k**-0.5), make(h)


def counted(m: int, k: int, h: int, elem: int) -> tuple[float, float]:
    """(FLOPs, compulsory bytes) of one forward call."""
    return 2.0 * m * k * 2 * h, float(elem * (m * k + 2 * h * k + 2 * h + m * h))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["vitfast", "eager", pytest.param("compile", marks=pytest.mark.gpu)])
def test_bench_gated_linear(benchmark, impl, shape):
    m, k, h = SHAPES[shape]
    benchmark.group = f"gated_linear silu {shape} [{m}x{k}]·[{k}x2·{h}] {DTYPE}"
    args = _inputs(m, k, h)
    out = time_calls(benchmark, lambda: IMPLS[impl](*args), impl == "vitfast", ROUNDS)
    with torch.no_grad():
        assert_parity(out, _eager(*args), _eager(*(t.double() for t in args)), what=impl)
    median = benchmark.stats.stats.median
    flops, moved = counted(m, k, h, args[0].element_size())
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if ON_GPU else "cpu (Triton interpreter)",
        torch=torch.__version__, triton=triton.__version__, dtype=str(DTYPE), tokens=m, width=k, hidden=h,
        tflops=flops / median / 1e12, gbs=moved / median / 1e9, flop_per_byte=flops / moved,
        tokens_per_s=m / median,
    )
