"""linear / mlp backward on the kernels: every gradient against PyTorch's own autograd, three ways."""
import copy
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp as TimmMlp
from torch import nn

from vitfast import runtime
from vitfast.modules.mlp import Mlp
from vitfast.ops.linear import linear, mlp
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, layouts, require_triton_path

ACT = {None: lambda t: t, "none": lambda t: t, "gelu": F.gelu, "relu": F.relu,
       "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "silu": F.silu}


def _torch_linear(x, weight, bias=None, activation=None, residual=None):
    """PyTorch's own composite: F.linear, the activation, the residual add."""
    y = ACT[activation](F.linear(x, weight, bias))
    return y if residual is None else y + residual


def _torch_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, residual=None):
    return _torch_linear(_torch_linear(x, fc1_weight, fc1_bias, activation), fc2_weight, fc2_bias, None, residual)


def _randn(*shape, dtype=torch.float32, scale=1.0):
    return torch.randn(*shape, device=DEVICE, dtype=dtype) * scale


def _layer(k, n, dtype, bias=True, prefix=""):
    """Weight scaled like nn.Linear's init so pre-activations straddle zero in every dtype."""
    return {f"{prefix}weight": _randn(n, k, dtype=dtype, scale=k**-0.5),
            f"{prefix}bias": _randn(n, dtype=dtype) if bias else None}


def _grads(fn, inputs, upstream, dtype=None, **kwargs):
    """Gradients of sum(fn(**inputs) · upstream) w.r.t. the inputs that require grad, in the order of
    ``inputs``, each input first cast to ``dtype`` (None: kept)."""
    leaves = {k: None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)
              for k, t in inputs.items()}
    out = fn(**leaves, **kwargs)
    wrt = [t for t in leaves.values() if t is not None and t.requires_grad]
    return torch.autograd.grad(out, wrt, upstream.to(out.dtype))


def _check(fn, torch_fn, inputs, out_shape, launches, **kwargs):
    """Three-way parity of every gradient, the same fresh upstream gradient for all three runs."""
    upstream = _randn(*out_shape, dtype=next(iter(inputs.values())).dtype)
    with runtime.count_launches() as counts, runtime.poison_outputs():
        out = _grads(fn, inputs, upstream, **kwargs)
    assert counts == launches
    pt = _grads(torch_fn, inputs, upstream, **kwargs)
    ref = _grads(torch_fn, inputs, upstream, torch.float64, **kwargs)
    names = [k for k, t in inputs.items() if t is not None and t.requires_grad]
    for name, o, p, r in zip(names, out, pt, ref, strict=True):
        assert o.dtype == inputs[name].dtype and o.shape == inputs[name].shape, name
        assert_parity(o, p, r, what=f"grad of {name}")


def _linear_inputs(shape, n, dtype, bias=True, residual=True, grad=("x", "weight", "bias", "residual")):
    t = dict(x=_randn(*shape, dtype=dtype), **_layer(shape[-1], n, dtype, bias),
             residual=_randn(*shape[:-1], n, dtype=dtype) if residual else None)
    return {k: None if v is None else v.requires_grad_(k in grad) for k, v in t.items()}


