"""Dropout and stochastic depth's row factor in the linear / mlp epilogues, forward and backward.

The kernels' mask is recovered from the seed the op drew (``torch.manual_seed`` then ``draw_seed``
mirrors it) with ``keep_mask``; PyTorch's autograd through that mask, in float64 and in the test
dtype, is the three-way reference for the output and every gradient."""
import math

import pytest
import torch
import torch.nn.functional as F

from vitfast.kernels._random import GEMM, keep_mask
from vitfast import runtime
from vitfast.ops._random import draw_seed
from vitfast.ops.linear import linear, mlp
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, require_triton_path

ACT = {"none": lambda t: t, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
       "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t), "relu": F.relu, "silu": F.silu}


def _randn(*shape, dtype=torch.float32, scale=1.0):
    return torch.randn(*shape, device=DEVICE, dtype=dtype) * scale


def _masks(s, shapes, p):
    """The keep masks the op drew after ``torch.manual_seed(s)``, one per dropping launch in order:
    ``shapes`` are the [M, N] outputs, ``p`` their probabilities (0: that launch draws nothing)."""
    torch.manual_seed(s)
    return [keep_mask(draw_seed(DEVICE), 1, m, n, q, GEMM)[0] if q > 0 else None for (m, n), q in zip(shapes, p)]


def _drop(y, mask, p):
    """PyTorch's dropout through a given keep mask: kept elements times 1 / (1 - p)."""
    if mask is None:
        return y
    return torch.where(mask.view(y.shape), y * (1.0 / (1.0 - p) if p < 1 else 0.0), torch.zeros_like(y))


def _torch_linear(x, weight, bias=None, residual=None, scale=None, row_scale=None, *, activation="none",
                  mask=None, p=0.0):
    """residual + row_scale ⊙ scale ⊙ dropout(act(F.linear)) in PyTorch, through ``mask``."""
    y = _drop(ACT[activation](F.linear(x, weight, bias)), mask, p)
    if scale is not None:
        y = y * scale
    if row_scale is not None:
        y = y * row_scale.unsqueeze(-1)
    return y if residual is None else y + residual


def _torch_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual=None, scale=None, row_scale=None, *,
               activation="gelu", hidden_mask=None, hidden_p=0.0, mask=None, p=0.0):
    h = _torch_linear(x, fc1_weight, fc1_bias, activation=activation, mask=hidden_mask, p=hidden_p)
    return _torch_linear(h, fc2_weight, fc2_bias, residual, scale, row_scale, mask=mask, p=p)


def _run(fn, inputs, upstream, dtype=None, **kwargs):
    """fn's output and the gradients of sum(output · upstream) w.r.t. the inputs that require grad, each
    input first cast to ``dtype`` (None: kept)."""
    leaves = {k: None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)
              for k, t in inputs.items()}
    out = fn(**leaves, **kwargs)
    wrt = [t for t in leaves.values() if t is not None and t.requires_grad]
    return (out.detach(), *torch.autograd.grad(out, wrt, upstream.to(out.dtype)))


def _check(fn, torch_fn, inputs, s, launches, op_kwargs, ref_kwargs):
    """Three-way parity of the output and every gradient: vitfast after ``torch.manual_seed(s)``,
    PyTorch (test dtype and float64) through the masks that seed gives (in ``ref_kwargs``)."""
    x = inputs["x"]
    upstream = _randn(*ref_kwargs.pop("out_shape"), dtype=x.dtype)
    torch.manual_seed(s)  # last, so that the op's draw is the one _masks(s, ...) mirrors
    with runtime.count_launches() as counts, runtime.poison_outputs():
        out = _run(fn, inputs, upstream, **op_kwargs)
    assert counts == launches
    pt = _run(torch_fn, inputs, upstream, **ref_kwargs)
    ref = _run(torch_fn, inputs, upstream, torch.float64, **ref_kwargs)
    names = ["output"] + [f"grad of {k}" for k, t in inputs.items() if t is not None and t.requires_grad]
    for name, o, p, r in zip(names, out, pt, ref, strict=True):
        assert o.dtype == x.dtype or name == "grad of scale", name
        assert_parity(o, p, r, what=name)


