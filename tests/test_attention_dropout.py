"""Dropout on the attention probabilities inside the attention kernels, forward and backward.

The kernels draw their keep mask from Philox, keyed by one int64 seed the op draws from PyTorch's
generator per call. The tests re-draw that seed (``torch.manual_seed(s); draw_seed(DEVICE)``, what the
op did), recover the mask with ``keep_mask`` and hold the kernels to PyTorch's autograd of
``(softmax(scale · Q Kᵀ + masks) ⊙ M / (1 − p)) V``: if the forward or either backward kernel used
another mask (another orientation, another tile's coordinates), the output or a gradient misses the
bound. The statistics test reads the mask off the kernel's output, not off ``keep_mask``.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from vitfast import runtime
from vitfast.kernels._random import ATTENTION, keep_mask
from vitfast.ops._random import draw_seed
from vitfast.ops.attention import attention, attention_qkv
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, require_triton_path
from test_attention_rope import _table, _timm_rotate

KERNELS = {"attention": 1, "attention_bwd": 1}


def _mask_of(seed, B, H, n_q, n_kv, p):
    """The keep mask [B, H, N_Q, N_KV] of the call made right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return keep_mask(draw_seed(DEVICE), B * H, n_q, n_kv, p, ATTENTION).view(B, H, n_q, n_kv)


def _bias(B, n_q, n_kv, key_padding_mask=None, attn_mask=None, is_causal=False):
    """The masks as one additive float64 bias broadcasting to [B, H, N_Q, N_KV] (bool True = not allowed)."""
    bias = torch.zeros(B, 1, n_q, n_kv, dtype=torch.float64, device=DEVICE)
    if is_causal:
        bias = bias.masked_fill(torch.ones(n_q, n_kv, dtype=torch.bool, device=DEVICE).triu(1), -math.inf)
    if key_padding_mask is not None:
        bias = bias.masked_fill(key_padding_mask[:, None, None, :], -math.inf)
    if attn_mask is not None:
        bias = bias + attn_mask.double()
    return bias


