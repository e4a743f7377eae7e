"""The per-output-column scale in the linear epilogue (timm's LayerScale), forward and backward:
``scale * act(x @ weight.T + bias) + residual`` against PyTorch's composite, three ways."""
import pytest
import torch

from vitfast import runtime
from vitfast.ops.linear import linear, mlp
from helpers import DTYPE_IDS, DTYPES, assert_parity, layouts, require_triton_path
from test_linear_backward import ACT, _check, _layer, _randn


def _torch_linear(x, weight, bias=None, activation=None, residual=None, scale=None):
    """PyTorch's composite; a scale of another dtype leaves the output in x's dtype, as vitfast does."""
    y = ACT[activation](torch.nn.functional.linear(x, weight, bias))
    if scale is not None:
        y = (y * scale).to(y.dtype)
    return y if residual is None else y + residual


def _torch_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, residual=None, scale=None):
    return _torch_linear(_torch_linear(x, fc1_weight, fc1_bias, activation), fc2_weight, fc2_bias, None, residual,
                         scale)


def _d(t):
    return None if t is None else t.double()


# M = 17, K = 100, N = 96 ragged against the tiles; every activation, bias and residual on and off.
CASES = [("gelu", True, True), ("none", False, True), ("relu", True, False), ("gelu_tanh", False, False)]
CASE_IDS = [f"{act}{'-bias' if b else ''}{'-residual' if r else ''}" for act, b, r in CASES]


def _inputs(dtype, bias, residual, scale_dtype=None, grad=("x", "weight", "bias", "residual", "scale")):
    t = dict(x=_randn(17, 100, dtype=dtype), **_layer(100, 96, dtype, bias),
             residual=_randn(17, 96, dtype=dtype) if residual else None,
             scale=_randn(96, dtype=scale_dtype or dtype))
    return {k: None if v is None else v.requires_grad_(k in grad) for k, v in t.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act, bias, residual", CASES, ids=CASE_IDS)
def test_linear_scale_forward(dtype, act, bias, residual):
    """Contiguous, sliced and stride-0 scales, read through their strides."""
    require_triton_path()
    inputs = {k: None if v is None else v.detach() for k, v in _inputs(dtype, bias, residual).items()}
    for name, scale in layouts(inputs["scale"]):
        args = {**inputs, "scale": scale}
        with runtime.count_launches() as counts:
            out = linear(**args, activation=act)
        assert counts == {"linear": 1}
        assert out.dtype == dtype
        assert_parity(out, _torch_linear(**args, activation=act),
                      _torch_linear(**{k: _d(v) for k, v in args.items()}, activation=act), what=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act, bias, residual", CASES, ids=CASE_IDS)
def test_linear_scale_backward(dtype, act, bias, residual):
    """Gradients of x, weight, bias, residual and the scale (contiguous, sliced and stride-0 leaves)."""
    require_triton_path()
    inputs = _inputs(dtype, bias, residual)
    for _, scale in layouts(inputs["scale"]):
        _check(linear, _torch_linear, {**inputs, "scale": scale}, (17, 96), {"linear": 1, "linear_bwd": 1},
               activation=act)


@pytest.mark.parametrize("act, grad", [("none", ("scale",)), ("gelu", ("scale",)), ("none", ("x", "weight")),
                                       ("gelu", ("residual",))],
                         ids=["none-scale", "gelu-scale", "none-x-weight", "gelu-residual"])
def test_linear_scale_backward_some_inputs_need_grad(act, grad):
    """The scale alone needs the stored pre-activation even without an activation; dR = dY needs no
    backward kernel at all."""
    inputs = _inputs(torch.float16, True, True, grad=grad)
    launches = {"linear": 1} if grad == ("residual",) else {"linear": 1, "linear_bwd": 1}
    _check(linear, _torch_linear, inputs, (17, 96), launches, activation=act)


def test_linear_scale_of_another_dtype():
    """An fp32 scale on fp16 activations: applied in fp32, its gradient fp32, the output fp16."""
    inputs = _inputs(torch.float16, True, True, scale_dtype=torch.float32)
    _check(linear, _torch_linear, inputs, (17, 96), {"linear": 1, "linear_bwd": 1}, activation="gelu")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_mlp_scale_forward_and_backward(dtype):
    """mlp's scale multiplies fc2's output after its bias, before the residual."""
    require_triton_path()
    inputs = dict(x=_randn(2, 17, 100, dtype=dtype), **_layer(100, 96, dtype, prefix="fc1_"),
                  **_layer(96, 100, dtype, prefix="fc2_"), residual=_randn(2, 17, 100, dtype=dtype),
                  scale=_randn(100, dtype=dtype))
    with runtime.count_launches() as counts:
        out = mlp(**inputs, activation="gelu")
    assert counts == {"mlp": 1}
    assert_parity(out, _torch_mlp(**inputs, activation="gelu"),
                  _torch_mlp(**{k: _d(v) for k, v in inputs.items()}, activation="gelu"))
    for t in inputs.values():
        t.requires_grad_()
    _check(mlp, _torch_mlp, inputs, (2, 17, 100), {"mlp": 1, "linear_bwd": 2}, activation="gelu")


def test_linear_scale_op_registrations():
    """Schema, fake (meta) kernels and autograd registration with the scale, forward and backward."""
    x, r = _randn(5, 40).requires_grad_(), _randn(5, 24)
    layer = _layer(40, 24, torch.float32)
    w, b = layer["weight"].requires_grad_(), layer["bias"].requires_grad_()
    s = _randn(48)[::2].requires_grad_()
    for act in ("gelu", "none"):
        torch.library.opcheck(torch.ops.vitfast.linear_fwd.default, (x, w, b, r, act, True, s),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))
    z, dy = _randn(5, 24), _randn(5, 24)
    for args in ((dy, x, w, z, "gelu", True, True, True, s.detach(), True),
                 (dy, None, w, z, "none", True, False, False, s.detach(), True),
                 (dy, None, None, z, "relu", False, False, False, None, True)):
        torch.library.opcheck(torch.ops.vitfast.linear_bwd.default, args, test_utils=("test_schema", "test_faketensor"))
