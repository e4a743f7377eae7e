import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitfast import runtime
from vitfast.ops.attention import attention, attention_qkv
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, layouts, require_triton_path

NEG_INF = -math.inf


def _qkv(B, H, N, d, dtype):
    return torch.randn(B, N, 3 * H * d, device=DEVICE, dtype=dtype)


def _split(qkv, heads):
    """[B, N, 3·H·d] -> q, k, v [B, H, N, d], as PyTorch users split it."""
    B, N, _ = qkv.shape
    return qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)


def _sdpa(qkv, heads, dtype, scale=None, is_causal=False):
    """PyTorch's SDPA in ``dtype`` on the packed input; [B, N, D]."""
    q, k, v = _split(qkv.to(dtype), heads)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=is_causal).transpose(1, 2).flatten(2)


def _mha(qkv, heads, dtype, key_padding_mask=None, attn_mask=None, is_causal=False):
    """nn.MultiheadAttention's own mask handling (identity projections, exact in any dtype); [B, N, D].

    PyTorch's module takes ``is_causal`` only as a hint about ``attn_mask``, so causality is written
    into the mask here."""
    x = qkv.to(dtype).transpose(0, 1)  # sequence-first, as the functional form wants
    N, D = x.shape[0], x.shape[-1] // 3
    if is_causal:
        future = torch.ones(N, N, dtype=torch.bool, device=DEVICE).triu(1)
        if attn_mask is None:
            attn_mask = future
        else:
            attn_mask = attn_mask | future if attn_mask.dtype == torch.bool else attn_mask.masked_fill(future, NEG_INF)
    cast = lambda m: m if m is None or m.dtype == torch.bool else m.to(dtype)  # noqa: E731
    eye = torch.eye(D, device=DEVICE, dtype=dtype)
    q, k, v = x.chunk(3, dim=-1)
    out, _ = F.multi_head_attention_forward(
        q, k, v, D, heads, None, None, None, None, False, 0.0, eye, None, training=False,
        key_padding_mask=cast(key_padding_mask), need_weights=False, attn_mask=cast(attn_mask),
        use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye)
    return out.transpose(0, 1)


def _run_kernel(fn, *args, **kwargs):
    require_triton_path()
    with runtime.count_launches() as launches:
        out = fn(*args, **kwargs)
    assert launches.get("attention") == 1
    return out


