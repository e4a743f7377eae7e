"""attention_qkv with fewer (or more) queries than keys: attention pooling's 1..4 learned queries
(SigLIP's MAP head) and cross-attention, forward and backward, against PyTorch's SDPA."""
import math

import pytest
import torch
import torch.nn.functional as F

from vitfast import runtime
from vitfast.ops.attention import attention_qkv
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, require_triton_path
from test_attention_backward import _check_grads


def _keys(B, H, n_kv, d, dtype=torch.float32):
    return torch.randn(2, B, H, n_kv, d, device=DEVICE, dtype=dtype).unbind(0)


def _padding(B, n_kv):
    """A random key padding mask with key 0 always kept, so no query row is empty."""
    kpm = torch.rand(B, n_kv, device=DEVICE) < 0.3
    kpm[:, 0] = False
    return kpm


def _sdpa(q, k, v, allowed=None, **kwargs):
    """SDPA with a bool mask in its own convention (True = allowed)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, **kwargs)


# (queries, keys): the pooling head's 1 and 4 learned queries over a small and a ViT-B token count,
# and 33 queries over 65 keys, which crosses several 32-row interpreter tiles both ways.
SHORT = [(1, 17), (4, 17), (1, 197), (4, 197)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n_q, n_kv", SHORT + [(33, 65)], ids=lambda x: str(x))
def test_short_queries_with_padding_match_sdpa(dtype, n_q, n_kv):
    """A learned query broadcast over the batch (stride 0, read in place) attends to padded keys;
    its gradient is the sum over the batch, which autograd takes from the kernels' full dq."""
    B, H, d = 3, 2, 64
    probe = torch.randn(1, H, n_q, d, device=DEVICE)
    k, v = _keys(B, H, n_kv, d)
    kpm = _padding(B, n_kv)

    def fast(probe, k, v, _):
        q = probe.expand(B, -1, -1, -1)
        assert q.stride(0) == 0
        return attention_qkv(q, k, v, key_padding_mask=kpm)

    def reference(probe, k, v, _):
        return _sdpa(probe.expand(B, -1, -1, -1), k, v, ~kpm[:, None, None, :])

    dprobe, dk, dv = _check_grads(fast, reference, [probe, k, v], dtype)
    assert dprobe.shape == probe.shape and dk.shape == k.shape == dv.shape
    assert (dk[kpm[:, None, :, None].expand_as(dk)] == 0).all(), "a padded key receives no gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n_q, n_kv", [(4, 17), (20, 7), (1, 197)], ids=lambda x: str(x))
def test_causal_is_sdpas_top_left(dtype, n_q, n_kv):
    """``is_causal`` with N_Q != N_KV means what SDPA's means: query i sees keys 0..i (top-left)."""
    B, H, d = 2, 2, 80
    q = torch.randn(B, H, n_q, d, device=DEVICE)
    k, v = _keys(B, H, n_kv, d)
    top_left = torch.ones(n_q, n_kv, dtype=torch.bool, device=DEVICE).tril()
    torch.testing.assert_close(_sdpa(q.double(), k.double(), v.double(), is_causal=True),
                               _sdpa(q.double(), k.double(), v.double(), top_left))
    _check_grads(lambda q, k, v, _: attention_qkv(q, k, v, is_causal=True),
                 lambda q, k, v, _: _sdpa(q, k, v, is_causal=True), [q, k, v], dtype)


