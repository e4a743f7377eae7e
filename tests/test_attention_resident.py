"""The resident-K/V attention forward (kernels/attention_resident.py) and the rule that routes to it.

In the interpreter the route is the GPU's (the same ``_resident_configs.reason``, the same chunks of
keys), so the launches below run the kernel they would run on an sm_90 GPU; each test asserts which
one ran. The reference is PyTorch's SDPA (or timm's rotation + SDPA), three-way as everywhere; fp16
is the interpreter's 16-bit dtype (bf16 joins on the GPU).
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton

from vitfast.kernels import _resident_configs as R
from vitfast.kernels import attention as A
from vitfast.kernels import attention_resident
from vitfast.kernels._configs import SHORT_QUERIES, SMEM_BYTES, AttentionKey
from vitfast.ops.attention import attention, attention_qkv
from helpers import DEVICE, assert_parity, require_triton_path
from test_attention_backward import _check_grads
from test_attention_rope import _split, _table, _timm_attention

RESIDENT, GENERAL = "attention_resident_fwd", "attention_fwd"
HALF = torch.float16 if DEVICE.type == "cpu" else torch.bfloat16


def _ran(expected_kernel: str, reason_words: str = "") -> dict:
    """The one route recorded since ``A.ran`` was cleared: its kernel, and words of its reason."""
    rows = A.routes()
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["kernel"] == expected_kernel, row
    assert reason_words in row.get("reason", ""), row
    return row


@pytest.fixture(autouse=True)
def _fresh_routes():
    require_triton_path()
    A.ran.clear()
    yield
    A.ran.clear()


def _sdpa_ref(q, k, v, dtype, **kw):
    return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), **kw)


# (B, H, N_Q, N_KV, d, causal): N_KV in {17, 129, 197, 257, 577} (one chunk; one pass of 256 keys; 3, 5
# and 10 chunks of 64), head sizes 16, 48, 64, 72 and 80 (padded to 128 columns), cross-attention both
# ways, batch 1 and 3, and query counts that leave a ragged last tile.
SHAPES = [(1, 2, 17, 17, 64, False), (3, 1, 197, 197, 64, False), (1, 2, 197, 197, 80, True),
          (1, 1, 129, 129, 72, False), (1, 1, 257, 257, 16, False), (2, 1, 40, 577, 64, False),
          (1, 1, 577, 100, 48, True), (1, 3, 33, 257, 80, False)]


@pytest.mark.parametrize("B, H, n_q, n_kv, d, causal", SHAPES, ids=["-".join(map(str, s)) for s in SHAPES])
def test_resident_forward_matches_sdpa(B, H, n_q, n_kv, d, causal):
    """Output and log-sum-exp against SDPA in float64, views of [B, N, H·d] tensors as the op passes."""
    q = torch.randn(B, H, n_q, d, device=DEVICE).to(HALF)
    k, v = torch.randn(2, B, H, n_kv, d, device=DEVICE).to(HALF).unbind(0)
    out, lse = attention_qkv(q, k, v, is_causal=causal, return_lse=True)
    row = _ran(RESIDENT)
    assert row["config"]["KV_CHUNKS"] == math.ceil(n_kv / row["config"]["BLOCK_KV"])
    assert_parity(out, _sdpa_ref(q, k, v, HALF, is_causal=causal), _sdpa_ref(q, k, v, torch.float64, is_causal=causal))
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    if causal:
        s = s.masked_fill(torch.ones(n_q, n_kv, dtype=torch.bool, device=DEVICE).triu(1), -math.inf)
    assert (lse.double() - torch.logsumexp(s, -1)).abs().max() <= 1e-5


@pytest.mark.parametrize("B, H, N, d, causal", [(1, 2, 197, 64, False), (2, 1, 257, 80, True), (1, 1, 33, 16, False)])
def test_backward_after_resident_forward(B, H, N, d, causal):
    """The backward reads the resident forward's log-sum-exp as the general kernel's: gradients of the
    packed input within the three-way bound."""
    qkv = torch.randn(B, N, 3 * H * d, device=DEVICE)
    _check_grads(lambda x, _: attention(x, H, is_causal=causal),
                 lambda x, dt: F.scaled_dot_product_attention(*_split(x, H), is_causal=causal)
                 .transpose(1, 2).flatten(2),
                 [qkv], HALF)
    assert _ran(RESIDENT)


@pytest.mark.parametrize("N, prefix, d, half, table", [(197, 1, 64, False, "cat"), (65, 5, 80, True, "heads"),
                                                       (130, 1, 64, True, "random")])
def test_resident_rope_matches_timm(N, prefix, d, half, table):
    """q and every 64-key chunk rotated as they arrive (partner columns by gather), forward and backward."""
    B, H = 2, 2
    rope = _table(table, B, H, N - prefix, d, half)
    kw = dict(rope=rope, rope_prefix=prefix, rope_half=half)
    q, k, v = torch.randn(3, B, H, N, d, device=DEVICE).unbind(0)
    _check_grads(lambda q, k, v, _: attention_qkv(q, k, v, **kw),
                 lambda q, k, v, dt: _timm_attention(q, k, v, rope, prefix, half, dt), [q, k, v], HALF)
    row = _ran(RESIDENT)
    assert row["config"]["BLOCK_KV"] == 64


def test_resident_and_general_kernels_agree(monkeypatch):
    """The same launch through either forward: the resident output as close to float64 as the general
    kernel's (three-way, the general kernel in PyTorch's place), log-sum-exps equal to fp32 rounding."""
    q, k, v = (t.to(HALF) for t in torch.randn(3, 2, 3, 197, 64, device=DEVICE).unbind(0))
    resident = attention_qkv(q, k, v, return_lse=True)
    _ran(RESIDENT)
    A.ran.clear()
    monkeypatch.setattr(attention_resident, "takes", lambda *args: "forced for the test")
    general = attention_qkv(q, k, v, return_lse=True)
    _ran(GENERAL, "forced")
    assert_parity(resident[0], general[0], _sdpa_ref(q, k, v, torch.float64))
    assert torch.allclose(resident[1], general[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, kernel", [(torch.float32, GENERAL), (HALF, RESIDENT)])
def test_head_size_72(dtype, kernel):
    """SigLIP-So400m's head size (1152 / 16), padded to 128 columns: both kernels, forward and backward."""
    B, H, N, d = 2, 2, 65, 72
    qkv = torch.randn(B, N, 3 * H * d, device=DEVICE)
    _check_grads(lambda x, _: attention(x, H),
                 lambda x, dt: F.scaled_dot_product_attention(*_split(x, H)).transpose(1, 2).flatten(2), [qkv], dtype)
    assert _ran(kernel)


