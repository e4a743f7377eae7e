"""Attention with rotary position embedding (EVA02, timm's RoPE ViTs) forward vs timm's own path.

timm rotates q and k with ``apply_rot_embed_cat`` (after the prefix tokens) and then calls SDPA; the
baselines run exactly that, eager and under ``torch.compile``, each measured in the same run. vitfast
reads the packed in-projection output [B, N, 3·D] and the table in place and rotates q and k as its
kernel loads them. On a GPU: EVA02-B / ViT-B at 224 (B = 256, 12 heads of 64, 257 tokens, 1 prefix
token, a [256, 128] fp32 table) in bf16, in both pairings (interleaved, half); on the CPU a tiny
smoke run through Triton's interpreter so the harness itself is tested (compile is GPU-only).

Counted per call, forward (e: activation bytes, t: table bytes, p prefix tokens):
FLOPs 4·B·h·N²·d (QKᵀ and PV; the rotation's 6·B·h·(N−p)·d are not counted), compulsory bytes
e·4·B·N·h·d + t·2·d·(N−p) (q, k, v read once, out written once, the shared table read once).
"""
import functools

import pytest
import torch
import torch.nn.functional as F
import triton
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, apply_rot_embed_cat

from vitfast.ops.attention import attention
from vitfast.testing import assert_parity
from _harness import time_calls

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# (batch, heads, tokens, prefix tokens, head size)
SHAPES = {"eva02-b": (256, 12, 257, 1, 64)} if ON_GPU else {"tiny": (1, 2, 17, 1, 16)}
ROUNDS = dict(warmup_rounds=10, rounds=50) if ON_GPU else dict(warmup_rounds=1, rounds=3)


def _timm(qkv, heads, table, prefix, half):
    """timm's EvaAttention after the projection: split, rotate q and k after the prefix, SDPA."""
    B, N, _ = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], table, half=half)], dim=2).type_as(v)
    k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], table, half=half)], dim=2).type_as(v)
    return F.scaled_dot_product_attention(q, k, v)


@functools.cache
def _compiled():
    return torch.compile(_timm)


IMPLS = {
    "vitfast": lambda qkv, h, t, p, half: attention(qkv, h, rope=t, rope_prefix=p, rope_half=half),
    "timm-eager": _timm,
    "timm-compile": lambda *a: _compiled()(*a),
}


def counted(B: int, h: int, N: int, prefix: int, d: int, elem: int, table_elem: int) -> tuple[float, float]:
    """(FLOPs, compulsory bytes) of one forward call."""
    return 4.0 * B * h * N * N * d, float(elem * 4 * B * N * h * d + table_elem * 2 * d * (N - prefix))


@pytest.mark.parametrize("half", [False, True], ids=["interleaved", "half"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["vitfast", "timm-eager", pytest.param("timm-compile", marks=pytest.mark.gpu)])
def test_bench_attention_rope(benchmark, impl, shape, half):
    B, H, N, prefix, d = SHAPES[shape]
    benchmark.group = f"attention rope {'half' if half else 'interleaved'} {shape} B={B} h={H} N={N} d={d} {DTYPE}"
    qkv = torch.randn(B, N, 3 * H * d, device=DEVICE, dtype=DTYPE)
    side = int((N - prefix) ** 0.5)
    table = RotaryEmbeddingCat(d, in_pixels=False, rotate_half=half).get_embed(shape=[side, side]).to(DEVICE)
    args = (qkv, H, table, prefix, half)
    out = time_calls(benchmark, lambda: IMPLS[impl](*args), impl == "vitfast", ROUNDS)
    with torch.no_grad():
        pt = _timm(*args).transpose(1, 2).flatten(2)
        ref = _timm(qkv.double(), H, table.double(), prefix, half).transpose(1, 2).flatten(2)
    assert_parity(out if impl == "vitfast" else out.transpose(1, 2).flatten(2), pt, ref, what=impl)
    median = benchmark.stats.stats.median
    flops, moved = counted(B, H, N, prefix, d, qkv.element_size(), table.element_size())
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if ON_GPU else "cpu (Triton interpreter)",
        torch=torch.__version__, triton=triton.__version__, dtype=str(DTYPE), batch=B, heads=H, tokens=N,
        prefix=prefix, head_dim=d, rope="half" if half else "interleaved",
        tflops=flops / median / 1e12, gbs=moved / median / 1e9, tokens_per_s=B * N / median,
    )