def _cross_masks(kind, B, H, n_q, n_kv):
    """(vitfast keyword arguments, the same masks as SDPA's additive float mask)."""
    rand_bool = lambda *shape: torch.rand(*shape, device=DEVICE) < 0.3  # noqa: E731
    if kind == "bool [Nq, Nk]":
        m = rand_bool(n_q, n_kv)
        m[:, 0] = False
        return dict(attn_mask=m), torch.zeros(n_q, n_kv, device=DEVICE).masked_fill(m, -math.inf)
    if kind == "additive [B·H, Nq, Nk] + padding":
        m = torch.randn(B * H, n_q, n_kv, device=DEVICE)
        kpm = _padding(B, n_kv)
        bias = m.reshape(B, H, n_q, n_kv).masked_fill(kpm[:, None, None, :], -math.inf)
        return dict(attn_mask=m, key_padding_mask=kpm), bias
    if kind == "bool [B, 1, Nq, Nk] + causal":
        m = rand_bool(B, 1, n_q, n_kv)
        m[..., 0] = False
        future = torch.ones(n_q, n_kv, dtype=torch.bool, device=DEVICE).triu(1)
        return dict(attn_mask=m, is_causal=True), torch.zeros(B, 1, n_q, n_kv, device=DEVICE).masked_fill(
            m | future, -math.inf)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["bool [Nq, Nk]", "additive [B·H, Nq, Nk] + padding", "bool [B, 1, Nq, Nk] + causal"])
def test_cross_attention_masks(kind):
    B, H, n_q, n_kv, d = 2, 3, 4, 65, 16
    q = torch.randn(B, H, n_q, d, device=DEVICE)
    k, v = _keys(B, H, n_kv, d)
    masks, bias = _cross_masks(kind, B, H, n_q, n_kv)
    _check_grads(lambda q, k, v, _: attention_qkv(q, k, v, **masks),
                 lambda q, k, v, dt: _sdpa(q, k, v, bias.to(dt)), [q, k, v], torch.float32, what=kind)


def test_cross_attention_log_sum_exp_and_fallback():
    """return_lse gives [B, H, N_Q]; the PyTorch path (CPU without the interpreter) agrees, masks included."""
    B, H, n_q, n_kv, d = 2, 3, 4, 65, 16
    q = torch.randn(B, H, n_q, d, device=DEVICE)
    k, v = _keys(B, H, n_kv, d)
    masks, bias = _cross_masks("additive [B·H, Nq, Nk] + padding", B, H, n_q, n_kv)
    require_triton_path()
    with runtime.count_launches() as launches:
        out, lse = attention_qkv(q, k, v, return_lse=True, **masks)
    assert launches == {"attention": 1}
    assert lse.shape == (B, H, n_q) and lse.dtype == torch.float32
    scores = lambda t: (q.to(t) @ k.to(t).transpose(-1, -2)) / math.sqrt(d) + bias.to(t)  # noqa: E731
    assert_parity(lse, torch.logsumexp(scores(torch.float32), -1), torch.logsumexp(scores(torch.float64), -1))
    with runtime.fallback_only(), runtime.count_launches() as launches:
        fb_out, fb_lse = attention_qkv(q, k, v, return_lse=True, **masks)
    assert not launches
    assert_parity(fb_out, _sdpa(q, k, v, bias), _sdpa(q.double(), k.double(), v.double(), bias.double()))
    torch.testing.assert_close(fb_out, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fb_lse, lse, atol=1e-5, rtol=1e-5)


def test_fully_padded_image_gives_zeros():
    """An image whose keys are all padding: its pooled rows are zero, lse +inf, and no gradient flows."""
    B, H, n_q, n_kv, d = 2, 2, 4, 17, 64
    q = torch.randn(B, H, n_q, d, device=DEVICE, requires_grad=True)
    k, v = (t.requires_grad_() for t in _keys(B, H, n_kv, d))
    kpm = _padding(B, n_kv)
    kpm[1] = True
    out, lse = attention_qkv(q, k, v, key_padding_mask=kpm, return_lse=True)
    assert (out[1] == 0).all() and (lse[1] == math.inf).all() and torch.isfinite(out[0]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert dq[0].abs().sum() > 0


def test_no_keys():
    """Zero keys: every query row is empty (zeros, lse +inf), and so is every gradient."""
    q = torch.randn(2, 2, 3, 16, device=DEVICE, requires_grad=True)
    k, v = (t.requires_grad_() for t in _keys(2, 2, 0, 16))
    with runtime.count_launches() as launches:
        out, lse = attention_qkv(q, k, v, return_lse=True)
        (dq,) = torch.autograd.grad(out, (q,), torch.randn_like(out))
    assert launches == {"attention": 1, "attention_bwd": 1}
    assert (out == 0).all() and (lse == math.inf).all() and (dq == 0).all()


def test_cross_attention_custom_ops():
    """Schemas, fake kernels and autograd registration with N_Q != N_KV."""
    B, H, n_q, n_kv, d = 2, 2, 4, 17, 16
    q = torch.randn(B, H, n_q, d, device=DEVICE, requires_grad=True)
    k, v = (t.requires_grad_() for t in _keys(B, H, n_kv, d))
    kpm = _padding(B, n_kv)
    torch.library.opcheck(torch.ops.vitfast.attention_fwd, (q, k, v, kpm, None, 0.25, True, True))
    with torch.no_grad():
        out, lse = torch.ops.vitfast.attention_fwd(q, k, v, kpm, None, 0.25, True, False)
    torch.library.opcheck(torch.ops.vitfast.attention_bwd,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, None, kpm, None,
                           0.25, True), test_utils=("test_schema", "test_faketensor"))


