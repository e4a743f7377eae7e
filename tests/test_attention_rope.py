"""Rotary position embedding inside the attention kernels against timm's own rotation.

The reference is timm's EvaAttention path: ``apply_rot_embed_cat`` on the tokens after the prefix,
then ``F.scaled_dot_product_attention``; vitfast rotates q and k as its kernels load them, forward
and backward, through both entries (packed ``attention`` and ``attention_qkv``).
"""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, RotaryEmbeddingMixed, apply_rot_embed_cat

from vitfast import runtime
from vitfast.ops.attention import attention, attention_qkv
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, require_triton_path
from test_attention_backward import _check_grads


def _timm_rotate(x, table, prefix, half):
    """timm's EvaAttention: rotate the tokens after ``prefix``, keep x's dtype."""
    rotated = apply_rot_embed_cat(x[:, :, prefix:], table, half=half)
    return torch.cat([x[:, :, :prefix], rotated], dim=2).type_as(x)


def _timm_attention(q, k, v, table, prefix, half, dtype, **sdpa_kwargs):
    """timm's rotation then SDPA on [B, H, N, d] tensors of ``dtype``; the table keeps its own dtype
    (timm's tables are fp32 whatever q is) except in the float64 reference."""
    if dtype == torch.float64:
        table = table.double()
    q, k = (_timm_rotate(t, table, prefix, half) for t in (q, k))
    return F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)


def _cat_table(d, shape, half):
    """timm's RotaryEmbeddingCat(d) table for a ``shape`` grid ([N, 2d], sin | cos) in the column layout
    ``half`` rotates: interleaved [f0, f0, f1, f1, ...] or half [f0, f1, ..., f0, f1, ...]. timm builds the
    half layout itself where RotaryEmbeddingCat takes ``rotate_half`` (1.0.31); where it does not (1.0.29,
    whose EVA hands its interleaved table to the half rotation), the half layout is the interleaved
    table's even columns twice, equal to what timm 1.0.31 builds."""
    if "rotate_half" in inspect.signature(RotaryEmbeddingCat).parameters:
        return RotaryEmbeddingCat(d, in_pixels=False, rotate_half=half).get_embed(shape=shape)
    table = RotaryEmbeddingCat(d, in_pixels=False).get_embed(shape=shape)
    return torch.cat([torch.cat([t[..., 0::2]] * 2, -1) for t in table.chunk(2, -1)], -1) if half else table


def _table(kind, B, H, rotated, d, half):
    """A [sin | cos] table for ``rotated`` tokens: timm's RotaryEmbeddingCat ([N, 2d]),
    RotaryEmbeddingMixed's per-head one ([H, N, 2d], detached), or one with an independent random
    angle per (token, column) laid out [B, 1, N, 2d], which no pairing symmetry can hide an error in."""
    if kind == "cat":
        return _cat_table(d, [1, rotated], half).to(DEVICE)
    if kind == "heads":
        return RotaryEmbeddingMixed(H * d, depth=1, num_heads=H).get_embed(shape=[1, rotated])[0].detach().to(DEVICE)
    if kind == "random":
        angle = torch.rand(B, 1, rotated, d, device=DEVICE) * 2 * math.pi
        return torch.cat([angle.sin(), angle.cos()], -1)
    raise AssertionError(kind)


def _split(qkv, heads):
    """[B, N, 3·H·d] -> q, k, v [B, H, N, d], as timm splits it."""
    B, N, _ = qkv.shape
    return qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


