"""What packing Hugging Face's separate q, k, v weights on every call costs a fused ViT layer.

vitfast used to cache the packed QKV weight (and timm's LayerScale folded into proj/fc2), keyed on the
parameters' version counters; writes through ``.data`` bump none, so the cache went stale. Now
LayerScale is an epilogue scale (no extra pass at all) and the QKV weight is concatenated on each call.
This measures, in one run, a pre-norm block whose QKV weight is packed on the call (as vitfast runs
Hugging Face's ViTLayer) against the same block given a packed weight (what the cache saved), and the
pack alone.

On a GPU: ViT-B/16 (width 768, 12 heads, 197 tokens) in bf16 at batch 1 and 256. On the CPU with
``TRITON_INTERPRET=0`` the same ViT-B sizes on the plain-PyTorch fallback (CPU figures, not kernel
speed); under the interpreter (CI) a tiny smoke of the harness.
"""
import os

import pytest
import torch

from vitfast.modules._block import BlockWeights, pre_norm_block

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
INTERPRETED = not ON_GPU and os.environ.get("TRITON_INTERPRET") == "1"
WIDTH, HEADS, TOKENS = (64, 4, 17) if INTERPRETED else (768, 12, 197)
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BATCHES = (1, 2) if INTERPRETED else (1, 256) if ON_GPU else (1, 8)
ROUNDS = dict(warmup_rounds=10, rounds=50) if ON_GPU else dict(warmup_rounds=1, rounds=3)


def _weights():
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).to(DEVICE, DTYPE)

    q, k, v = (rand(WIDTH, WIDTH) for _ in range(3))
    qb, kb, vb = (rand(WIDTH) for _ in range(3))
    common = dict(num_heads=HEADS, proj_weight=rand(WIDTH, WIDTH), proj_bias=rand(WIDTH),
                  norm1=(rand(WIDTH), rand(WIDTH), 1e-12), norm2=(rand(WIDTH), rand(WIDTH), 1e-12),
                  fc1_weight=rand(4 * WIDTH, WIDTH), fc1_bias=rand(4 * WIDTH),
                  fc2_weight=rand(WIDTH, 4 * WIDTH), fc2_bias=rand(WIDTH), activation="gelu")
    per_call = BlockWeights(qkv_weight=(q, k, v), qkv_bias=(qb, kb, vb), **common)
    packed = BlockWeights(qkv_weight=torch.cat([q, k, v]), qkv_bias=torch.cat([qb, kb, vb]), **common)
    return per_call, packed


def _run(benchmark, fn):
    if ON_GPU:
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), **ROUNDS)
    else:
        benchmark.pedantic(fn, **ROUNDS)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("qkv", ["packed-per-call", "pre-packed"])
def test_block_with_qkv(benchmark, qkv, batch):
    per_call, packed = _weights()
    w = per_call if qkv == "packed-per-call" else packed
    x = torch.randn(batch, TOKENS, WIDTH, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        torch.testing.assert_close(pre_norm_block(x, per_call), pre_norm_block(x, packed), rtol=0, atol=0)
        benchmark.extra_info.update(width=WIDTH, tokens=TOKENS, batch=batch, dtype=str(DTYPE), device=str(DEVICE))
        _run(benchmark, lambda: pre_norm_block(x, w))


def test_qkv_pack_alone(benchmark):
    per_call, _ = _weights()
    benchmark.extra_info.update(width=WIDTH, dtype=str(DTYPE), device=str(DEVICE),
                                bytes_moved=2 * 3 * (WIDTH + 1) * WIDTH * per_call.qkv_weight[0].element_size())
    _run(benchmark, lambda: (torch.cat(per_call.qkv_weight), torch.cat(per_call.qkv_bias)))