# A covering set: every activation, bias and residual on and off, M = 17 and 3·197, 2-D and 3-D
# inputs, K = 100 and N = 96 ragged against the tiles.
LINEAR_CASES = [
    ((17, 100), "gelu", True, True),
    ((3, 197, 100), "gelu_tanh", True, False),
    ((3 * 197, 100), "relu", False, True),
    ((17, 100), "none", True, True),
    ((3, 17, 100), None, False, False),
    ((2, 17, 100), "silu", False, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape, act, bias, residual", LINEAR_CASES,
                         ids=[f"{c[1]}-{'x'.join(map(str, c[0]))}" for c in LINEAR_CASES])
def test_linear_backward_matches_torch(dtype, shape, act, bias, residual):
    require_triton_path()
    inputs = _linear_inputs(shape, 96, dtype, bias, residual)
    _check(linear, _torch_linear, inputs, (*shape[:-1], 96), {"linear": 1, "linear_bwd": 1}, activation=act)


@pytest.mark.parametrize("grad, launches", [
    (("weight", "bias"), {"linear": 1, "linear_bwd": 1}),
    (("x",), {"linear": 1, "linear_bwd": 1}),
    (("residual",), {"linear": 1}),  # dR = dY: no backward kernel at all
], ids=["params", "x", "residual"])
def test_linear_backward_some_inputs_need_grad(grad, launches):
    inputs = _linear_inputs((17, 100), 96, torch.float16, grad=grad)
    _check(linear, _torch_linear, inputs, (17, 96), launches, activation="gelu")


def test_linear_backward_any_upstream_strides():
    """``sum()`` hands the backward an expanded (stride 0) gradient; a transposed one has column stride M."""
    x, layer = _randn(3, 17, 100).requires_grad_(), _layer(100, 96, torch.float32)
    w = layer["weight"].requires_grad_()
    for upstream in (torch.ones(()).expand(3, 17, 96), _randn(96, 17, 3).permute(2, 1, 0)):
        with runtime.count_launches() as counts:
            out = torch.autograd.grad(linear(x, w, activation="gelu_tanh"), (x, w), upstream)
        assert counts == {"linear": 1, "linear_bwd": 1}
        pt = torch.autograd.grad(_torch_linear(x, w, activation="gelu_tanh"), (x, w), upstream)
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = torch.autograd.grad(_torch_linear(x64, w64, activation="gelu_tanh"), (x64, w64), upstream.double())
        assert_parity(out, pt, ref, what="grads of (x, weight)")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_linear_backward_parameter_layouts(dtype):
    """Sliced, stride-0 and transposed weight leaves with sliced and stride-0 bias leaves: the kernels
    read them through their strides and each gradient lands in its leaf's shape."""
    require_triton_path()
    inputs = _linear_inputs((17, 100), 96, dtype)
    weights, biases = layouts(inputs["weight"]), layouts(inputs["bias"])
    for (_, w), (_, b) in itertools.zip_longest(weights, biases, fillvalue=("contiguous", inputs["bias"])):
        _check(linear, _torch_linear, {**inputs, "weight": w, "bias": b}, (17, 96), {"linear": 1, "linear_bwd": 1},
               activation="gelu")


def test_linear_backward_empty_batch():
    x, layer = _randn(0, 5, 100).requires_grad_(), _layer(100, 96, torch.float32)
    w, b = layer["weight"].requires_grad_(), layer["bias"].requires_grad_()
    with runtime.poison_outputs():
        dx, dw, db = torch.autograd.grad(linear(x, w, b, "gelu").sum(), (x, w, b))
    assert dx.shape == x.shape and dw.eq(0).all() and db.eq(0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_mlp_backward_matches_torch(dtype):
    """All five parameter gradients, the input's and the residual's, through both launches."""
    require_triton_path()
    inputs = dict(x=_randn(3, 17, 100, dtype=dtype), **_layer(100, 96, dtype, prefix="fc1_"),
                  **_layer(96, 100, dtype, prefix="fc2_"), residual=_randn(3, 17, 100, dtype=dtype))
    for t in inputs.values():
        t.requires_grad_()
    _check(mlp, _torch_mlp, inputs, (3, 17, 100), {"mlp": 1, "linear_bwd": 2}, activation="gelu")


@pytest.mark.parametrize("act_layer", [nn.GELU, functools.partial(nn.GELU, approximate="tanh"), nn.ReLU, nn.SiLU],
                         ids=["gelu", "gelu_tanh", "relu", "silu"])
def test_mlp_module_trains_like_timm(act_layer):
    """Training mode (no dropout): vitfast's Mlp runs the kernels both ways and its gradients match timm's."""
    require_triton_path()
    ours = Mlp(100, 96, act_layer=act_layer).to(DEVICE).train()
    pt = TimmMlp(100, 96, act_layer=act_layer).to(DEVICE).train()
    pt.load_state_dict(ours.state_dict())
    ref = copy.deepcopy(pt).double()
    x, upstream = _randn(3, 17, 100), _randn(3, 17, 100)
    xs = [x.to(m.fc1.weight.dtype, copy=True).requires_grad_() for m in (ours, pt, ref)]
    with runtime.count_launches() as counts, runtime.poison_outputs():
        ours(xs[0]).backward(upstream)
    assert counts == {"mlp": 1, "linear_bwd": 2}
    pt(xs[1]).backward(upstream)
    ref(xs[2]).backward(upstream.double())
    assert_parity(xs[0].grad, xs[1].grad, xs[2].grad, what="grad of x")
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        grads = [m.get_parameter(name).grad for m in (ours, pt, ref)]
        assert_parity(*grads, what=f"grad of {name}")


def test_mlp_module_drops_in_its_kernels_while_training():
    """drop1 and drop2 run in fc1's and fc2's epilogues: the same seed gives the same gradients, and
    in eval the module is timm's Mlp again."""
    ours, ref = Mlp(48, 96, drop=0.1).to(DEVICE).train(), TimmMlp(48, 96, drop=0.1).to(DEVICE).train()
    ours.load_state_dict(ref.state_dict())
    x = _randn(3, 5, 48).requires_grad_()
    grads = []
    for _ in range(2):
        x.grad = None
        with runtime.count_launches() as counts:
            torch.manual_seed(4)
            ours(x).square().sum().backward()
        assert counts == {"mlp": 1, "linear_bwd": 2}
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    ours.eval(), ref.eval()
    with torch.no_grad():
        assert_parity(ours(x), ref(x), ref.double()(x.double()))


def test_linear_backward_op_registrations():
    """Schema, fake (meta) kernels and autograd registration of the forward and backward ops."""
    x, r = _randn(5, 40).requires_grad_(), _randn(5, 24)
    layer = _layer(40, 24, torch.float32)
    w, b = layer["weight"].requires_grad_(), layer["bias"].requires_grad_()
    torch.library.opcheck(torch.ops.vitfast.linear_fwd.default, (x, w, b, r, "gelu", True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
    z, dy = _randn(5, 24), _randn(5, 24)
    for args in ((dy, x, w, z, "gelu_tanh", True, True, True), (dy, None, w, None, "none", True, False, False)):
        torch.library.opcheck(torch.ops.vitfast.linear_bwd.default, args, test_utils=("test_schema", "test_faketensor"))


def test_mlp_backward_compiles_fullgraph():
    """torch.compile traces forward and backward ops without graph breaks; gradients match eager."""
    torch._dynamo.reset()
    module = Mlp(40, 24).to(DEVICE).train()
    x = _randn(2, 5, 40).requires_grad_()
    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    eager = torch.autograd.grad(module(x, x).square().sum(), (x, *module.parameters()))
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    with runtime.count_launches() as counts:
        grads = torch.autograd.grad(compiled(x, x).square().sum(), (x, *module.parameters()))
    assert counts["linear_bwd"] == 2
    torch.testing.assert_close(grads, eager)


def test_linear_fwd_without_preact_refuses_backward():
    """Called directly without the stored pre-activation, the op says why instead of guessing."""
    x, w = _randn(5, 40).requires_grad_(), _randn(24, 40)
    y, _ = torch.ops.vitfast.linear_fwd(x, w, None, None, "gelu", False)
    with pytest.raises(RuntimeError, match="store_preact=False"):
        y.sum().backward()


@pytest.mark.gpu
def test_gpu_bf16_vit_b_mlp_backward():
    """ViT-B MLP at batch 128: 25216 tokens, 768 -> 3072 -> 768, every gradient."""
    dtype = torch.bfloat16
    inputs = dict(x=_randn(128, 197, 768, dtype=dtype), **_layer(768, 3072, dtype, prefix="fc1_"),
                  **_layer(3072, 768, dtype, prefix="fc2_"), residual=_randn(128, 197, 768, dtype=dtype))
    for t in inputs.values():
        t.requires_grad_()
    _check(mlp, _torch_mlp, inputs, (128, 197, 768), {"mlp": 1, "linear_bwd": 2}, activation="gelu")