def test_a_config_that_cannot_hold_the_keys_is_refused():
    """A tuned pick (read from a file) whose chunks hold fewer keys than the head has: an error, never a
    silently shorter softmax."""
    q, k, v = (t.to(HALF) for t in torch.randn(3, 1, 1, 40, 16, device=DEVICE).unbind(0))
    o, lse = torch.empty_like(q), torch.empty(1, 1, 40, device=DEVICE)
    _, _, resident = A.forward_launchers(q, k, v, o, lse, 0.25)
    short = triton.Config({"BLOCK_M": 32, "BLOCK_KV": 16, "KV_CHUNKS": 2, "GROUPS": 1}, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="2 chunks of 16 keys cannot hold 40 keys"):
        resident(short)


def _padding(B, N):
    kpm = torch.rand(B, N, device=DEVICE) < 0.3
    kpm[:, 0] = False
    return kpm


# What routes to the general kernel, and the words its reason holds.
GENERAL_CASES = {
    "float32": (dict(), torch.float32, 65, 65, 64, "float32 operands"),
    "padding mask": (dict(key_padding_mask=True), HALF, 65, 65, 64, "mask"),
    "attention mask": (dict(attn_mask=True), HALF, 65, 65, 64, "mask"),
    "dropout": (dict(dropout_p=0.3), HALF, 65, 65, 64, "dropout"),
    "short queries": (dict(), HALF, SHORT_QUERIES, 65, 64, "16 queries"),
    "over shared memory (d 64)": (dict(), HALF, 20, R.max_keys(64) + 1, 64, "exceed shared memory"),
    "over shared memory (d 80)": (dict(), HALF, 20, R.max_keys(80) + 1, 80, "exceed shared memory"),
    "over 16 chunks (d 16)": (dict(), HALF, 20, R.max_keys(16) + 1, 16, "more than 16 chunks"),
}


