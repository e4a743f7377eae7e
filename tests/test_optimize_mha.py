"""vitfast.optimize on a bare nn.MultiheadAttention: self-attention with PyTorch's masks on the kernels,
everything else (weights, cross-attention, dropout, unbatched input) on PyTorch's own code."""
import copy
import re

import pytest
import torch
from torch import nn

import vitfast
from vitfast import runtime
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, math_attention, require_triton_path
from test_optimize import _randomize

B, N, WIDTH, HEADS = 3, 17, 64, 2  # head size 32


def _mha(batch_first=True, **kwargs):
    return _randomize(nn.MultiheadAttention(WIDTH, HEADS, batch_first=batch_first, **kwargs)).to(DEVICE).eval()


def _tokens(batch_first, dtype=torch.float32):
    return torch.randn(*((B, N) if batch_first else (N, B)), WIDTH, device=DEVICE, dtype=dtype)


def _open_rows(mask):
    """Each query keeps its own key, so no row is wholly masked (PyTorch gives NaN there, vitfast zeros)."""
    return mask & ~torch.eye(N, dtype=torch.bool, device=DEVICE)


def _masks(kind, dtype):
    """(key_padding_mask, attn_mask, is_causal) of each kind nn.MultiheadAttention takes."""
    pad = torch.zeros(B, N, dtype=torch.bool, device=DEVICE)
    pad[1, 11:] = pad[2, 5:9] = True
    causal = torch.ones(N, N, dtype=torch.bool, device=DEVICE).triu(1)

    def flt(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype)

    return {
        "none": (None, None, False),
        "kpm_bool": (pad, None, False),
        "kpm_float": (flt(B, N).masked_fill(pad, float("-inf")), None, False),
        "attn_bool_2d": (None, _open_rows(torch.rand(N, N, device=DEVICE) < 0.4), False),
        "attn_float_2d": (None, flt(N, N), False),
        "attn_bool_3d": (None, _open_rows(torch.rand(B * HEADS, N, N, device=DEVICE) < 0.4), False),
        "attn_float_3d": (None, flt(B * HEADS, N, N), False),
        "kpm_and_attn_bool": (pad, _open_rows(torch.rand(N, N, device=DEVICE) < 0.3), False),
        "kpm_and_attn_float": (flt(B, N), flt(B * HEADS, N, N), False),
        "causal_float": (None, nn.Transformer.generate_square_subsequent_mask(N, device=DEVICE, dtype=dtype), True),
        "causal_bool": (None, causal, True),
        "causal_with_kpm": (pad, causal, True),  # key 0 is never padded: every query keeps one key
    }[kind]


def _double(m):
    return m if m is None or m.dtype == torch.bool else m.double()


def _attend(mha, x, kpm, mask, causal):
    return mha(x, x, x, key_padding_mask=kpm, need_weights=False, attn_mask=mask, is_causal=causal)


MASK_KINDS = ["none", "kpm_bool", "kpm_float", "attn_bool_2d", "attn_float_2d", "attn_bool_3d", "attn_float_3d",
              "kpm_and_attn_bool", "kpm_and_attn_float", "causal_float", "causal_bool", "causal_with_kpm"]


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_mha_runs_fused_with_pytorchs_masks(kind, batch_first, dtype):
    require_triton_path()
    mha = _mha(batch_first)
    fast = vitfast.optimize(copy.deepcopy(mha).to(dtype))
    assert isinstance(fast, nn.MultiheadAttention) and fast.vitfast_report.counts() == {"MultiheadAttention": 1}
    x = _tokens(batch_first, dtype)
    kpm, mask, causal = _masks(kind, dtype)
    with torch.no_grad():
        ref, _ = _attend(copy.deepcopy(mha).double(), x.double(), _double(kpm), _double(mask), causal)
        pt, _ = _attend(copy.deepcopy(mha).to(dtype), x, kpm, mask, causal)
        with runtime.count_launches() as launches:
            out, weights = _attend(fast, x, kpm, mask, causal)
    assert launches == {"linear": 2, "attention": 1}, launches
    assert weights is None and out.shape == x.shape and out.is_contiguous() and out.dtype == dtype
    assert_parity(out, pt, ref)


