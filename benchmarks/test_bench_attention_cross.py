"""Short-query attention (attention pooling: SigLIP's MAP head, one learned query per head over every
token) forward vs PyTorch: SDPA (its own backend choice) and eager softmax(QKᵀ)V, measured in the same run.

The learned query [1, h, Nq, d] is broadcast over the batch with ``expand`` (stride 0), as a pooling
head holds it; every implementation gets that view and k, v [B, h, Nk, d]. On a GPU: SigLIP-So400m/14 at
384 (729 tokens) and ViT-B at 224 (197 tokens) pooled by one query, B = 256, 16 heads of 64, bf16; on
the CPU a tiny smoke run through Triton's interpreter so the harness itself is tested.

Counted per call, forward (e: element bytes): FLOPs 4·B·h·Nq·Nk·d, compulsory bytes
e·(h·Nq·d + 2·B·h·Nk·d + B·h·Nq·d) (the shared query, k and v read once, the output written once).
"""
import pytest
import torch
import torch.nn.functional as F
import triton

from vitfast.ops.attention import attention_qkv
from vitfast.testing import assert_parity
from _harness import time_calls

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# (batch, heads, queries, keys, head size)
SHAPES = ({"siglip-so400m-384": (256, 16, 1, 729, 64), "vit-b-224": (256, 16, 1, 197, 64)} if ON_GPU
          else {"tiny": (2, 2, 1, 17, 16)})
ROUNDS = dict(warmup_rounds=10, rounds=50) if ON_GPU else dict(warmup_rounds=1, rounds=3)


def _eager(q, k, v):
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1) @ v


IMPLS = {"vitfast": attention_qkv, "sdpa": F.scaled_dot_product_attention, "eager": _eager}


def counted(B: int, h: int, n_q: int, n_kv: int, d: int, elem: int) -> tuple[float, float]:
    """(FLOPs, compulsory bytes) of one forward call with the query shared across the batch."""
    return 4.0 * B * h * n_q * n_kv * d, float(elem * (h * n_q * d + 2 * B * h * n_kv * d + B * h * n_q * d))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_bench_attention_short_query(benchmark, impl, shape):
    B, H, n_q, n_kv, d = SHAPES[shape]
    benchmark.group = f"attention pooling {shape} B={B} h={H} Nq={n_q} Nk={n_kv} d={d} {DTYPE}"
    q = torch.randn(1, H, n_q, d, device=DEVICE, dtype=DTYPE).expand(B, -1, -1, -1)
    k, v = torch.randn(2, B, H, n_kv, d, device=DEVICE, dtype=DTYPE).unbind(0)

    out = time_calls(benchmark, lambda: IMPLS[impl](q, k, v), impl == "vitfast", ROUNDS)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert_parity(out, F.scaled_dot_product_attention(q, k, v), ref, what=impl)
    median = benchmark.stats.stats.median
    flops, moved = counted(B, H, n_q, n_kv, d, q.element_size())
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if ON_GPU else "cpu (Triton interpreter)",
        torch=torch.__version__, triton=triton.__version__, dtype=str(DTYPE), batch=B, heads=H, queries=n_q,
        keys=n_kv, head_dim=d, tflops=flops / median / 1e12, gbs=moved / median / 1e9,
        images_per_s=B / median,
    )