def _dropped_attention(q, k, v, bias, keep, p, scale=None):
    """PyTorch in q's dtype: (softmax(scale · Q Kᵀ + bias) ⊙ M / (1 − p)) V and the undropped lse."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + bias.to(q.dtype)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs * keep / (1.0 - p), v), torch.logsumexp(scores.float(), dim=-1)


def _run(fn, inputs, dtype, seed, grad_outs=None):
    """``fn(*leaves)`` -> tuple of outputs, after ``torch.manual_seed(seed)``, and the gradients wrt the
    leaves (``inputs`` cast to ``dtype``) for upstream gradients ``grad_outs`` (fresh when None)."""
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    torch.manual_seed(seed)
    ys = fn(*xs)
    if grad_outs is None:
        grad_outs = [torch.randn(y.shape, device=DEVICE) for y in ys]
    grads = torch.autograd.grad(ys, xs, [g.to(y.dtype) for g, y in zip(grad_outs, ys)])
    return [y.detach() for y in ys], grads, grad_outs


def _check(fast, torch_fn, inputs, dtype, shape, p, seed=1234, what=""):
    """Three-way parity of every output and every gradient: vitfast's ``fast(*xs)`` on the kernels
    (exactly one forward and one backward launch), ``torch_fn(*xs, keep)`` in ``dtype`` and in float64
    with the mask the kernels drew. ``shape``: (B, H, N_Q, N_KV)."""
    require_triton_path()
    with runtime.count_launches() as counts:
        ys, grads, grad_outs = _run(fast, inputs, dtype, seed)
    assert counts == KERNELS, counts
    keep = _mask_of(seed, *shape, p)
    assert 0 < int(keep.sum()) < keep.numel() or keep.numel() < 8, "the mask drops nothing or everything"
    ys_pt, grads_pt, _ = _run(lambda *xs: torch_fn(*xs, keep), inputs, dtype, seed, grad_outs)
    ys_ref, grads_ref, _ = _run(lambda *xs: torch_fn(*xs, keep), inputs, torch.float64, seed, grad_outs)
    assert_parity(ys, ys_pt, ys_ref, what=f"{what} outputs")
    assert_parity(grads, grads_pt, grads_ref, what=f"{what} gradients")
    return ys, grads


def _split(qkv, H):
    B, N, _ = qkv.shape
    return qkv.reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _packed_ref(H, p, rope_kw=None, lse=False, **masks):
    def ref(qkv, keep):
        q, k, v = _split(qkv, H)
        if rope_kw:
            table = rope_kw["rope"].double() if qkv.dtype == torch.float64 else rope_kw["rope"]
            q, k = (_timm_rotate(t, table, rope_kw["rope_prefix"], rope_kw["rope_half"]) for t in (q, k))
        out, logsumexp = _dropped_attention(q, k, v, _bias(qkv.shape[0], q.shape[2], q.shape[2], **masks), keep, p)
        out = out.transpose(1, 2).flatten(2)
        return (out, logsumexp) if lse else (out,)
    return ref


# (B, H, N, d, masks): N = 1, 17, 65 (65 spans three interpreter tiles both ways), d = 16, 64, 80.
PACKED_CASES = [
    (1, 2, 1, 16, "none"), (2, 2, 17, 64, "none"), (1, 1, 65, 80, "none"),
    (2, 2, 17, 16, "kpm"), (1, 2, 33, 64, "additive"), (2, 1, 65, 16, "causal"),
]


def _masks(kind, B, N, dtype):
    if kind == "kpm":  # padded keys, never every key of an image: no empty row for the reference's softmax
        kpm = torch.rand(B, N, device=DEVICE) < 0.3
        kpm[:, 0] = False
        return dict(key_padding_mask=kpm)
    if kind == "additive":
        return dict(attn_mask=torch.randn(N, N, device=DEVICE, dtype=dtype))
    if kind == "causal":
        return dict(is_causal=True)
    return {}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B, H, N, d, kind", PACKED_CASES, ids=["-".join(map(str, c)) for c in PACKED_CASES])
def test_packed_dropout_matches_autograd(dtype, B, H, N, d, kind):
    p = 0.3
    masks = _masks(kind, B, N, dtype)
    qkv = torch.randn(B, N, 3 * H * d, device=DEVICE)
    _check(lambda x: (attention(x, H, dropout_p=p, **masks),), _packed_ref(H, p, **masks), [qkv], dtype,
           (B, H, N, N), p, what=kind)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n_q, causal", [(1, False), (4, True), (33, False)])
def test_qkv_dropout_matches_autograd(dtype, n_q, causal):
    """attention_qkv with N_Q != N_KV (attention pooling's 1 and 4 queries over 33 keys), causal top-left."""
    B, H, n_kv, d, p = 2, 2, 33, 64, 0.4
    q = torch.randn(B, H, n_q, d, device=DEVICE)
    k, v = torch.randn(2, B, H, n_kv, d, device=DEVICE).unbind(0)

    def ref(q, k, v, keep):
        return (_dropped_attention(q, k, v, _bias(B, n_q, n_kv, is_causal=causal), keep, p)[0],)

    _check(lambda *x: (attention_qkv(*x, is_causal=causal, dropout_p=p),), ref, [q, k, v], dtype,
           (B, H, n_q, n_kv), p)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("prefix, d, half", [(1, 64, False), (0, 80, True)])
def test_rope_dropout_matches_timm_rotation(dtype, prefix, d, half):
    """The kernels rotate q and k as they load them and drop: reference timm's apply_rot_embed_cat."""
    B, H, N, p = 2, 2, 17, 0.2
    rope_kw = dict(rope=_table("random", B, H, N - prefix, d, half), rope_prefix=prefix, rope_half=half)
    qkv = torch.randn(B, N, 3 * H * d, device=DEVICE)
    _check(lambda x: (attention(x, H, dropout_p=p, **rope_kw),), _packed_ref(H, p, rope_kw), [qkv], dtype,
           (B, H, N, N), p)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_return_lse_is_undropped(dtype):
    """The log-sum-exp is the undropped one (bitwise the no-dropout call's), and its gradient joins
    the output's through the backward kernels."""
    B, H, N, d, p = 2, 2, 17, 16, 0.5
    qkv = torch.randn(B, N, 3 * H * d, device=DEVICE)
    (_, lse), _ = _check(lambda x: attention(x, H, return_lse=True, dropout_p=p),
                         _packed_ref(H, p, lse=True), [qkv], dtype, (B, H, N, N), p)
    _, undropped = attention(qkv.to(dtype), H, return_lse=True)
    assert torch.equal(lse, undropped)


def test_kept_fraction_and_scale_from_the_output():
    """q = k = 0 makes P uniform (1/N_KV) and v = 1 makes O[b, h, i, :] = keep_scale · kept_i / N_KV:
    the kept count of each row read off the output is an integer only if the kept probabilities are
    scaled by exactly 1/(1 − p), and over 2·4·128·128 = 131072 probabilities its mean fraction lies
    within 4 standard errors of 1 − p. The counts also match the mask ``keep_mask`` recovers."""
    require_triton_path()
    B, H, N, d = 2, 4, 128, 16
    q = torch.zeros(B, H, N, d, device=DEVICE)
    v = torch.ones(B, H, N, d, device=DEVICE)
    for p in (0.1, 0.5):
        torch.manual_seed(3)
        out = attention_qkv(q, q, v, dropout_p=p)
        counts = out * N * (1.0 - p)
        assert (counts - counts[..., :1]).abs().max() == 0  # every column of a row carries the same count
        counts = counts[..., 0]
        assert (counts - counts.round()).abs().max() < 1e-3, "kept values are not scaled by 1/(1 - p)"
        n = counts.numel() * N
        kept = counts.round().sum().item() / n
        assert abs(kept - (1.0 - p)) < 4 * math.sqrt(p * (1.0 - p) / n), (p, kept)
        if p == 0.5:  # the mask a kernel applies, recovered from the seed (slow in the interpreter: once)
            assert torch.equal(counts.round(), _mask_of(3, B, H, N, N, p).sum(-1).to(counts.dtype))


def _forward_backward(entry, xs, seed, p):
    torch.manual_seed(seed)
    xs = [x.detach().requires_grad_() for x in xs]
    y = attention(xs[0], 2, dropout_p=p) if entry == "packed" else attention_qkv(*xs, dropout_p=p)
    grads = torch.autograd.grad(y, xs, torch.ones_like(y))
    return y.detach(), grads


def _inputs(entry, dtype=torch.float32):
    if entry == "packed":
        return [torch.randn(2, 17, 3 * 2 * 16, device=DEVICE, dtype=dtype)]
    return list(torch.randn(3, 2, 2, 17, 16, device=DEVICE, dtype=dtype).unbind(0))


@pytest.mark.parametrize("entry", ["packed", "qkv"])
def test_same_seed_same_bits_other_seed_other_mask(entry):
    xs = _inputs(entry)
    y, grads = _forward_backward(entry, xs, 11, 0.3)
    y_again, grads_again = _forward_backward(entry, xs, 11, 0.3)
    assert torch.equal(y, y_again) and all(torch.equal(a, b) for a, b in zip(grads, grads_again))
    y_other, grads_other = _forward_backward(entry, xs, 12, 0.3)
    assert not torch.equal(y, y_other) and not any(torch.equal(a, b) for a, b in zip(grads, grads_other))
    # A second call without re-seeding draws a fresh mask too.
    torch.manual_seed(11)
    first = attention_qkv(*_inputs("qkv"), dropout_p=0.3)
    assert not torch.equal(first, attention_qkv(*_inputs("qkv"), dropout_p=0.3))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("entry", ["packed", "qkv"])
def test_p_one_gives_zeros(entry, dtype):
    require_triton_path()
    with runtime.count_launches() as counts:
        y, grads = _forward_backward(entry, _inputs(entry, dtype), 5, 1.0)
    assert counts == KERNELS, counts
    assert (y == 0).all() and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("entry", ["packed", "qkv"])
def test_p_zero_is_the_call_without_dropout(entry):
    """Bitwise the call without ``dropout_p``, forward and backward, and PyTorch's generator untouched."""
    xs = [x.requires_grad_() for x in _inputs(entry)]
    fn = (lambda **kw: attention(xs[0], 2, **kw)) if entry == "packed" else (lambda **kw: attention_qkv(*xs, **kw))
    y = fn()
    grads = torch.autograd.grad(y, xs, torch.ones_like(y))
    state = torch.get_rng_state()
    y0 = fn(dropout_p=0.0)
    grads0 = torch.autograd.grad(y0, xs, torch.ones_like(y0))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(y, y0) and all(torch.equal(a, b) for a, b in zip(grads, grads0))


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.1", True, float("nan")])
def test_bad_dropout_p_names_the_argument(bad):
    qkv = torch.randn(1, 4, 3 * 16, device=DEVICE)
    with pytest.raises(ValueError, match="dropout_p"):
        attention(qkv, 1, dropout_p=bad)
    with pytest.raises(ValueError, match="dropout_p"):
        attention_qkv(*_split(qkv, 1), dropout_p=bad)


def test_fallback_drops_with_sdpa():
    """float64 takes PyTorch: SDPA's own dropout; an image whose keys are all padded gives zeros, not
    NaN, and p = 1 zeros everything."""
    B, H, N, d = 2, 2, 17, 24  # head size 24 is not tiled either
    qkv = torch.randn(B, N, 3 * H * d, device=DEVICE, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(B, N, dtype=torch.bool, device=DEVICE)
    kpm[1] = True
    with warnings.catch_warnings(), runtime.count_launches() as counts:
        warnings.simplefilter("ignore")  # the fallback's one warning per configuration
        y = attention(qkv, H, key_padding_mask=kpm, dropout_p=0.5)
    assert counts == {}
    y.sum().backward()
    assert not y.isnan().any() and not qkv.grad.isnan().any() and (y[1] == 0).all()
    undropped = attention(qkv, H, key_padding_mask=kpm)
    assert not torch.allclose(y[0], undropped[0])
    assert (attention(qkv, H, dropout_p=1.0) == 0).all()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_runs_the_dropping_kernels(backend):
    """Under torch.compile a dropping call gives what the eager call gives under the same seed."""
    xs = _inputs("qkv")
    fn = torch.compile(lambda q, k, v: attention_qkv(q, k, v, dropout_p=0.25), backend=backend, fullgraph=False)
    torch.manual_seed(4)
    eager = attention_qkv(*xs, dropout_p=0.25)
    torch.manual_seed(4)
    compiled = fn(*xs)
    assert compiled.shape == xs[0].shape
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    leaves = [x.detach().requires_grad_() for x in xs]
    fn(*leaves).sum().backward()
    assert all(x.grad is not None and not x.grad.isnan().any() for x in leaves)
    assert not torch.allclose(F.scaled_dot_product_attention(*xs), eager)