@pytest.mark.parametrize("batch_first", [True, False], ids=["native_path", "sdpa_path"])
def test_mha_wrong_causal_hint_follows_pytorchs_path(batch_first):
    """is_causal with a mask that is not causal: PyTorch's native path applies the mask, its SDPA path
    the causal mask in its place; vitfast does what the path PyTorch takes does."""
    mha = _mha(batch_first)
    fast = vitfast.optimize(copy.deepcopy(mha))
    x = _tokens(batch_first)
    mask = _open_rows(torch.rand(N, N, device=DEVICE) < 0.4)
    with torch.no_grad():
        ref, _ = _attend(copy.deepcopy(mha).double(), x.double(), None, mask, True)
        pt, _ = _attend(mha, x, None, mask, True)
        with runtime.count_launches() as launches:
            out, _ = _attend(fast, x, None, mask, True)
        as_causal, _ = _attend(mha, x, None, torch.ones(N, N, dtype=torch.bool, device=DEVICE).triu(1), False)
    assert launches.get("attention") == 1
    assert_parity(out, pt, ref)
    assert torch.allclose(pt, as_causal, atol=1e-5) != batch_first  # the two paths do differ here


def _calls(fast, mha, x, **kwargs):
    """The same call on the optimized and the original module: outputs, and what vitfast launched."""
    with runtime.count_launches() as launches:
        out = fast(x, x, x, **kwargs)
    return out, mha(x, x, x, **kwargs), launches


def test_mha_runs_pytorch_for_what_it_does_not_fuse():
    mha = _mha()
    fast = vitfast.optimize(copy.deepcopy(mha))
    x = _tokens(True)
    with torch.no_grad():
        # need_weights=True, PyTorch's default: its own code computes the weights.
        (out, weights), (pt, pt_weights), launches = _calls(fast, mha, x)
        assert not launches and weights is not None
        torch.testing.assert_close(weights, pt_weights)
        torch.testing.assert_close(out, pt)
        # Cross-attention: key and value are not the query tensor, even with equal values.
        kv = x.clone()
        with runtime.count_launches() as launches:
            out, _ = fast(x, kv, kv, need_weights=False)
        assert not launches
        torch.testing.assert_close(out, mha(x, kv, kv, need_weights=False)[0])
        # Unbatched [N, D] tokens.
        (out, _), (pt, _), launches = _calls(fast, mha, x[0], need_weights=False)
        assert not launches and out.shape == (N, WIDTH)
        torch.testing.assert_close(out, pt)
        # A causal hint without its mask: PyTorch's own answer (here, its native path ignores it).
        (out, _), (pt, _), launches = _calls(fast, mha, x, need_weights=False, is_causal=True)
        assert not launches
        torch.testing.assert_close(out, pt)
        # Masks PyTorch refuses (a 4-D mask, an integer one, a float64 one with fp32 queries): its own error.
        for bad in ({"attn_mask": torch.zeros(1, 1, N, N, device=DEVICE)},
                    {"key_padding_mask": torch.zeros(B, N, dtype=torch.long, device=DEVICE)},
                    {"attn_mask": torch.zeros(N, N, dtype=torch.float64, device=DEVICE)}):
            with pytest.raises(Exception) as original:
                mha(x, x, x, need_weights=False, **bad)
            with runtime.count_launches() as launches, pytest.raises(original.type, match=re.escape(str(original.value))):
                fast(x, x, x, need_weights=False, **bad)
            assert not launches


