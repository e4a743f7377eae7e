"""QuickGELU (``x * sigmoid(1.702 * x)``, OpenAI CLIP's activation) in the linear / mlp epilogues,
forward and backward, three ways against timm's QuickGELU module."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp as TimmMlp
from timm.layers.activations import QuickGELU as TimmQuickGELU

from vitfast import runtime
from vitfast.modules.mlp import Mlp, activation_name
from vitfast.ops.linear import linear, mlp
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, require_triton_path
from test_linear_backward import _check, _layer, _randn

_QUICK_GELU = TimmQuickGELU()


def _torch_linear(x, weight, bias=None, activation="quick_gelu", residual=None, scale=None):
    """PyTorch's composite with timm's QuickGELU; a scale multiplies after the activation."""
    y = F.linear(x, weight, bias)
    if activation == "quick_gelu":
        y = _QUICK_GELU(y)
    if scale is not None:
        y = y * scale
    return y if residual is None else y + residual


def _torch_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, residual=None):
    return _torch_linear(_torch_linear(x, fc1_weight, fc1_bias, activation), fc2_weight, fc2_bias, None, residual)


def _d(t):
    return None if t is None else t.double()


# Ragged against the tiles: M = 17 and 2·9, K = 40 and 24, N = 72 and 40; bias and residual on and off.
LINEAR_CASES = [((17, 40), 72, True, True), ((2, 9, 24), 40, False, False)]
LINEAR_IDS = ["17x40-bias-residual", "2x9x24-plain"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape, n, bias, residual", LINEAR_CASES, ids=LINEAR_IDS)
def test_linear_quick_gelu_forward(dtype, shape, n, bias, residual):
    require_triton_path()
    x, layer = _randn(*shape, dtype=dtype), _layer(shape[-1], n, dtype, bias)
    r = _randn(*shape[:-1], n, dtype=dtype) if residual else None
    with runtime.count_launches() as counts:
        out = linear(x, layer["weight"], layer["bias"], activation="quick_gelu", residual=r)
    assert counts == {"linear": 1} and out.dtype == dtype
    assert_parity(out, _torch_linear(x, layer["weight"], layer["bias"], residual=r),
                  _torch_linear(_d(x), _d(layer["weight"]), _d(layer["bias"]), residual=_d(r)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape, n, bias, residual", LINEAR_CASES, ids=LINEAR_IDS)
def test_linear_quick_gelu_backward(dtype, shape, n, bias, residual):
    """dx, dweight, dbias, dresidual and the LayerScale's dscale."""
    require_triton_path()
    inputs = dict(x=_randn(*shape, dtype=dtype), **_layer(shape[-1], n, dtype, bias),
                  residual=_randn(*shape[:-1], n, dtype=dtype) if residual else None, scale=_randn(n, dtype=dtype))
    inputs = {k: None if v is None else v.requires_grad_() for k, v in inputs.items()}
    _check(linear, _torch_linear, inputs, (*shape[:-1], n), {"linear": 1, "linear_bwd": 1}, activation="quick_gelu")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_mlp_quick_gelu_forward_and_backward(dtype, residual):
    require_triton_path()
    inputs = dict(x=_randn(2, 9, 40, dtype=dtype), **_layer(40, 72, dtype, prefix="fc1_"),
                  **_layer(72, 40, dtype, prefix="fc2_"), residual=_randn(2, 9, 40, dtype=dtype) if residual else None)
    args = {k: v for k, v in inputs.items() if k != "residual"}
    with runtime.count_launches() as counts:
        out = mlp(**args, activation="quick_gelu", residual=inputs["residual"])
    assert counts == {"mlp": 1}
    assert_parity(out, _torch_mlp(**inputs, activation="quick_gelu"),
                  _torch_mlp(**{k: _d(v) for k, v in inputs.items()}, activation="quick_gelu"))
    inputs = {k: None if v is None else v.requires_grad_() for k, v in inputs.items()}
    _check(mlp, _torch_mlp, inputs, (2, 9, 40), {"mlp": 1, "linear_bwd": 2}, activation="quick_gelu")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_linear_quick_gelu_large_inputs(dtype):
    """Pre-activations up to ±60 (an identity weight passes x through exactly): no NaN or inf, the
    output tends to 0 and z, its derivative to 0 and 1."""
    require_triton_path()
    z = torch.tensor([-60.0, -52.0, -47.0, -20.0, -1.0, 0.0, 1.0, 20.0, 47.0, 52.0, 60.0], device=DEVICE)
    x = z.to(dtype).repeat(3, 1).requires_grad_()
    w = torch.eye(z.numel(), device=DEVICE, dtype=dtype).requires_grad_()
    out = linear(x, w, activation="quick_gelu")
    (dx,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(out).all() and torch.isfinite(dx).all()
    big = z.abs() >= 20
    torch.testing.assert_close(out[:, big].float(), torch.where(z[big] > 0, z[big], 0.0).expand(3, -1))
    torch.testing.assert_close(dx[:, big].float(), (z[big] > 0).float().expand(3, -1))
    pt, ref = (_torch_linear(x.detach().to(t), w.detach().to(t)) for t in (dtype, torch.float64))
    assert_parity(out, pt, ref)


def test_linear_quick_gelu_float64_takes_pytorch():
    """float64 runs PyTorch's composite (one warning, no kernel), forward and backward."""
    x, w, b = (_randn(*shape, dtype=torch.float64).requires_grad_() for shape in ((17, 40), (24, 40), (24,)))
    runtime._warned.discard("linear:float64")
    with runtime.count_launches() as counts, pytest.warns(RuntimeWarning, match="float64"):
        out = linear(x, w, b, activation="quick_gelu")
    assert not counts
    ref = _torch_linear(x, w, b)
    torch.testing.assert_close(out, ref)
    upstream = _randn(17, 24, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(out, (x, w, b), upstream),
                               torch.autograd.grad(ref, (x, w, b), upstream))


def test_activation_name_maps_quick_gelu():
    from open_clip.transformer import QuickGELU as OpenClipQuickGELU
    from transformers.activations import ACT2FN, QuickGELUActivation

    for act in (TimmQuickGELU(), OpenClipQuickGELU(), QuickGELUActivation(), ACT2FN["quick_gelu"], "quick_gelu"):
        assert activation_name(act) == "quick_gelu", act


def test_mlp_module_with_timm_quick_gelu_is_fused():
    """vitfast's Mlp with timm's QuickGELU runs the fused launch and matches timm's Mlp."""
    require_triton_path()
    ours = Mlp(40, 72, act_layer=TimmQuickGELU).to(DEVICE).eval()
    ref = TimmMlp(40, 72, act_layer=TimmQuickGELU).to(DEVICE).eval()
    ref.load_state_dict(ours.state_dict())
    x = _randn(2, 9, 40)
    with torch.no_grad(), runtime.count_launches() as counts:
        out = ours(x, residual=x)
    assert counts == {"mlp": 1}
    with torch.no_grad():
        assert_parity(out, ref(x) + x, ref.double()(x.double()) + x.double())