def test_short_query_compiles():
    """torch.compile (AOT autograd, as inductor traces) of the pooling head, forward and backward."""
    B, H, n_kv, d = 2, 2, 17, 16
    probe = torch.randn(1, H, 1, d, device=DEVICE, requires_grad=True)
    k, v = _keys(B, H, n_kv, d)
    kpm = _padding(B, n_kv)

    def pool(probe, k, v):
        return attention_qkv(probe.expand(B, -1, -1, -1), k, v, key_padding_mask=kpm)

    torch._dynamo.reset()
    compiled = torch.compile(pool, fullgraph=True, backend="aot_eager")
    out = compiled(probe, k, v)
    eager = pool(probe, k, v)
    torch.testing.assert_close(out, eager)
    (grad,) = torch.autograd.grad(out.sum(), probe)
    (eager_grad,) = torch.autograd.grad(eager.sum(), probe)
    torch.testing.assert_close(grad, eager_grad)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda q, k: attention_qkv(q, k[..., :8], k[..., :8]), ValueError,
         "k has shape (2, 3, 17, 8) but q has shape (2, 3, 4, 16); they must match in batch, heads and head size"),
        (lambda q, k: attention_qkv(q, k[:1], k[:1]), ValueError, "k has shape (1, 3, 17, 16)"),
        (lambda q, k: attention_qkv(q, k, k[:, :, :5]), ValueError,
         "v has shape (2, 3, 5, 16) but k has shape (2, 3, 17, 16); they must match"),
        (lambda q, k: attention_qkv(q, k, k, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError,
         "key_padding_mask must have shape (2, 17), got (2, 4)"),
        (lambda q, k: attention_qkv(q, k, k, attn_mask=torch.zeros(17, 4, dtype=torch.bool)), ValueError,
         "attn_mask must have shape (4, 17), (6, 4, 17) or one broadcasting to (2, 3, 4, 17), got (17, 4)"),
        (lambda q, k: attention_qkv(q, k, k, rope=torch.zeros(4, 32)), ValueError,
         "rope needs as many queries as keys (self-attention), got 4 queries and 17 keys"),
    ],
)
def test_cross_attention_bad_input(call, exc, words):
    q = torch.randn(2, 3, 4, 16)
    k = torch.randn(2, 3, 17, 16)
    with runtime.count_launches() as launches, pytest.raises(exc) as info:
        call(q, k)
    assert words in str(info.value)
    assert not launches


@pytest.mark.gpu
@pytest.mark.parametrize("n_kv", [197, 729])
def test_gpu_bf16_pooling_head(n_kv):
    B, H, d = 256, 16, 64
    probe = torch.randn(1, H, 1, d, device=DEVICE)
    k, v = _keys(B, H, n_kv, d)
    _check_grads(lambda p, k, v, _: attention_qkv(p.expand(B, -1, -1, -1), k, v),
                 lambda p, k, v, _: _sdpa(p.expand(B, -1, -1, -1), k, v), [probe, k, v], torch.bfloat16)