def test_mha_dropout_while_training_drops_in_the_kernel_and_without_dropout_trains_fused():
    mha = _mha(dropout=1.0).train()  # p = 1: every probability drops, in PyTorch and in the kernel
    fast = vitfast.optimize(copy.deepcopy(mha))
    x = _tokens(True)
    with math_attention():  # CUDA's memory-efficient attention gives NaN at p = 1
        pt, _ = mha(x, x, x, need_weights=False)
    with runtime.count_launches() as launches:
        out, _ = fast(x, x, x, need_weights=False)
    assert launches.get("attention") == 1, launches
    torch.testing.assert_close(out, pt)
    fast.dropout = 0.25
    torch.manual_seed(1)
    first, _ = fast(x, x, x, need_weights=False)
    torch.manual_seed(1)
    assert torch.equal(first, fast(x, x, x, need_weights=False)[0]), "the same seed drops the same"

    # Without dropout, training runs the kernels forward and backward: three-way against float64.
    mha.dropout = fast.dropout = 0.0
    ref_mha = copy.deepcopy(mha).double()
    results = []
    for module, inputs in ((ref_mha, x.double()), (mha, x), (fast, x)):
        leaf = inputs.clone().requires_grad_()
        with runtime.count_launches() as launches:
            out, _ = module(leaf, leaf, leaf, need_weights=False)
            out.square().sum().backward()
        results.append((out, leaf.grad, *(p.grad for p in module.parameters())))
    assert launches.get("attention") == 1 and launches.get("attention_bwd") == 1, launches
    for fast_t, pt_t, ref_t in zip(*results[::-1]):
        assert_parity(fast_t, pt_t, ref_t)


def test_mha_keeps_its_state_dict_and_reports_what_it_leaves():
    model = nn.ModuleDict({
        "self": _mha(),
        "kv": nn.MultiheadAttention(WIDTH, HEADS, kdim=32, vdim=32),
        "bias_kv": nn.MultiheadAttention(WIDTH, HEADS, add_bias_kv=True),
        "heads12": nn.MultiheadAttention(36, 3),
    }).to(DEVICE)
    before = copy.deepcopy(model.state_dict())
    vitfast.optimize(model)
    assert isinstance(model["self"], vitfast.modules.MultiheadAttention)
    assert all(type(model[k]) is nn.MultiheadAttention for k in ("kv", "bias_kv", "heads12"))
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    reasons = {e.path: e.result for e in model.vitfast_report.skipped}
    assert "kdim/vdim" in reasons["kv"] and "add_bias_kv" in reasons["bias_kv"], reasons
    assert "head size 12" in reasons["heads12"], reasons


def test_mha_inside_a_fused_block_is_left_to_the_block():
    from torchvision.models.vision_transformer import EncoderBlock

    layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, dropout=0.0, batch_first=True)
    block = EncoderBlock(HEADS, WIDTH, 2 * WIDTH, 0.0, 0.0)
    model = _randomize(nn.Sequential(layer, block)).to(DEVICE).eval()
    fast = vitfast.optimize(copy.deepcopy(model))
    assert type(fast[0].self_attn) is nn.MultiheadAttention and type(fast[1].self_attention) is nn.MultiheadAttention
    assert fast.vitfast_report.counts().get("MultiheadAttention") is None, str(fast.vitfast_report)
    x = _tokens(True)
    with torch.no_grad(), runtime.count_launches() as launches:
        out = fast(x)
        pt = model(x)
    assert launches.get("attention") == 2 and launches.get("mlp") == 2, launches
    assert_parity(out, pt, copy.deepcopy(model).double()(x.double()))


def test_mha_inside_a_layer_vitfast_leaves_runs_fused():
    """An encoder layer with an activation the kernels lack stays PyTorch's; its attention is swapped,
    and the layer's own code calls it."""
    layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, dropout=0.0, activation=nn.functional.mish,
                                       batch_first=False)
    model = _randomize(layer).to(DEVICE).eval()
    fast = vitfast.optimize(copy.deepcopy(model))
    assert type(fast) is nn.TransformerEncoderLayer
    assert isinstance(fast.self_attn, vitfast.modules.MultiheadAttention)
    x = _tokens(False)
    kpm = torch.zeros(B, N, dtype=torch.bool, device=DEVICE)
    kpm[0, 13:] = True
    with torch.no_grad(), runtime.count_launches() as launches:
        out = fast(x, src_key_padding_mask=kpm)
        pt = model(x, src_key_padding_mask=kpm)
    assert launches.get("attention") == 1 and launches.get("linear") == 2, launches
    assert_parity(out, pt, copy.deepcopy(model).double()(x.double(), src_key_padding_mask=kpm))