# A covering set, not the cartesian product: every N in {1, 2, 17, 65}, d in {16, 64, 80}, heads
# {1, 3} and batch {1, 3} appears, 65 spanning several 32-row tiles in both directions.
SHAPES = [(1, 1, 1, 16), (3, 1, 2, 80), (1, 3, 17, 64), (3, 3, 65, 16), (1, 1, 65, 80), (3, 3, 17, 48)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B, H, N, d", SHAPES)
def test_attention_matches_sdpa(dtype, B, H, N, d):
    qkv = _qkv(B, H, N, d, dtype)
    out = _run_kernel(attention, qkv, H)
    assert out.shape == (B, N, H * d) and out.is_contiguous() and out.dtype == dtype
    assert_parity(out, _sdpa(qkv, H, dtype), _sdpa(qkv, H, torch.float64))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attention_causal_and_scale(dtype):
    qkv = _qkv(2, 3, 65, 64, dtype)
    for scale, is_causal in ((0.3, False), (None, True), (0.05, True)):
        out = _run_kernel(attention, qkv, 3, scale=scale, is_causal=is_causal)
        assert_parity(out, _sdpa(qkv, 3, dtype, scale, is_causal), _sdpa(qkv, 3, torch.float64, scale, is_causal),
                      what=f"scale={scale} is_causal={is_causal}")


def _make_masks(kind, B, H, N, dtype):
    """Op keyword arguments for one mask kind, each with at least one row that has no allowed key
    where the kind can express it (second return value)."""
    rand_bool = lambda *shape: torch.rand(*shape, device=DEVICE) < 0.3  # noqa: E731
    rand_float = lambda *shape: torch.randn(*shape, device=DEVICE, dtype=dtype)  # noqa: E731
    if kind == "kpm":
        kpm = rand_bool(B, N)
        kpm[-1] = True  # the last image is all padding: every row of it is empty
        return dict(key_padding_mask=kpm), True
    if kind == "kpm_float+additive":
        return dict(key_padding_mask=rand_float(B, N), attn_mask=rand_float(N, N)), False
    if kind in ("bool", "bool_bh"):
        m = rand_bool(N, N) if kind == "bool" else rand_bool(B * H, N, N)
        m[..., N // 2, :] = True
        return dict(attn_mask=m), True
    if kind in ("additive", "additive_bh"):
        m = rand_float(N, N) if kind == "additive" else rand_float(B * H, N, N)
        m[rand_bool(*m.shape)] = NEG_INF
        m[..., 1, :] = NEG_INF
        return dict(attn_mask=m), True
    if kind == "kpm+bool_bh":
        m = rand_bool(B * H, N, N)
        m[1, 0] = True
        return dict(key_padding_mask=rand_bool(B, N), attn_mask=m), True
    if kind == "causal+kpm":
        kpm = rand_bool(B, N)
        kpm[:, 0] = True  # row 0 sees only key 0, which is padded
        return dict(key_padding_mask=kpm, is_causal=True), True
    raise AssertionError(kind)


MASK_CASES = [  # (kind, B, H, N, d)
    ("kpm", 3, 3, 65, 16), ("kpm_float+additive", 3, 1, 17, 64), ("bool", 1, 3, 65, 80),
    ("bool_bh", 3, 3, 17, 64), ("additive", 3, 1, 65, 64), ("additive_bh", 3, 3, 2, 16),
    ("kpm+bool_bh", 3, 3, 65, 16), ("causal+kpm", 3, 3, 65, 80),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind, B, H, N, d", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_attention_masks_match_multihead_attention(dtype, kind, B, H, N, d):
    qkv = _qkv(B, H, N, d, dtype)
    masks, has_empty_rows = _make_masks(kind, B, H, N, dtype)
    out = _run_kernel(attention, qkv, H, **masks)
    ref = _mha(qkv, H, torch.float64, **masks)
    # A row with no allowed key is zero (PyTorch agrees; older releases gave NaN there).
    empty = (ref.unflatten(-1, (H, d)) == 0).all(-1)  # [B, N, H]
    assert bool(empty.any()) == has_empty_rows
    assert (out.unflatten(-1, (H, d))[empty] == 0).all()
    assert_parity(out, _mha(qkv, H, dtype, **masks), ref, what=kind)


def test_attention_strided_qkv_views():
    """A sequence-first buffer seen batch-first, a slice of a wider buffer, a non-unit last stride."""
    B, H, N, d = 3, 3, 17, 64
    seq_first = torch.randn(N, B, 3 * H * d, device=DEVICE)
    wide = torch.randn(B, N, 3 * H * d + 40, device=DEVICE)[..., 8:8 + 3 * H * d]
    columns = torch.randn(3 * H * d, B, N, device=DEVICE).permute(1, 2, 0)
    for name, qkv in (("seq-first", seq_first.transpose(0, 1)), ("wide", wide), ("column-major", columns)):
        assert not qkv.is_contiguous()
        out = _run_kernel(attention, qkv, H)
        assert_parity(out, _sdpa(qkv, H, torch.float32), _sdpa(qkv, H, torch.float64), what=name)


def test_attention_strided_masks():
    """Masks are read through their strides: transposed, broadcast with expand, sliced."""
    B, H, N, d = 3, 3, 17, 16
    qkv = _qkv(B, H, N, d, torch.float32)
    cases = {
        "transposed bool": dict(attn_mask=(torch.rand(N, N, device=DEVICE) < 0.3).t()),
        "expanded additive, sliced additive padding": dict(
            attn_mask=torch.randn(1, N, N, device=DEVICE).expand(B * H, N, N),
            key_padding_mask=torch.randn(B, 2 * N, device=DEVICE)[:, ::2]),
    }
    for name, masks in cases.items():
        assert not any(m.is_contiguous() for m in masks.values())
        out = _run_kernel(attention, qkv, H, **masks)
        assert_parity(out, _mha(qkv, H, torch.float32, **masks), _mha(qkv, H, torch.float64, **masks), what=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attention_4d_masks_broadcast_like_sdpa(dtype):
    """4-D masks [B or 1, H or 1, N, N] (Hugging Face passes [B, 1, N, N]) are read in place, size-1
    dimensions broadcast; each equals the [B·H, N, N] mask it broadcasts to."""
    B, H, N, d = 2, 3, 17, 16
    qkv = _qkv(B, H, N, d, dtype)
    for shape in ((B, 1, N, N), (B, H, N, N), (1, H, N, N), (1, 1, N, N)):
        for kind, mask in (("bool", torch.rand(*shape, device=DEVICE) < 0.3),
                           ("additive", torch.randn(*shape, device=DEVICE, dtype=dtype))):
            stacked = mask.expand(B, H, N, N).reshape(B * H, N, N)
            out = _run_kernel(attention, qkv, H, attn_mask=mask)
            assert_parity(out, _mha(qkv, H, dtype, attn_mask=stacked), _mha(qkv, H, torch.float64, attn_mask=stacked),
                          what=f"{kind} {shape}")


def mask_layouts(masks):
    """(name, masks) with every mask in ``masks`` in one layout of ``helpers.layouts``: contiguous,
    sliced, transposed, and for float masks stride 0 (one additive value per query row; a bool
    mask broadcast that way would only empty whole rows)."""
    names = list(masks)
    floats = all(m.is_floating_point() for m in masks.values())
    for pairs in zip(*(layouts(masks[k], stride0=floats) for k in names)):
        yield pairs[0][0], {k: t for k, (_, t) in zip(names, pairs)}


MASK_LAYOUT_CASES = [("kpm+bool_bh", 3, 3, 17, 16), ("kpm_float+additive", 3, 1, 17, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind, B, H, N, d", MASK_LAYOUT_CASES, ids=[c[0] for c in MASK_LAYOUT_CASES])
def test_attention_mask_layouts(dtype, kind, B, H, N, d):
    """Both masks, bool and additive, are read through their strides in every layout."""
    qkv = _qkv(B, H, N, d, dtype)
    masks, _ = _make_masks(kind, B, H, N, dtype)
    for name, laid_out in mask_layouts(masks):
        out = _run_kernel(attention, qkv, H, **laid_out)
        assert_parity(out, _mha(qkv, H, dtype, **laid_out), _mha(qkv, H, torch.float64, **laid_out), what=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attention_sdpa_layout_entry(dtype):
    B, H, N, d = 3, 3, 65, 80
    q = torch.randn(B, N, H, d, device=DEVICE, dtype=dtype).transpose(1, 2)  # [B, H, N, d], strided
    k = torch.randn(B, H, d, N, device=DEVICE, dtype=dtype).transpose(2, 3)  # non-unit last stride
    v = torch.randn(H, B, N, d, device=DEVICE, dtype=dtype).transpose(0, 1)
    kpm = torch.rand(B, N, device=DEVICE) < 0.2
    out = _run_kernel(attention_qkv, q, k, v, key_padding_mask=kpm, is_causal=True)
    assert out.shape == (B, H, N, d) and out.is_contiguous()
    allowed = ~kpm[:, None, None, :] & torch.ones(N, N, dtype=torch.bool, device=DEVICE).tril()
    pt = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # SDPA's bool: True = allowed
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=allowed)
    assert_parity(out, pt, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attention_log_sum_exp(dtype):
    B, H, N, d = 2, 3, 65, 16
    qkv = _qkv(B, H, N, d, dtype)
    m = torch.randn(N, N, device=DEVICE, dtype=dtype)
    m[5] = NEG_INF
    scale = 0.2
    _, lse = _run_kernel(attention, qkv, H, attn_mask=m, scale=scale, return_lse=True)
    assert lse.shape == (B, H, N) and lse.dtype == torch.float32
    q, k, _ = _split(qkv, H)

    def scores_lse(t):
        return torch.logsumexp((q.to(t) @ k.to(t).transpose(-1, -2)) * scale + m.to(t), dim=-1)

    ref, pt = scores_lse(torch.float64), scores_lse(torch.float32)
    assert (lse[:, :, 5] == math.inf).all(), "an empty row stores +inf, so exp(s - lse) is 0 there"
    keep = torch.arange(N, device=DEVICE) != 5
    assert_parity(lse[:, :, keep], pt[:, :, keep], ref[:, :, keep], atol=1e-5)


def test_attention_untiled_head_size_falls_back_once(recwarn):
    B, H, N, d = 2, 3, 17, 24
    qkv = _qkv(B, H, N, d, torch.float32)
    bad = torch.rand(N, N, device=DEVICE) < 0.3
    bad[3] = True
    runtime._warned.discard("attention:head_dim=24:torch.float32")
    with runtime.count_launches() as launches:
        out = attention(qkv, H, attn_mask=bad)
        again = attention(qkv, H, attn_mask=bad)
    assert not launches
    warned = [w for w in recwarn if "head size 24" in str(w.message)]
    assert len(warned) == 1 and issubclass(warned[0].category, RuntimeWarning)
    torch.testing.assert_close(again, out)
    assert (out.unflatten(-1, (H, d))[:, 3] == 0).all()
    assert_parity(out, _mha(qkv, H, torch.float32, attn_mask=bad), _mha(qkv, H, torch.float64, attn_mask=bad))


def test_attention_cpu_bf16_takes_pytorch():
    """Triton's interpreter computes bf16 tl.dot wrongly (errors of 1e8 were seen): CPU bf16 never
    reaches the kernel, it takes SDPA with one warning."""
    qkv = torch.randn(2, 17, 3 * 2 * 16, dtype=torch.bfloat16)
    q, k, v = _split(qkv, 2)
    runtime._warned.discard("attention:interpreter-bf16")
    warns = pytest.warns(RuntimeWarning, match="bfloat16 under Triton's interpreter")
    with runtime.count_launches() as launches, warns if runtime.interpreter_enabled() else contextlib.nullcontext():
        out = attention(qkv, 2)
        out_qkv = attention_qkv(q, k, v)
    assert not launches
    assert_parity(out, _sdpa(qkv, 2, torch.bfloat16), _sdpa(qkv, 2, torch.float64))
    assert_parity(out_qkv, F.scaled_dot_product_attention(q, k, v),
                  F.scaled_dot_product_attention(q.double(), k.double(), v.double()))


def test_attention_numpy_scalars():
    """num_heads and scale may be NumPy scalars (a config file's), as PyTorch's own modules allow."""
    qkv = _qkv(2, 3, 17, 16, torch.float32)
    out = _run_kernel(attention, qkv, np.int64(3), scale=np.float32(0.3))
    assert_parity(out, _sdpa(qkv, 3, torch.float32, 0.3), _sdpa(qkv, 3, torch.float64, 0.3))


def test_attention_pytorch_fallback_masks_and_lse():
    """The path CPU users without the interpreter take: same masks, empty rows and log-sum-exp."""
    B, H, N, d = 3, 3, 17, 16
    qkv = _qkv(B, H, N, d, torch.float32)
    masks, _ = _make_masks("additive_bh", B, H, N, torch.float32)
    masks.update(key_padding_mask=torch.randn(B, N, device=DEVICE), is_causal=True)
    kernel_out, kernel_lse = _run_kernel(attention, qkv, H, return_lse=True, **masks)
    with runtime.fallback_only(), runtime.count_launches() as launches:
        out, lse = attention(qkv, H, return_lse=True, **masks)
    assert not launches
    assert_parity(out, _mha(qkv, H, torch.float32, **masks), _mha(qkv, H, torch.float64, **masks))
    torch.testing.assert_close(out, kernel_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, kernel_lse, atol=1e-5, rtol=1e-5)


def test_attention_gradients_flow_through_fallback():
    """On the PyTorch path (CPU without the interpreter) gradients flow through SDPA; empty rows give
    zero gradients, never NaN. The backward kernels are tested in test_attention_backward.py."""
    B, H, N, d = 2, 3, 17, 64
    kpm = torch.zeros(B, N, dtype=torch.bool, device=DEVICE)
    kpm[1] = True
    qkv = _qkv(B, H, N, d, torch.float32).requires_grad_()
    with runtime.fallback_only(), runtime.count_launches() as launches:
        out = attention(qkv, H, key_padding_mask=kpm)
    assert not launches and out.requires_grad
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    assert torch.isfinite(grad).all() and (grad[1] == 0).all()
    ref = qkv.detach()[:1].double().requires_grad_()
    (ref_grad,) = torch.autograd.grad(_sdpa(ref, H, torch.float64), ref, grad_out[:1].double())
    torch.testing.assert_close(grad[:1].double(), ref_grad, atol=1e-5, rtol=1e-5)


def test_attention_custom_op_registration():
    """Fake (meta) kernel, schema and autograd registration agree with the real op."""
    q, k, v = _split(_qkv(1, 2, 17, 16, torch.float32), 2)
    mask = torch.rand(17, 17, device=DEVICE) < 0.2
    torch.library.opcheck(torch.ops.vitfast.attention_fwd, (q, k, v, None, mask, 0.25, False, True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda x: attention(x, 5), ValueError, "qkv last dimension (192) must be divisible by 3 * num_heads (3 * 5 = 15)"),
        (lambda x: attention(x.long(), 2), TypeError, "qkv must be float32"),
        (lambda x: attention(x[0], 2), ValueError, "qkv must be 3-D"),
        (lambda x: attention(x, 0), ValueError, "num_heads must be a positive integer"),
        (lambda x: attention(x.new_zeros(2, 17, 3 * 300), 1), ValueError,
         "head size of qkv must be between 1 and 256, got 300"),
        (lambda x: attention(x, 2, key_padding_mask=torch.zeros(2, 16, dtype=torch.bool)), ValueError,
         "key_padding_mask must have shape (2, 17), got (2, 16)"),
        (lambda x: attention(x, 2, key_padding_mask=torch.zeros(2, 17, dtype=torch.int64)), TypeError,
         "key_padding_mask must be bool or float32, float16, bfloat16 or float64, got torch.int64"),
        (lambda x: attention(x, 2, attn_mask=torch.zeros(3, 17, 17, dtype=torch.bool)), ValueError,
         "attn_mask must have shape (17, 17), (4, 17, 17) or one broadcasting to (2, 2, 17, 17), got (3, 17, 17)"),
        (lambda x: attention(x, 2, attn_mask=torch.zeros(17, 17, dtype=torch.int32)), TypeError,
         "attn_mask must be bool or float32"),
        (lambda x: attention(x, 2, attn_mask=torch.zeros(17, 17, device="meta")), ValueError,
         "attn_mask is on meta but qkv is on cpu"),
        (lambda x: attention(x, 2, scale=math.nan), ValueError, "scale must be a finite number or None"),
        (lambda x: attention_qkv(*_split(x, 2)[:2], _split(x, 2)[2][:, :, :9]), ValueError,
         "v has shape (2, 2, 9, 32) but k has shape (2, 2, 17, 32)"),
        (lambda x: attention_qkv(*_split(x, 2)[:2], _split(x, 2)[2].half()), TypeError,
         "v has dtype torch.float16 but q has dtype torch.float32"),
        (lambda x: attention_qkv(x, x, x), ValueError, "q must be 4-D"),
    ],
)
def test_attention_bad_input(call, exc, words):
    x = torch.randn(2, 17, 192)
    with runtime.count_launches() as launches, pytest.raises(exc) as info:
        call(x)
    assert words in str(info.value)
    assert not launches


GPU_SHAPES = [(256, 12, 197, 64), (64, 16, 197, 64), (64, 16, 257, 80), (16, 12, 577, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("B, H, N, d", GPU_SHAPES)
def test_attention_gpu_bf16_vit_shapes(B, H, N, d):
    qkv = _qkv(B, H, N, d, torch.bfloat16)
    out = _run_kernel(attention, qkv, H)
    assert_parity(out, _sdpa(qkv, H, torch.bfloat16), _sdpa(qkv, H, torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["kpm", "additive_bh", "causal+kpm"])
def test_attention_gpu_bf16_masks(kind):
    B, H, N, d = 8, 12, 197, 64
    qkv = _qkv(B, H, N, d, torch.bfloat16)
    masks, _ = _make_masks(kind, B, H, N, torch.bfloat16)
    out = _run_kernel(attention, qkv, H, **masks)
    assert_parity(out, _mha(qkv, H, torch.bfloat16, **masks), _mha(qkv, H, torch.float64, **masks), what=kind)
