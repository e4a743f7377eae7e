"""Dropout in the gated_linear epilogue (timm SwiGLU's ``drop1``), forward and backward: the kernels'
mask recovered from the seed the op drew, PyTorch's autograd through it as the three-way reference."""
import pytest
import torch
import torch.nn.functional as F

from vitfast import runtime
from vitfast.ops.gated_linear import gated_linear
from helpers import DEVICE, DTYPE_IDS, DTYPES, require_triton_path
from test_linear_dropout import ACT, _check, _check_dropped, _drop, _masks, _randn, _rng_state, _run


def _torch_gated(x, gate_weight, gate_bias, value_weight, value_bias, *, activation, mask=None, p=0.0):
    y = ACT[activation](F.linear(x, gate_weight, gate_bias)) * F.linear(x, value_weight, value_bias)
    return _drop(y, mask, p)


def _inputs(dtype, packed, bias=True):
    k, h = 47, 40
    x = _randn(17, k, dtype=dtype)
    if packed:  # timm GluMlp / SwiGLUPacked: one [2H, K] fc1, the halves passed as views
        w, b = _randn(2 * h, k, dtype=dtype, scale=k**-0.5), _randn(2 * h, dtype=dtype)
        t = dict(x=x, gate_weight=w[:h], gate_bias=b[:h] if bias else None, value_weight=w[h:],
                 value_bias=b[h:] if bias else None)
    else:
        t = dict(x=x, gate_weight=_randn(h, k, dtype=dtype, scale=k**-0.5), gate_bias=_randn(h, dtype=dtype),
                 value_weight=_randn(h, k, dtype=dtype, scale=k**-0.5), value_bias=None)
    return {k: None if v is None else v.requires_grad_() for k, v in t.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act, p, packed", [("silu", 0.1, False), ("gelu", 0.5, True), ("none", 0.5, False),
                                             ("gelu_tanh", 0.1, True)],
                         ids=["silu-p0.1", "gelu-p0.5-packed", "none-p0.5", "gelu_tanh-p0.1-packed"])
def test_gated_linear_dropout_matches_its_mask(dtype, act, p, packed):
    """Output and the gradients of x, both weights and both biases through the forward's mask."""
    require_triton_path()
    inputs = _inputs(dtype, packed)  # packed: _run's leaves stay views of the one [2H, K] weight
    (mask,) = _masks(9, [(17, 40)], [p])
    assert 0 < mask.sum() < mask.numel()
    _check(gated_linear, _torch_gated, inputs, 9, {"gated_linear": 1, "gated_linear_bwd": 1},
           dict(activation=act, dropout_p=p), dict(activation=act, mask=mask, p=p, out_shape=(17, 40)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_gated_linear_dropout_statistics(dtype, p):
    """x, both weights ones (K = 2), no activation: every product is 2 · 2 = 4, so the output is 0 or
    4 / (1 - p); the kept fraction is 1 - p within 4 standard errors over 1.1·10⁵ elements."""
    require_triton_path()
    x, w = torch.ones(1720, 2, device=DEVICE, dtype=dtype), torch.ones(64, 2, device=DEVICE, dtype=dtype)
    torch.manual_seed(13)
    with runtime.count_launches() as counts, runtime.poison_outputs():
        y = gated_linear(x, w, None, w, None, None, dropout_p=p)
    assert counts == {"gated_linear": 1}
    _check_dropped(y, 4.0, p)


def test_gated_linear_dropout_is_reproducible():
    require_triton_path()
    inputs = _inputs(torch.float16, packed=False)
    upstream = _randn(17, 40, dtype=torch.float16)
    runs = []
    for s in (1, 1, 2):
        torch.manual_seed(s)
        runs.append(_run(gated_linear, inputs, upstream, activation="silu", dropout_p=0.3))
    for a, b in zip(runs[0], runs[1], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0]) and not torch.equal(runs[0][1], runs[2][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gated_linear_zero_dropout_is_the_plain_op(dtype):
    require_triton_path()
    inputs = _inputs(dtype, packed=False)
    upstream = _randn(17, 40, dtype=dtype)
    plain = _run(gated_linear, inputs, upstream, activation="silu")
    state = _rng_state()
    zero = _run(gated_linear, inputs, upstream, activation="silu", dropout_p=0.0)
    assert torch.equal(_rng_state(), state)
    for a, b in zip(plain, zero, strict=True):
        assert torch.equal(a, b)


def test_gated_linear_dropout_of_one():
    """p = 1: the output and every gradient are zero, no NaN."""
    require_triton_path()
    inputs = _inputs(torch.float32, packed=False)
    outs = _run(gated_linear, inputs, _randn(17, 40), activation="silu", dropout_p=1.0)
    for t in outs:
        assert not t.isnan().any() and not t.any()


@pytest.mark.parametrize("bad", [-0.5, 2.0, "0.1", None])
def test_gated_linear_bad_dropout_p_is_named(bad):
    x, w = _randn(2, 8), _randn(4, 8)
    with pytest.raises(ValueError, match="dropout_p"):
        gated_linear(x, w, None, w, None, dropout_p=bad)


def test_gated_linear_fallback_drops():
    """float64 takes PyTorch: F.dropout (training) on the gated product."""
    x, w, v = (torch.randn(*s, dtype=torch.float64, device=DEVICE) for s in ((3, 8), (5, 8), (5, 8)))
    torch.manual_seed(4)
    runtime._warned.discard("gated_linear:float64")
    with pytest.warns(RuntimeWarning, match="float64"):
        y = gated_linear(x, w, None, v, None, dropout_p=0.4)
    torch.manual_seed(4)
    torch.testing.assert_close(y, F.dropout(F.silu(F.linear(x, w)) * F.linear(x, v), 0.4, training=True),
                               rtol=0, atol=0)