# (entry, B, H, rotated tokens, prefix, head size, half, table): every rotated count in {1, 17, 257}
# with 1 and 5 prefix tokens, head sizes 64 and 80, both layouts, the three table shapes, both entries.
CASES = [
    ("qkv", 2, 2, 1, 1, 64, False, "cat"),
    ("packed", 2, 2, 1, 5, 80, True, "heads"),
    ("qkv", 2, 2, 17, 5, 80, True, "cat"),
    ("packed", 2, 2, 17, 1, 64, False, "heads"),
    ("qkv", 2, 1, 17, 0, 80, False, "random"),
    ("packed", 1, 1, 257, 1, 64, False, "cat"),
    ("qkv", 1, 2, 257, 5, 80, True, "heads"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("entry, B, H, rotated, prefix, d, half, table", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_rope_matches_timm(dtype, entry, B, H, rotated, prefix, d, half, table):
    """Output, dq, dk and dv (or dqkv) within the three-way bound of timm's rotation + SDPA; the
    table stays fp32 while q is fp16, as timm's does."""
    N = prefix + rotated
    rope = _table(table, B, H, rotated, d, half)
    kw = dict(rope=rope, rope_prefix=prefix, rope_half=half)
    if entry == "packed":
        qkv = torch.randn(B, N, 3 * H * d, device=DEVICE)
        (dqkv,) = _check_grads(lambda x, _: attention(x, H, **kw),
                               lambda x, dt: _timm_attention(*_split(x, H), rope, prefix, half, dt)
                               .transpose(1, 2).flatten(2), [qkv], dtype)
        assert dqkv.shape == qkv.shape
    else:
        q, k, v = torch.randn(3, B, H, N, d, device=DEVICE).unbind(0)
        _check_grads(lambda q, k, v, _: attention_qkv(q, k, v, **kw),
                     lambda q, k, v, dt: _timm_attention(q, k, v, rope, prefix, half, dt), [q, k, v], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rope_table_in_half_precision(dtype):
    """A table in q's half-precision dtype: timm multiplies in it, the kernel in fp32."""
    B, H, prefix, rotated, d = 2, 2, 1, 16, 64
    rope = _table("cat", B, H, rotated, d, False).to(torch.float16)
    qkv = torch.randn(B, prefix + rotated, 3 * H * d, device=DEVICE)
    _check_grads(lambda x, _: attention(x, H, rope=rope, rope_prefix=prefix),
                 lambda x, dt: _timm_attention(*_split(x, H), rope, prefix, False, dt).transpose(1, 2).flatten(2),
                 [qkv], dtype)


def test_rope_with_masks_and_causal():
    """The rotation composes with a padding mask, an additive mask and causality."""
    B, H, prefix, rotated, d = 2, 2, 1, 40, 64
    N = prefix + rotated
    rope = _table("cat", B, H, rotated, d, True)
    kpm = torch.rand(B, N, device=DEVICE) < 0.3
    kpm[:, 0] = False
    bias = torch.randn(N, N, device=DEVICE)
    allowed = bias.masked_fill(kpm[:, None, None, :], -math.inf)
    q, k, v = torch.randn(3, B, H, N, d, device=DEVICE).unbind(0)
    _check_grads(lambda q, k, v, _: attention_qkv(q, k, v, key_padding_mask=kpm, attn_mask=bias, is_causal=True,
                                                  rope=rope, rope_prefix=prefix, rope_half=True),
                 lambda q, k, v, dt: _timm_attention(q, k, v, rope, prefix, True, dt, attn_mask=allowed.to(dt)
                                                     + torch.zeros(N, N, device=DEVICE, dtype=dt).masked_fill(
                                                         torch.ones(N, N, dtype=torch.bool, device=DEVICE).triu(1),
                                                         -math.inf)),
                 [q, k, v], torch.float32)


def test_rope_table_layouts():
    """The table is read through its strides: a per-head table broadcast with expand (head stride
    0), a slice of a wider buffer, and one whose last stride is not 1 (copied once)."""
    B, H, prefix, rotated, d = 2, 3, 1, 16, 64
    base = _table("cat", B, H, rotated, d, False)
    wide = torch.full((rotated, 4 * d), math.nan, device=DEVICE)
    wide[:, d:3 * d] = base
    layouts = {"expanded": base.expand(H, -1, -1), "sliced": wide[:, d:3 * d], "transposed": base.t().contiguous().t()}
    q, k, v = torch.randn(3, B, H, prefix + rotated, d, device=DEVICE).unbind(0)
    for name, rope in layouts.items():
        assert not rope.is_contiguous()
        _check_grads(lambda q, k, v, _, rope=rope: attention_qkv(q, k, v, rope=rope, rope_prefix=prefix),
                     lambda q, k, v, dt: _timm_attention(q, k, v, base, prefix, False, dt), [q, k, v], torch.float32,
                     what=name)


def test_rope_every_token_a_prefix():
    """rope_prefix = N: an empty table, nothing rotated, plain attention."""
    B, H, N, d = 2, 2, 5, 16
    q, k, v = torch.randn(3, B, H, N, d, device=DEVICE).unbind(0)
    _check_grads(lambda q, k, v, _: attention_qkv(q, k, v, rope=torch.empty(0, 2 * d, device=DEVICE), rope_prefix=N),
                 lambda q, k, v, _: F.scaled_dot_product_attention(q, k, v), [q, k, v], torch.float32)


def test_rope_fallback_matches_timm():
    """The PyTorch path (CPU without the interpreter) rotates with torch ops, in the promoted dtype."""
    B, H, prefix, rotated, d = 2, 2, 5, 17, 80
    rope = _table("heads", B, H, rotated, d, True)
    qkv = torch.randn(B, prefix + rotated, 3 * H * d, device=DEVICE, dtype=torch.float16)
    with runtime.fallback_only(), runtime.count_launches() as launches:
        out = attention(qkv, H, rope=rope, rope_prefix=prefix, rope_half=True)
    assert not launches
    ref = _timm_attention(*_split(qkv, H), rope, prefix, True, torch.float64).transpose(1, 2).flatten(2)
    pt = _timm_attention(*_split(qkv, H), rope, prefix, True, torch.float16).transpose(1, 2).flatten(2)
    assert_parity(out, pt, ref)


def test_learned_rope_falls_back_once(recwarn):
    """RotaryEmbeddingMixed learns its frequencies: a table that needs a gradient takes PyTorch's
    path (the kernels do not differentiate it), warned once, and the gradient reaches the frequencies."""
    B, H, prefix, rotated, d = 2, 2, 1, 16, 32
    mixed = RotaryEmbeddingMixed(H * d, depth=1, num_heads=H).to(DEVICE)
    runtime._warned.discard("attention:rope_grad")
    q, k, v = (torch.randn(B, H, prefix + rotated, d, device=DEVICE, requires_grad=True) for _ in range(3))
    for _ in range(2):
        table = mixed.get_embed(shape=[4, 4])[0]
        with runtime.count_launches() as launches:
            out = attention_qkv(q, k, v, rope=table, rope_prefix=prefix)
        assert not launches
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v, mixed.freqs), grad_out)
    assert len([w for w in recwarn if "rotary table" in str(w.message)]) == 1
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    freqs = mixed.freqs.detach().double().requires_grad_()
    mixed_ref = RotaryEmbeddingMixed(H * d, depth=1, num_heads=H).to(DEVICE).double()
    mixed_ref.freqs = torch.nn.Parameter(freqs)
    ref_out = _timm_attention(*ref_inputs, mixed_ref.get_embed(shape=[4, 4])[0], prefix, False, torch.float64)
    ref_grads = torch.autograd.grad(ref_out, (*ref_inputs, mixed_ref.freqs), grad_out.double())
    for got, want in zip((out, *grads), (ref_out, *ref_grads)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    assert grads[3].abs().sum() > 0


def test_rope_custom_ops_and_compile():
    """The custom ops' schemas, fakes and autograd take the rotary arguments, and torch.compile
    (AOT autograd, as inductor traces) runs the rotated attention whole, forward and backward."""
    B, H, prefix, rotated, d = 1, 2, 1, 16, 16
    rope = _table("cat", B, H, rotated, d, True)
    qkv = torch.randn(B, prefix + rotated, 3 * H * d, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.vitfast.attention_packed_fwd, (qkv, H, None, None, 0.25, True, rope, prefix, True))
    q, k, v = (t.detach().requires_grad_() for t in _split(qkv.detach(), H))
    torch.library.opcheck(torch.ops.vitfast.attention_fwd,
                          (q, k, v, None, None, 0.25, False, False, rope, prefix, True))
    with torch.no_grad():
        out, lse = torch.ops.vitfast.attention_packed_fwd(qkv, H, None, None, 0.25, True, rope, prefix, True)
    torch.library.opcheck(torch.ops.vitfast.attention_packed_bwd,
                          (torch.randn_like(out), qkv.detach(), H, out, lse, None, None, None, 0.25, True, rope,
                           prefix, True), test_utils=("test_schema", "test_faketensor"))

    def block(x):
        return attention(x, H, rope=rope, rope_prefix=prefix, rope_half=True)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    require_triton_path()
    with runtime.count_launches() as launches:
        got = compiled(qkv)
        (grad,) = torch.autograd.grad(got.sum(), qkv)
    assert launches == {"attention": 1, "attention_bwd": 1}
    want = block(qkv)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, torch.autograd.grad(want.sum(), qkv)[0])


def _bad(**kw):
    """A call on qkv [4, 17, 96] (2 heads of 16), one prefix token unless ``kw`` says otherwise."""
    return lambda qkv: attention(qkv, 2, **{"rope_prefix": 1, **kw})


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (_bad(rope=torch.zeros(16, 31)), ValueError, "rope must have shape (16, 32)"),
        (_bad(rope=torch.zeros(15, 32)), ValueError,
         "rope must have shape (16, 32) (tokens after rope_prefix = 17 - 1, 2 * head size for sin | cos)"),
        (_bad(rope=torch.zeros(17, 32)), ValueError, "got (17, 32)"),
        (_bad(rope=torch.zeros(17, 32), rope_prefix=0), None, None),
        (_bad(rope=torch.zeros(3, 16, 32)), ValueError, "optionally led by 2 heads or 1 and then 4 images or 1"),
        (_bad(rope=torch.zeros(3, 2, 16, 32)), ValueError, "got (3, 2, 16, 32)"),
        (_bad(rope=torch.zeros(1, 1, 1, 16, 32)), ValueError, "got (1, 1, 1, 16, 32)"),
        (_bad(rope=torch.zeros(17, 32), rope_prefix=-1), ValueError,
         "rope_prefix must be between 0 and the number of tokens (17), got -1"),
        (_bad(rope=torch.zeros(0, 32), rope_prefix=18), ValueError, "rope_prefix must be between 0 and"),
        (_bad(rope=torch.zeros(16, 32), rope_prefix=1.0), TypeError, "rope_prefix must be an integer, got 1.0"),
        (_bad(rope=torch.zeros(16, 32), rope_half="half"), TypeError, "rope_half must be a bool, got 'half'"),
        (_bad(rope=torch.zeros(16, 32, dtype=torch.int32)), TypeError, "rope must be float32"),
        (_bad(rope=[[0.0] * 32] * 16), TypeError, "rope must be a torch.Tensor, got list"),
        (_bad(rope=torch.zeros(16, 32, device="meta")), ValueError, "rope is on meta but q is on cpu"),
        (lambda qkv: attention(qkv[..., :90], 2, rope=torch.zeros(17, 30)), ValueError,
         "rope needs an even head size (it rotates pairs of columns), got head size 15"),
    ],
)
def test_rope_bad_input(call, exc, words):
    qkv = torch.randn(4, 17, 96)
    with runtime.count_launches() as launches:
        if exc is None:  # the table for all 17 tokens fits once rope_prefix says there is no prefix
            call(qkv)
            return
        with pytest.raises(exc) as info:
            call(qkv)
    assert words in str(info.value)
    assert not launches


@pytest.mark.gpu
@pytest.mark.parametrize("half", [False, True])
def test_gpu_bf16_eva02_shape(half):
    """EVA02-B: 12 heads of 64, 256 patch tokens rotated after CLS, fp32 table, bf16 activations."""
    B, H, prefix, rotated, d = 32, 12, 1, 256, 64
    rope = _cat_table(d, [16, 16], half).to(DEVICE)
    qkv = torch.randn(B, prefix + rotated, 3 * H * d, device=DEVICE)
    _check_grads(lambda x, _: attention(x, H, rope=rope, rope_prefix=prefix, rope_half=half),
                 lambda x, dt: _timm_attention(*_split(x, H), rope, prefix, half, dt).transpose(1, 2).flatten(2),
                 [qkv], torch.bfloat16)
