"""Attention backward kernels: gradients of q, k, v (or of the packed qkv) against PyTorch's autograd."""
import math

import pytest
import torch
import torch.nn.functional as F

from vitfast import runtime
from vitfast.ops.attention import attention, attention_qkv
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, require_triton_path
from test_attention import MASK_CASES, MASK_LAYOUT_CASES, _make_masks, _mha, _qkv, _sdpa, _split, mask_layouts

KERNELS = {"attention": 1, "attention_bwd": 1}


def _grads(fn, inputs, dtype, grad_out=None):
    """``fn(*inputs, dtype)`` and its gradients wrt ``inputs`` (cast to ``dtype``, strides kept) for
    the upstream gradient ``grad_out``, a fresh one when None; returns all three."""
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    y = fn(*xs, dtype)
    if grad_out is None:
        grad_out = torch.randn_like(y)
    return y.detach(), torch.autograd.grad(y, xs, grad_out.to(dtype)), grad_out


def _check_grads(fast, torch_fn, inputs, dtype, what="", launches=KERNELS):
    """Three-way parity of the output and of the input gradients: vitfast (``fast``, outputs
    poisoned, running exactly ``launches``), PyTorch's ``torch_fn`` in ``dtype`` and in float64, one
    upstream gradient for all. Returns vitfast's gradients."""
    if launches:
        require_triton_path()
    with runtime.count_launches() as counts, runtime.poison_outputs():
        y, out, grad_out = _grads(fast, inputs, dtype)
    assert counts == launches, counts
    y_pt, pt, _ = _grads(torch_fn, inputs, dtype, grad_out)
    y_ref, ref, _ = _grads(torch_fn, inputs, torch.float64, grad_out)
    assert_parity(y, y_pt, y_ref, what=f"{what} output")
    assert_parity(out, pt, ref, what=f"{what} gradients")
    return out


# Every N in {1, 2, 17, 65}, d in {16, 64, 80}, heads {1, 3} and batch {1, 3} appears; 65 spans three
# interpreter tiles both ways, so the dK/dV and dQ loops both cross tile edges. (B, H, N, d, scale, causal)
SHAPES = [(1, 1, 1, 16, None, False), (3, 1, 2, 80, None, True), (1, 3, 17, 64, 0.3, False),
          (3, 3, 65, 16, None, True), (1, 1, 65, 80, 0.05, False), (3, 3, 17, 48, None, False),
          (1, 3, 65, 64, None, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B, H, N, d, scale, is_causal", SHAPES)
def test_backward_matches_sdpa(dtype, B, H, N, d, scale, is_causal):
    (dqkv,) = _check_grads(lambda x, _: attention(x, H, scale=scale, is_causal=is_causal),
                           lambda x, dt: _sdpa(x, H, dt, scale, is_causal),
                           [_qkv(B, H, N, d, dtype)], dtype)
    assert dqkv.shape == (B, N, 3 * H * d) and dqkv.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind, B, H, N, d", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_backward_masks_match_multihead_attention(dtype, kind, B, H, N, d):
    qkv = _qkv(B, H, N, d, dtype)
    masks, has_empty_rows = _make_masks(kind, B, H, N, dtype)
    (dqkv,) = _check_grads(lambda x, _: attention(x, H, **masks), lambda x, dt: _mha(x, H, dt, **masks),
                           [qkv], dtype, what=kind)
    # A query row with no allowed key has zero gradient, and a padded key receives none.
    empty = (_mha(qkv, H, torch.float64, **masks).unflatten(-1, (H, d)) == 0).all(-1)  # [B, N, H]
    assert bool(empty.any()) == has_empty_rows
    assert (dqkv[..., :H * d].unflatten(-1, (H, d))[empty] == 0).all()
    kpm = masks.get("key_padding_mask")
    if kpm is not None and kpm.dtype == torch.bool:
        assert (dqkv[..., H * d:][kpm] == 0).all()


@pytest.mark.parametrize("kind, B, H, N, d", MASK_LAYOUT_CASES, ids=[c[0] for c in MASK_LAYOUT_CASES])
def test_backward_mask_layouts(kind, B, H, N, d):
    """The dK/dV and dQ kernels read both masks through their strides too."""
    masks, _ = _make_masks(kind, B, H, N, torch.float32)
    qkv = _qkv(B, H, N, d, torch.float32)
    for name, laid_out in mask_layouts(masks):
        _check_grads(lambda x, _: attention(x, H, **laid_out), lambda x, dt: _mha(x, H, dt, **laid_out), [qkv],
                     torch.float32, what=name)


def test_backward_4d_mask():
    """A [B, 1, N, N] mask (Hugging Face's) broadcasts over heads in the backward kernels too."""
    B, H, N, d = 2, 3, 17, 16
    mask = torch.rand(B, 1, N, N, device=DEVICE) < 0.3
    stacked = mask.expand(B, H, N, N).reshape(B * H, N, N)
    _check_grads(lambda x, _: attention(x, H, attn_mask=mask), lambda x, dt: _mha(x, H, dt, attn_mask=stacked),
                 [_qkv(B, H, N, d, torch.float32)], torch.float32)


def test_backward_strided_qkv_views():
    """A sequence-first buffer seen batch-first, and a slice of a wider buffer, both read in place."""
    B, H, N, d = 3, 3, 17, 64
    seq_first = torch.randn(N, B, 3 * H * d, device=DEVICE).transpose(0, 1)
    wide = torch.randn(B, N, 3 * H * d + 40, device=DEVICE)[..., 8:8 + 3 * H * d]
    for name, qkv in (("seq-first", seq_first), ("wide", wide)):
        assert not qkv.is_contiguous()
        _check_grads(lambda x, _: attention(x, H, is_causal=True), lambda x, dt: _sdpa(x, H, dt, is_causal=True),
                     [qkv], torch.float32, what=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_sdpa_layout_entry(dtype):
    B, H, N, d = 3, 3, 65, 80
    # [B, H, N, d] views: tokens-major q, k with a non-unit last stride, heads-major v.
    layouts = (((B, N, H, d), (1, 2)), ((B, H, d, N), (2, 3)), ((H, B, N, d), (0, 1)))
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=dtype).transpose(*dims) for shape, dims in layouts)
    kpm = torch.rand(B, N, device=DEVICE) < 0.2
    allowed = ~kpm[:, None, None, :] & torch.ones(N, N, dtype=torch.bool, device=DEVICE).tril()
    grads = _check_grads(lambda q, k, v, _: attention_qkv(q, k, v, key_padding_mask=kpm, is_causal=True),
                         lambda q, k, v, _: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed),
                         [q, k, v], dtype)
    assert all(g.shape == (B, H, N, d) for g in grads)