def _linear_inputs(shape, n, dtype, bias=True, residual=True, scale=False, row_scale=None):
    k = shape[-1]
    t = dict(x=_randn(*shape, dtype=dtype), weight=_randn(n, k, dtype=dtype, scale=k**-0.5),
             bias=_randn(n, dtype=dtype) if bias else None,
             residual=_randn(*shape[:-1], n, dtype=dtype) if residual else None,
             scale=_randn(n, dtype=dtype) if scale else None,
             row_scale=None if row_scale is None else (torch.rand(*row_scale, device=DEVICE) + 0.5).to(dtype))
    return {k: None if v is None else v.requires_grad_(k != "row_scale") for k, v in t.items()}


# M = 17, N = 40, K = 47 ragged against the tiles; every activation; bias, residual, LayerScale on and off.
LINEAR_CASES = [
    ("none", 0.1, dict(bias=True, residual=True)),
    ("gelu", 0.5, dict(bias=True, residual=False)),
    ("gelu_tanh", 0.1, dict(bias=False, residual=True, scale=True)),
    ("quick_gelu", 0.5, dict(bias=True, residual=True, scale=True)),
    ("relu", 0.1, dict(bias=True, residual=False, scale=True)),
    ("silu", 0.5, dict(bias=False, residual=False)),
    ("none", 0.5, dict(bias=True, residual=True, scale=True)),
]
LINEAR_IDS = [f"{a}-p{p}-" + "-".join(k for k, v in kw.items() if v) for a, p, kw in LINEAR_CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act, p, kw", LINEAR_CASES, ids=LINEAR_IDS)
def test_linear_dropout_matches_its_mask(dtype, act, p, kw):
    """Output and the gradients of x, weight, bias, residual and scale through the mask the forward used."""
    require_triton_path()
    inputs = _linear_inputs((17, 47), 40, dtype, **kw)
    (mask,) = _masks(3, [(17, 40)], [p])
    assert 0 < mask.sum() < mask.numel()
    _check(linear, _torch_linear, inputs, 3, {"linear": 1, "linear_bwd": 1}, dict(activation=act, dropout_p=p),
           dict(activation=act, mask=mask, p=p, out_shape=(17, 40)))


ROW_CASES = [((3, 6, 47), (3, 1), 0.1), ((6, 3, 47), (1, 3), 0.5), ((3, 6, 47), (3, 1), 0.0)]
ROW_IDS = ["batch-first", "sequence-first", "no-dropout"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape, rows, p", ROW_CASES, ids=ROW_IDS)
def test_linear_row_scale(dtype, shape, rows, p):
    """Stochastic depth's per-sample factor ([B, 1] on [B, N, D], [1, B] on sequence-first [N, B, D])
    with LayerScale, residual and dropout: output and gradients."""
    require_triton_path()
    inputs = _linear_inputs(shape, 40, dtype, scale=True, row_scale=rows)
    inputs["row_scale"].view(-1)[0] = 0.0  # a dropped sample, as drop path draws them
    m = math.prod(shape[:-1])
    (mask,) = _masks(5, [(m, 40)], [p])
    _check(linear, _torch_linear, inputs, 5, {"linear": 1, "linear_bwd": 1}, dict(activation="gelu", dropout_p=p),
           dict(activation="gelu", mask=mask, p=p, out_shape=(*shape[:-1], 40)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("hidden_p, p, row_scale", [(0.1, 0.5, None), (0.5, 0.0, (2, 1)), (0.0, 0.1, (2, 1))],
                         ids=["both", "hidden-only", "output-only"])
def test_mlp_dropout_matches_its_masks(dtype, hidden_p, p, row_scale):
    """Both dropout sites (hidden first, then output), LayerScale, row factor and residual."""
    require_triton_path()
    x = _randn(2, 9, 47, dtype=dtype)
    inputs = dict(x=x, fc1_weight=_randn(72, 47, dtype=dtype, scale=47**-0.5), fc1_bias=_randn(72, dtype=dtype),
                  fc2_weight=_randn(40, 72, dtype=dtype, scale=72**-0.5), fc2_bias=_randn(40, dtype=dtype),
                  residual=_randn(2, 9, 40, dtype=dtype), scale=_randn(40, dtype=dtype),
                  row_scale=None if row_scale is None else torch.tensor([[1.25], [0.0]], device=DEVICE, dtype=dtype))
    inputs = {k: None if v is None else v.requires_grad_(k != "row_scale") for k, v in inputs.items()}
    hidden_mask, mask = _masks(7, [(18, 72), (18, 40)], [hidden_p, p])
    _check(mlp, _torch_mlp, inputs, 7, {"mlp": 1, "linear_bwd": 2},
           dict(activation="gelu", dropout_p=p, hidden_dropout_p=hidden_p),
           dict(activation="gelu", hidden_mask=hidden_mask, hidden_p=hidden_p, mask=mask, p=p, out_shape=(2, 9, 40)))


def _kept_fraction_ok(kept: torch.Tensor, p: float) -> None:
    n = kept.numel()
    assert n >= 10**5
    se = math.sqrt(p * (1 - p) / n)
    assert abs(kept.double().mean().item() - (1 - p)) <= 4 * se, (kept.double().mean().item(), 1 - p)


def _check_dropped(y: torch.Tensor, value: float, p: float) -> torch.Tensor:
    """Every element of ``y`` is 0 or exactly ``value / (1 - p)`` in y's dtype; returns the keep mask."""
    kept = y != 0
    expected = torch.tensor(value / (1 - p), dtype=torch.float32).to(y.dtype).item()
    assert torch.all(y[kept] == expected), y[kept].unique()
    _kept_fraction_ok(kept, p)
    return kept


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_linear_dropout_statistics(dtype, p):
    """x = ones, weight = ones: every pre-dropout value is K, so the output is 0 or K / (1 - p); the
    kept fraction is 1 - p within 4 standard errors over 1.1·10⁵ elements. (That the mask is
    ``keep_mask``'s, the tests above check through the gradients.)"""
    require_triton_path()
    x, w = torch.ones(4, 430, 4, device=DEVICE, dtype=dtype), torch.ones(64, 4, device=DEVICE, dtype=dtype)
    torch.manual_seed(11)
    with runtime.count_launches() as counts, runtime.poison_outputs():
        y = linear(x, w, dropout_p=p)
    assert counts == {"linear": 1}
    _check_dropped(y, 4.0, p)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mlp_hidden_dropout_statistics(dtype, p):
    """The hidden site seen through an identity fc2: fc1's output is 0 or K / (1 - p)."""
    require_triton_path()
    x = torch.ones(1720, 2, device=DEVICE, dtype=dtype)
    w1, w2 = torch.ones(64, 2, device=DEVICE, dtype=dtype), torch.eye(64, device=DEVICE, dtype=dtype)
    torch.manual_seed(12)
    with runtime.count_launches() as counts:
        y = mlp(x, w1, None, w2, None, "relu", hidden_dropout_p=p)
    assert counts == {"mlp": 1}
    _check_dropped(y, 2.0, p)


def test_linear_dropout_is_reproducible():
    """The same torch.manual_seed gives bit-identical outputs and gradients; another seed another mask."""
    require_triton_path()
    inputs = _linear_inputs((17, 47), 40, torch.float16, scale=True)
    upstream = _randn(17, 40, dtype=torch.float16)
    runs = []
    for s in (1, 1, 2):
        torch.manual_seed(s)
        runs.append(_run(linear, inputs, upstream, activation="gelu", dropout_p=0.3))
    for a, b in zip(runs[0], runs[1], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0]) and not torch.equal(runs[0][1], runs[2][1])


def test_mlp_dropout_is_reproducible():
    require_triton_path()
    x = _randn(2, 9, 47)
    args = (_randn(72, 47, scale=0.2), _randn(72), _randn(40, 72, scale=0.1), _randn(40))
    outs = []
    for s in (4, 4, 5):
        torch.manual_seed(s)
        outs.append(mlp(x, *args, dropout_p=0.2, hidden_dropout_p=0.2))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def _rng_state():
    return torch.cuda.get_rng_state() if DEVICE.type == "cuda" else torch.get_rng_state()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_zero_dropout_is_bitwise_the_plain_op_and_draws_nothing(dtype):
    require_triton_path()
    inputs = _linear_inputs((17, 47), 40, dtype, scale=True)
    upstream = _randn(17, 40, dtype=dtype)
    plain = _run(linear, inputs, upstream, activation="gelu")
    state = _rng_state()
    zero = _run(linear, inputs, upstream, activation="gelu", dropout_p=0.0)
    assert torch.equal(_rng_state(), state)
    for a, b in zip(plain, zero, strict=True):
        assert torch.equal(a, b)
    x, w1, w2 = inputs["x"].detach(), _randn(72, 47, dtype=dtype, scale=0.2), _randn(40, 72, dtype=dtype, scale=0.1)
    plain = mlp(x, w1, None, w2, None)
    state = _rng_state()
    assert torch.equal(mlp(x, w1, None, w2, None, dropout_p=0.0, hidden_dropout_p=0.0), plain)
    assert torch.equal(_rng_state(), state)


def test_dropout_draws_one_seed_per_dropping_launch():
    """The generator advances as the module order says: one draw per launch that drops."""
    require_triton_path()
    x, w = _randn(5, 8), _randn(8, 8)
    for call, draws in [(lambda: linear(x, w, dropout_p=0.2), 1), (lambda: mlp(x, w, None, w, None, dropout_p=0.2), 1),
                        (lambda: mlp(x, w, None, w, None, dropout_p=0.2, hidden_dropout_p=0.2), 2)]:
        torch.manual_seed(0)
        call()
        after = _rng_state()
        torch.manual_seed(0)
        for _ in range(draws):
            draw_seed(DEVICE)
        assert torch.equal(after, _rng_state())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf · 0
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_of_one_leaves_the_residual(dtype):
    """p = 1: the branch is zero (even where it is infinite), y == residual, gradients zero, no NaN."""
    require_triton_path()
    inputs = _linear_inputs((17, 47), 40, dtype, scale=True)
    inputs["bias"].data[0] = float("inf")
    with runtime.count_launches() as counts:
        out = _run(linear, inputs, _randn(17, 40, dtype=dtype), activation="relu", dropout_p=1.0)
    assert counts == {"linear": 1, "linear_bwd": 1}
    y, dx, dw, db, dr, ds = out
    assert torch.equal(y, inputs["residual"].detach())
    for g in (dx, dw, db, ds):
        assert not g.isnan().any() and not g.any()
    assert dr.abs().sum() > 0


def test_row_scale_that_needs_grad_takes_pytorch():
    require_triton_path()
    x, w = _randn(2, 5, 8), _randn(6, 8)
    rs = torch.tensor([[1.0], [0.5]], device=DEVICE, requires_grad=True)
    runtime._warned.discard("linear:row_scale_grad")
    with runtime.count_launches() as counts, pytest.warns(RuntimeWarning, match="row_scale"):
        y = linear(x, w, row_scale=rs)
    assert not counts
    (g,) = torch.autograd.grad(y.sum(), rs)
    torch.testing.assert_close(g, F.linear(x, w).sum((1, 2)).unsqueeze(-1))
    with torch.no_grad(), runtime.count_launches() as counts:
        linear(x, w, row_scale=rs)
    assert counts == {"linear": 1}


def test_fallback_drops_in_the_same_order():
    """float64 takes PyTorch: F.dropout (training), then the scale, the row factor and the residual."""
    x, w, b = (torch.randn(*s, dtype=torch.float64, device=DEVICE) for s in ((2, 5, 8), (6, 8), (6,)))
    r, s, rs = torch.randn(2, 5, 6, dtype=torch.float64, device=DEVICE), torch.randn(6, device=DEVICE), \
        torch.tensor([[2.0], [0.0]], device=DEVICE)
    torch.manual_seed(3)
    runtime._warned.discard("linear:float64")
    with pytest.warns(RuntimeWarning, match="float64"):
        y = linear(x, w, b, "gelu", r, s, dropout_p=0.4, row_scale=rs)
    torch.manual_seed(3)
    expected = F.dropout(F.gelu(F.linear(x, w, b)), 0.4, training=True) * s * rs.unsqueeze(-1) + r
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert torch.equal(linear(x, w, b, residual=r, dropout_p=1.0), r)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.1", None, True, float("nan")])
def test_bad_dropout_p_is_named(bad):
    x, w = _randn(2, 8), _randn(4, 8)
    with pytest.raises(ValueError, match="dropout_p"):
        linear(x, w, dropout_p=bad)
    with pytest.raises(ValueError, match="hidden_dropout_p"):
        mlp(x, w, None, _randn(4, 4), None, hidden_dropout_p=bad)


@pytest.mark.parametrize("bad, error", [
    (torch.ones(3, 1), ValueError), (torch.ones(2, 5, 2), ValueError), (torch.ones(2, 1, dtype=torch.int64), TypeError),
    ([1.0, 0.0], TypeError), (torch.ones(2, 1, device="meta"), ValueError),
], ids=["rows", "extra-dim", "int", "list", "device"])
def test_bad_row_scale_is_named(bad, error):
    x, w = _randn(2, 5, 8), _randn(4, 8)
    with pytest.raises(error, match="row_scale"):
        linear(x, w, row_scale=bad)
    with pytest.raises(error, match="row_scale"):
        mlp(x, w, None, _randn(4, 4), None, row_scale=bad)