@pytest.mark.parametrize("case", GENERAL_CASES)
def test_what_the_general_kernel_keeps(case):
    """Masks, dropout, fp32, short queries and heads whose K and V exceed shared memory run the general
    kernel, correctly, with the reason in the routes the report prints."""
    extra, dtype, n_q, n_kv, d, words = GENERAL_CASES[case]
    B, H = 2, 1
    q = torch.randn(B, H, n_q, d, device=DEVICE)
    k, v = torch.randn(2, B, H, n_kv, d, device=DEVICE).unbind(0)
    kw, ref_kw = {}, {}
    if "key_padding_mask" in extra:
        kw["key_padding_mask"] = kpm = _padding(B, n_kv)
        ref_kw["attn_mask"] = ~kpm[:, None, None, :]
    if "attn_mask" in extra:
        kw["attn_mask"] = bias = torch.randn(n_q, n_kv, device=DEVICE)
        ref_kw["attn_mask"] = bias
    if "dropout_p" in extra:
        kw["dropout_p"] = extra["dropout_p"]
    out = attention_qkv(q.to(dtype), k.to(dtype), v.to(dtype), **kw)
    _ran(GENERAL, words)
    if "dropout_p" not in kw:  # dropout's mask and its same-seed equality are test_attention_dropout's
        ref = {dt: _sdpa_ref(q, k, v, dt, **{n: m.to(dt) if m.is_floating_point() else m for n, m in ref_kw.items()})
               for dt in (dtype, torch.float64)}
        assert_parity(out, ref[dtype], ref[torch.float64])


def test_misaligned_views_keep_the_general_kernel():
    """A token stride that is not a multiple of 16 bytes cannot be described: the general kernel runs."""
    B, H, N, d = 1, 2, 40, 16
    wide = torch.randn(B, N, 3 * H * d + 1, device=DEVICE)  # 97 fp16 elements between tokens
    q, k, v = (t for t in wide.to(HALF)[..., :-1].unflatten(-1, (3, H, d)).permute(2, 0, 3, 1, 4).unbind(0))
    out = attention_qkv(q, k, v)
    _ran(GENERAL, "16-byte aligned")
    assert_parity(out, _sdpa_ref(q, k, v, HALF), _sdpa_ref(q, k, v, torch.float64))


def _key(n_q, n_kv, d, batch_heads=3072, rope=0):
    return AttentionKey(batch_heads, n_q, n_kv, d, torch.bfloat16, 0, 0, False, rope, False)