def test_backward_through_log_sum_exp():
    """A loss that reads the log-sum-exp too: its gradient P·dlse joins dS."""
    B, H, N, d = 2, 3, 33, 16
    m = torch.randn(N, N, device=DEVICE)

    def fast(x, _):
        out, lse = attention(x, H, attn_mask=m, return_lse=True)
        return torch.cat([out.flatten(), lse.flatten()])

    def reference(x, dt):
        q, k, _ = _split(x, H)
        lse = torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(d) + m.to(dt), dim=-1)
        return torch.cat([_mha(x, H, dt, attn_mask=m).flatten(), lse.flatten()])

    _check_grads(fast, reference, [_qkv(B, H, N, d, torch.float32)], torch.float32)


def test_backward_is_deterministic():
    """dQ has its own kernel (no atomics): two runs give bit-identical gradients."""
    B, H, N, d = 2, 3, 65, 64
    qkv = _qkv(B, H, N, d, torch.float16).requires_grad_()
    out = attention(qkv, H, is_causal=True)
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, qkv, grad_out, retain_graph=True)[0]
    assert torch.equal(first, torch.autograd.grad(out, qkv, grad_out)[0])


def test_float_mask_that_needs_grad_falls_back(recwarn):
    """The kernels compute no mask gradient: a float mask that needs one takes PyTorch's SDPA, once warned."""
    B, H, N, d = 2, 3, 17, 16
    runtime._warned.discard("attention:mask_grad")
    inputs = [_qkv(B, H, N, d, torch.float32), torch.randn(N, N, device=DEVICE)]
    for _ in range(2):
        dqkv, dmask = _check_grads(lambda x, m, _: attention(x, H, attn_mask=m),
                                   lambda x, m, dt: _mha(x, H, dt, attn_mask=m), inputs, torch.float32, launches={})
    assert len([w for w in recwarn if "float mask" in str(w.message)]) == 1
    assert dmask.abs().sum() > 0


def test_backward_custom_op_registration():
    """Schemas, fake kernels, autograd registration and AOT tracing (what torch.compile uses) agree
    with the real ops, for both forward ops and the backward ops behind them."""
    B, H, N, d = 1, 2, 17, 16
    qkv = _qkv(B, H, N, d, torch.float32).requires_grad_()
    mask = torch.rand(N, N, device=DEVICE) < 0.2
    torch.library.opcheck(torch.ops.vitfast.attention_packed_fwd, (qkv, H, None, mask, 0.25, True))
    q, k, v = (t.detach().requires_grad_() for t in _split(qkv.detach(), H))
    torch.library.opcheck(torch.ops.vitfast.attention_fwd, (q, k, v, None, mask, 0.25, True, False))
    with torch.no_grad():
        out, lse = torch.ops.vitfast.attention_packed_fwd(qkv, H, None, mask, 0.25, True)
    static = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.vitfast.attention_packed_bwd,
                          (torch.randn_like(out), qkv.detach(), H, out, lse, torch.randn_like(lse), None, mask,
                           0.25, True), test_utils=static)
    torch.library.opcheck(torch.ops.vitfast.attention_bwd,
                          (torch.randn_like(q), q.detach(), k.detach(), v.detach(), torch.randn_like(q),
                           lse, None, None, mask, 0.25, True), test_utils=static)


@pytest.mark.gpu
@pytest.mark.parametrize("is_causal", [False, True])
def test_backward_gpu_bf16_vit_shape(is_causal):
    B, H, N, d = 64, 12, 197, 64
    _check_grads(lambda x, _: attention(x, H, is_causal=is_causal), lambda x, dt: _sdpa(x, H, dt, is_causal=is_causal),
                 [_qkv(B, H, N, d, torch.bfloat16)], torch.bfloat16, what=f"is_causal={is_causal}")
