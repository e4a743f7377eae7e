"""The config rules: what each kernel launches with when nothing was tuned.

Pure Python on the rules and the candidate lists (no launch), so the CPU checks what only a GPU runs:
on sm_90 every rule returns a config of its kernel's pruned candidate list (it fits shared memory and
registers) for ViT-S/B/L at batch 1, 32 and 256 in fp16, bf16 and fp32, reproduces the H100
autotuner's picks at ViT-B batch 64, and fills the GPU at batch 1; other architectures get small tiles.
"""
import pytest
import torch
import triton

from vitfast.kernels import _configs as C

MODELS = {"vit_small": (384, 6), "vit_base": (768, 12), "vit_large": (1024, 16)}  # width, heads
BATCHES = (1, 32, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TOKENS = 197  # 224 px, patch 16, one class token


def _gemm_keys(width: int, batch: int, dtype: torch.dtype):
    """(site, key) of every GEMM a ViT block launches, forward and backward (dX reads W transposed,
    dW reads both operands transposed and reduces over the tokens)."""
    m = triton.next_power_of_2(batch * TOKENS)
    prec = "ieee"
    for site, n, k, act, res in (("qkv", 3 * width, width, "none", False), ("proj", width, width, "none", True),
                                 ("fc1", 4 * width, width, "gelu", False), ("fc2", width, 4 * width, "none", True)):
        yield site, C.GemmKey(m, n, k, dtype, dtype, True, True, prec, act, res, False, False)
        yield f"{site} train", C.GemmKey(m, n, k, dtype, dtype, True, True, prec, act, res, act != "none", True)
        yield f"{site} dX", C.GemmKey(m, k, n, dtype, dtype, True, False, prec, "none", False, False, False)
        yield f"{site} dW", C.GemmKey(triton.next_power_of_2(n), k, batch * TOKENS, dtype, dtype, False, False, prec,
                                      "none", False, False, False)


def _attention_keys(width: int, heads: int, batch: int, dtype: torch.dtype):
    for head_dim in (64, 80, 128):
        yield C.AttentionKey(triton.next_power_of_2(batch * width // head_dim), TOKENS, TOKENS, head_dim, dtype,
                             0, 0, False, 0, False)
    yield C.AttentionKey(triton.next_power_of_2(batch * heads), 1, TOKENS, width // heads, dtype, 0, 0, False, 0, False)


def _patch_keys(width: int, batch: int, dtype: torch.dtype):
    m, k = batch * (TOKENS - 1), 3 * 16 * 16
    yield C.PatchKey(triton.next_power_of_2(m), width, k, 1, dtype, "ieee")  # forward
    yield C.PatchKey(triton.next_power_of_2(m), k, width, 1, dtype, "ieee")  # image gradient
    yield C.PatchKey(triton.next_power_of_2(width), k, 1024, max(1, m // 1024), dtype, "ieee")  # weight gradient


@pytest.mark.parametrize("model", list(MODELS))
def test_sm90_rules_pick_a_candidate_that_fits(model):
    width, heads = MODELS[model]
    for batch in BATCHES:
        for dtype in DTYPES:
            where = f"{model} batch {batch} {dtype}"
            for site, key in _gemm_keys(width, batch, dtype):
                assert C.linear_rule(90, key) in C.linear_candidates(key), f"linear {site}, {where}"
                assert C.linear_tma_rule(90, key) in C.linear_tma_candidates(key), f"linear_tma {site}, {where}"
                gated = key._replace(n=key.n * 2 // 3, residual=False)  # SwiGLU's hidden width
                assert C.gated_linear_rule(90, gated) in C.gated_linear_candidates(gated), f"gated {site}, {where}"
                assert C.gated_linear_tma_rule(90, gated) in C.gated_linear_tma_candidates(gated), \
                    f"gated_linear_tma {site}, {where}"
            for key in _attention_keys(width, heads, batch, dtype):
                for kernel in ("fwd", "dkdv", "dq"):
                    rule = C.attention_rule(kernel)(90, key)
                    assert rule in C.attention_candidates(kernel)(key), f"attention {kernel} {key}, {where}"
            for key in _patch_keys(width, batch, dtype):
                assert C.patch_rule(90, key) in C.patch_candidates(key), f"patch {key}, {where}"


def _tile(config):
    k = config.kwargs
    return k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], config.num_stages, config.num_warps


def test_sm90_rules_reproduce_the_h100_picks_at_vit_base_batch_64():
    """benchmarks/NOTES.md: the autotuner's picks on the H100 at batch 64, bf16."""
    sites = dict(_gemm_keys(768, 64, torch.bfloat16))
    assert _tile(C.linear_rule(90, sites["qkv"])) == (256, 128, 64, 3, 8)
    assert _tile(C.linear_rule(90, sites["proj"])) == (128, 128, 32, 5, 4)
    assert _tile(C.linear_rule(90, sites["fc1"])) == (128, 256, 32, 4, 8)
    assert _tile(C.linear_rule(90, sites["fc2"])) == (128, 128, 64, 4, 4)


def test_sm90_rules_fill_the_gpu_at_batch_1():
    """At M = 197 the large tiles launch 18 programs for 132 SMs; the rule takes tiles that launch a
    wave where the width allows it, and never fewer programs than the large tile."""
    m = TOKENS
    for site, key in dict(_gemm_keys(768, 1, torch.bfloat16)).items():
        if site in ("qkv", "proj", "fc1", "fc2"):
            c = C.linear_rule(90, key)
            programs = triton.cdiv(m, c.kwargs["BLOCK_M"]) * triton.cdiv(key.n, c.kwargs["BLOCK_N"])
            assert programs >= min(C.SM90_WAVE, triton.cdiv(m, 64) * triton.cdiv(key.n, 64)), (site, _tile(c))
    fwd = C.attention_rule("fwd")(90, next(_attention_keys(768, 12, 1, torch.bfloat16)))
    assert fwd.kwargs["BLOCK_M"] == 64  # 4 query tiles × 12 heads instead of 2 × 12


def test_other_architectures_get_small_tiles_that_fit_any_gpu():
    """Not sm_90: no Hopper pick applies; the safe tiles fit 64 KiB of shared memory in fp32."""
    for arch in (80, 89, 100, "gfx942"):
        for site, key in _gemm_keys(768, 256, torch.float32):
            for rule, tiles in ((C.linear_rule, 1), (C.gated_linear_rule, 2)):
                c = rule(arch, key)
                k = c.kwargs
                assert c.num_stages * (k["BLOCK_M"] + tiles * k["BLOCK_N"]) * k["BLOCK_K"] * 4 <= 64 * 1024, site
        for key in _attention_keys(1024, 16, 256, torch.float32):
            for kernel, shape in ((n, s.shape) for n, s in C.ATTENTION_KERNELS.items()):
                c = C.attention_rule(kernel)(arch, key)
                streamed = "BLOCK_N" if shape.resident == "BLOCK_M" else "BLOCK_M"
                smem = (shape.operands * c.kwargs[shape.resident] + 2 * c.num_stages * c.kwargs[streamed]) \
                    * triton.next_power_of_2(key.head_dim) * 4
                assert smem <= 64 * 1024, (kernel, key)
        for key in _patch_keys(1024, 256, torch.float32):
            c = C.patch_rule(arch, key)
            k = c.kwargs
            assert (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * 4 * c.num_stages <= 64 * 1024