def test_rule_holds_every_vit_sequence_at_head_size_64():
    """The bound is at least 729 keys at head size 64 (SigLIP's 27 × 27 patches), each pick fits shared
    memory by the same count the compile check confirms, and ViT's 197 tokens take one 256-key pass."""
    assert R.max_keys(64) >= 729
    for n in (17, 50, 197, 257, 577, 729, R.max_keys(64)):
        key = _key(n, n, 64)
        assert R.reason(key) is None, n
        c = R.rule(90, key)
        assert R.smem_bytes(key, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_KV"], c.kwargs["KV_CHUNKS"]) <= SMEM_BYTES
        assert c.kwargs["KV_CHUNKS"] * c.kwargs["BLOCK_KV"] >= n
        assert c in R.candidates(key)
    assert R.rule(90, _key(197, 197, 64)).kwargs | {"GROUPS": 0} == {"BLOCK_M": 64, "BLOCK_KV": 256, "KV_CHUNKS": 1,
                                                                      "GROUPS": 0}
    assert R.reason(_key(729, 729, 72)) is not None  # SigLIP-So400m: 72 columns pad to 128


@pytest.mark.parametrize("batch_heads, groups", [(16, 4), (128, 2), (512, 1), (4096, 1)])
def test_small_batches_split_a_heads_query_tiles(batch_heads, groups):
    """ViT-B (12 heads, 197 tokens, 4 tiles of 64 queries) at batch 1, 8, 32 and 256 (heads rounded up
    to a power of two, as the key holds them): GROUPS programs per head."""
    assert R.rule(90, _key(197, 197, 64, batch_heads)).kwargs["GROUPS"] == groups


ROOT = Path(__file__).resolve().parents[1]


def test_vit_b_pick_compiles_without_spills_on_tma_and_wgmma(tmp_path):
    """``hopper_compile.py --vit-attention`` for ViT-B at 224 px (batch 1 and 256) and SigLIP-So400m at
    384 px (batch 256): ViT-B's resident picks without spills, on TMA and wgmma, in the shared memory
    the rule counted; So400m's 729 keys at head size 72 on the general kernel, with the reason."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "attention.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hopper_compile.py"), "--vit-attention",
                           "--shapes", "vit_b16_224", "siglip_so400m14_384", "--batch", "1", "256",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {(r["shape"], r["batch"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("vit_b16_224", 1), ("vit_b16_224", 256), ("siglip_so400m14_384", 1),
                         ("siglip_so400m14_384", 256)}
    for batch, groups in ((1, 4), (256, 1)):
        r = rows["vit_b16_224", batch]
        assert (r["kernel"] == "_attention_resident_fwd_kernel" and r["spilled_bytes"] == 0 and r["tma"]
                and r["wgmma"]), r
        assert r["config"] | {"GROUPS": groups} == {"BLOCK_M": 64, "BLOCK_KV": 256, "KV_CHUNKS": 1, "GROUPS": groups,
                                                    "num_warps": 4, "num_stages": 1}, r
        key = _key(197, 197, 64)
        assert r["dynamic_shared_bytes"] <= R.smem_bytes(key, 64, 256, 1) <= SMEM_BYTES
        assert not r["general"]["tma"]  # what ran before: pointer loads
    so400m = rows["siglip_so400m14_384", 256]
    assert so400m["kernel"] == "_attention_fwd_kernel" and "exceed shared memory" in so400m["reason"]


def _script():
    spec = importlib.util.spec_from_file_location("attention_shapes_script",
                                                  ROOT / "benchmarks" / "attention_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", ["inference", "rope"])
def test_gpu_script_times_every_way_of_running_a_shape(variant):
    """The GPU script's row for a tiny shape in the interpreter, with a timer that runs each launch once:
    every resident candidate, the general kernel and SDPA (its math backend on the CPU)."""
    from torch.nn.attention import SDPBackend

    from vitfast.bench import attention_shapes
    from vitfast.kernels import _select

    _select.reset()
    calls = []

    def bench(fn):
        fn()
        calls.append(fn)
        return 1.0

    launch = attention_shapes.Launch("tiny", 1, variant, 2, 16, 40)
    row = _script().shape_row(launch, HALF, 1000.0, DEVICE, bench, {"math": SDPBackend.MATH})
    assert row["route"]["kernel"] == RESIDENT and not row.get("errors"), row
    assert row["resident"] and sum(r["rule"] for r in row["resident"]) == 1
    assert all(r["ms"] == 1.0 for r in row["resident"]) and row["general_ms"] == row["sdpa_math_ms"] == 1.0
    assert len(calls) == len(row["resident"]) + 2
    assert row["summary"]["traffic_bound_ms"] == launch.bytes() / 1000.0 / 1e6
    assert row["summary"]["route_vs_best_sdpa"] == 1.0


def test_the_report_says_which_forward_ran():
    """An optimized ViT (17 tokens) in 16 bits runs the resident forward; an fp32 launch the general one.
    The report's ``attention_routes`` and its text say so, with the reason."""
    import vitfast

    torch.manual_seed(0)
    model = vitfast.optimize(vitfast.reference.vit_tiny(img_size=32, patch_size=8, n_classes=3).eval().to(HALF))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32, device=DEVICE, dtype=HALF))
    report = model.vitfast_report
    assert [r["kernel"] for r in report.attention_routes()] == [RESIDENT]
    attention_qkv(*torch.randn(3, 1, 2, 17, 16, device=DEVICE).unbind(0))
    general = [r for r in report.attention_routes() if r["kernel"] == GENERAL]
    assert len(general) == 1 and "float32" in general[0]["reason"], report.attention_routes()
    text = str(report)
    assert "attention forwards launched in this process: 2" in text and RESIDENT in text
    assert f"{GENERAL} " in text and general[0]["reason"] in text
