"""gated_linear (the GLU layer of SwiGLU / GeGLU MLPs) on the kernels, forward and backward, three ways
against PyTorch's composite and timm's SwiGLU and GluMlp modules."""
import contextlib
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from timm.layers import GluMlp, SwiGLU
from torch import nn

from vitfast import runtime
from vitfast.ops import gated_linear
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, layouts, require_triton_path
from test_linear_backward import _check, _layer, _randn

ACT = {None: lambda t: t, "none": lambda t: t, "silu": F.silu, "gelu": F.gelu,
       "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}
LAUNCHES = {"gated_linear": 1, "gated_linear_bwd": 1}


def _torch_gated(x, gate_weight, gate_bias, value_weight, value_bias, activation="silu"):
    """PyTorch's own composite: two F.linear, the activation on the gate, the product."""
    return ACT[activation](F.linear(x, gate_weight, gate_bias)) * F.linear(x, value_weight, value_bias)


def _d(t):
    return None if t is None else t.double()


def _inputs(shape, hidden, dtype, bias=True, grad=("x", "gate_weight", "gate_bias", "value_weight", "value_bias")):
    t = dict(x=_randn(*shape, dtype=dtype), **_layer(shape[-1], hidden, dtype, bias, prefix="gate_"),
             **_layer(shape[-1], hidden, dtype, bias, prefix="value_"))
    return {k: None if v is None else v.requires_grad_(k in grad) for k, v in t.items()}


def _check_forward(inputs, activation):
    """Inference: one launch, no pre-activations stored, three-way parity of the output."""
    with torch.no_grad(), runtime.count_launches() as counts:
        out = gated_linear(**inputs, activation=activation)
    assert counts == {"gated_linear": 1}
    x, hidden = inputs["x"], inputs["gate_weight"].shape[0]
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], hidden)
    with torch.no_grad():
        assert_parity(out, _torch_gated(**inputs, activation=activation),
                      _torch_gated(**{k: _d(v) for k, v in inputs.items()}, activation=activation), what="output")


# Ragged against the 64 × 64 × 32 interpreter tiles: M = 17, 3 and 2·9; K = 40 and 100; H = 47 and 96.
CASES = [((17, 40), 47, "silu", True), ((3, 100), 96, "gelu", False), ((2, 9, 40), 47, "silu", False),
         ((3, 100), 96, "none", True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape, hidden, act, bias", CASES,
                         ids=[f"{c[2]}-{'x'.join(map(str, c[0]))}x{c[1]}{'-bias' if c[3] else ''}" for c in CASES])
def test_gated_linear_matches_torch(dtype, shape, hidden, act, bias):
    """The output, then dx, dWg, dWv (and dbg, dbv) through the backward kernels."""
    require_triton_path()
    inputs = _inputs(shape, hidden, dtype, bias)
    _check_forward(inputs, act)
    _check(gated_linear, _torch_gated, inputs, (*shape[:-1], hidden), LAUNCHES, activation=act)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gated_linear_packed_weight_halves(dtype):
    """timm's GluMlp / SwiGLUPacked (gate_last=False): gate and value are the two halves of one [2H, K]
    weight and [2H] bias, passed as views; the gradients reach the packed leaves."""
    require_triton_path()
    hidden = 47

    def packed(x, weight, bias, activation):
        return gated_linear(x, weight[:hidden], bias[:hidden], weight[hidden:], bias[hidden:], activation)

    def torch_packed(x, weight, bias, activation):
        gate, value = F.linear(x, weight, bias).chunk(2, dim=-1)
        return ACT[activation](gate) * value

    inputs = dict(x=_randn(17, 40, dtype=dtype), **_layer(40, 2 * hidden, dtype))
    inputs = {k: v.requires_grad_() for k, v in inputs.items()}
    _check(packed, torch_packed, inputs, (17, hidden), LAUNCHES, activation="silu")
    _check(packed, torch_packed, inputs, (17, hidden), LAUNCHES, activation="gelu_tanh")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gated_linear_operand_layouts(dtype):
    """Sliced (NaN between the elements), stride-0 and transposed inputs, weights and biases: the kernels
    read them through their strides, and every gradient lands in its leaf's shape."""
    require_triton_path()
    inputs = _inputs((17, 40), 47, dtype)
    # The value operands walk the layouts in the other order, so gate and value differ in every run.
    gate_w, gate_b = list(layouts(inputs["gate_weight"])), list(layouts(inputs["gate_bias"]))
    value_w, value_b = list(layouts(inputs["value_weight"]))[::-1], list(layouts(inputs["value_bias"]))[::-1]
    xs = list(layouts(inputs["x"], stride0=False))
    for i, (wg, wv) in enumerate(zip(gate_w, value_w)):
        layout = {"x": xs[i % len(xs)][1], "gate_weight": wg[1], "gate_bias": gate_b[i % len(gate_b)][1],
                  "value_weight": wv[1], "value_bias": value_b[i % len(value_b)][1]}
        _check_forward(layout, "silu")
        _check(gated_linear, _torch_gated, layout, (17, 47), LAUNCHES, activation="silu")


@pytest.mark.parametrize("grad", [("x",), ("value_weight", "value_bias"), ("gate_weight",), ("gate_bias", "x")],
                         ids=["x", "value", "gate_weight", "gate_bias+x"])
def test_gated_linear_backward_some_inputs_need_grad(grad):
    """The backward computes only what is asked for; the weight GEMM covers only the halves that need it."""
    inputs = _inputs((17, 40), 47, torch.float16, grad=grad)
    _check(gated_linear, _torch_gated, inputs, (17, 47), LAUNCHES, activation="gelu")


def test_gated_linear_backward_any_upstream_strides():
    """``sum()`` hands the backward an expanded (stride 0) gradient; a transposed one has column stride M."""
    inputs = _inputs((3, 17, 40), 47, torch.float32)
    leaves = list(inputs.values())
    for upstream in (torch.ones(()).expand(3, 17, 47), _randn(47, 17, 3).permute(2, 1, 0)):
        with runtime.count_launches() as counts:
            out = torch.autograd.grad(gated_linear(**inputs), leaves, upstream)
        assert counts == LAUNCHES
        pt = torch.autograd.grad(_torch_gated(**inputs), leaves, upstream)
        ref_leaves = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
        ref = torch.autograd.grad(_torch_gated(**ref_leaves), list(ref_leaves.values()), upstream.double())
        assert_parity(out, pt, ref, what="grads")


def test_gated_linear_empty_batch():
    inputs = _inputs((0, 5, 40), 47, torch.float32)
    with runtime.count_launches() as counts:
        out = gated_linear(**inputs)
        grads = torch.autograd.grad(out.sum(), list(inputs.values()))
    assert counts == LAUNCHES and out.shape == (0, 5, 47)
    assert grads[0].shape == (0, 5, 40) and all(g.eq(0).all() for g in grads[1:])


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_gated_linear_large_inputs(activation):
    """Pre-activations up to ±100 (identity weights pass x through exactly, so y = act(z)·z): no NaN or
    inf in the output or the gradient, and the limits act(z) → relu(z), act'(z) → 0 or 1."""
    require_triton_path()
    z = torch.tensor([-100.0, -88.0, -60.0, -20.0, -1.0, 0.0, 1.0, 20.0, 60.0, 100.0], device=DEVICE)
    x = z.repeat(3, 1).requires_grad_()
    eye = torch.eye(z.numel(), device=DEVICE)
    out = gated_linear(x, eye, None, eye, None, activation)
    (dx,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(out).all() and torch.isfinite(dx).all()
    big = z.abs() >= 20
    # y = relu(z)·z, dy/dz = act'(z)·z + act(z) → 2·relu(z).
    torch.testing.assert_close(out[:, big], (z[big].clamp(min=0) * z[big]).expand(3, -1))
    torch.testing.assert_close(dx[:, big], 2 * z[big].clamp(min=0).expand(3, -1))
    with torch.no_grad():
        assert_parity(out, _torch_gated(x, eye, None, eye, None, activation),
                      _torch_gated(_d(x), _d(eye), None, _d(eye), None, activation))


def test_linear_silu_large_inputs():
    """The linear epilogue's SiLU guards its sigmoid the same way: finite output and gradient at ±100."""
    from vitfast.ops import linear

    require_triton_path()
    z = torch.tensor([-100.0, -88.0, -60.0, -1.0, 0.0, 1.0, 60.0, 100.0], device=DEVICE)
    x = z.repeat(3, 1).requires_grad_()
    out = linear(x, torch.eye(z.numel(), device=DEVICE), activation="silu")
    (dx,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(out).all() and torch.isfinite(dx).all()
    torch.testing.assert_close(out, F.silu(x).detach())
    torch.testing.assert_close(dx, torch.autograd.grad(F.silu(x).sum(), x)[0])


def _swiglu(in_features, hidden):
    return SwiGLU(in_features, hidden)


def _glu_mlp(in_features, hidden):
    return GluMlp(in_features, 2 * hidden, act_layer=nn.SiLU, gate_last=False)


def _gated_fc1(module, x):
    """vitfast's fc1 of a timm GLU MLP, from the module's own parameters (views for GluMlp's packed fc1)."""
    if isinstance(module, SwiGLU):
        return gated_linear(x, module.fc1_g.weight, module.fc1_g.bias, module.fc1_x.weight, module.fc1_x.bias)
    w, b = module.fc1.weight, module.fc1.bias
    hidden = w.shape[0] // 2
    return gated_linear(x, w[:hidden], b[:hidden], w[hidden:], b[hidden:], "silu")


def _timm_fc1(module, x):
    """The module's own layers: act(fc1_g(x)) · fc1_x(x), or GluMlp's chunks of fc1(x), gate first."""
    if isinstance(module, SwiGLU):
        return module.act(module.fc1_g(x)) * module.fc1_x(x)
    gate, value = module.fc1(x).chunk(2, dim=-1)
    return module.act(gate) * value


@pytest.mark.parametrize("build", [_swiglu, _glu_mlp], ids=["SwiGLU", "GluMlp-gate-first"])
def test_timm_glu_mlps(build):
    """timm's SwiGLU and GluMlp(act_layer=nn.SiLU, gate_last=False): vitfast's fc1 matches the module's
    own fc1 half, and fc2 on top of it matches the module's forward, output and every parameter's
    gradient, with the module in fp32 (pt) and float64 (ref)."""
    require_triton_path()
    torch.manual_seed(1)
    pt = build(40, 47).to(DEVICE).train()
    ref = copy.deepcopy(pt).double()
    ours = copy.deepcopy(pt)
    x, upstream = _randn(2, 9, 40), _randn(2, 9, 40)
    with torch.no_grad(), runtime.count_launches() as counts:
        assert_parity(_gated_fc1(ours, x), _timm_fc1(pt, x), _timm_fc1(ref, x.double()), what="fc1")
    assert counts == {"gated_linear": 1}
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()]
    with runtime.count_launches() as counts:
        out = ours.fc2(_gated_fc1(ours, xs[0]))
        out.backward(upstream)
    assert counts == LAUNCHES
    expected = pt(xs[1])
    expected.backward(upstream)
    ref_out = ref(xs[2])
    ref_out.backward(upstream.double())
    assert_parity(out, expected, ref_out, what="mlp output")
    assert_parity(xs[0].grad, xs[1].grad, xs[2].grad, what="grad of x")
    for name, p in pt.named_parameters():
        assert_parity(ours.get_parameter(name).grad, p.grad, ref.get_parameter(name).grad, what=f"grad of {name}")


def test_gated_linear_float64_takes_pytorch():
    """float64 runs PyTorch's composite (one warning, no kernel), forward and backward."""
    inputs = _inputs((17, 40), 24, torch.float64)
    runtime._warned.discard("gated_linear:float64")
    with runtime.count_launches() as counts, \
            pytest.warns(RuntimeWarning, match="gated_linear: float64") if runtime.interpreter_enabled() \
            else contextlib.nullcontext():
        out = gated_linear(**inputs, activation="gelu")
    assert not counts
    expected = _torch_gated(**inputs, activation="gelu")
    torch.testing.assert_close(out, expected)
    upstream = _randn(17, 24, dtype=torch.float64)
    leaves = list(inputs.values())
    torch.testing.assert_close(torch.autograd.grad(out, leaves, upstream),
                               torch.autograd.grad(expected, leaves, upstream))


def test_gated_linear_cpu_bf16_takes_pytorch():
    """The interpreter's bf16 tl.dot is wrong, so CPU bf16 must never reach the kernel."""
    inputs = {k: v.detach().cpu() for k, v in _inputs((4, 16), 8, torch.bfloat16).items()}
    runtime._warned.discard("gated_linear:interpreter-bf16")
    warns = pytest.warns(RuntimeWarning, match="bfloat16 under Triton's interp")
    with runtime.count_launches() as counts, warns if runtime.interpreter_enabled() else contextlib.nullcontext():
        out = gated_linear(**inputs)
    assert not counts
    torch.testing.assert_close(out, _torch_gated(**inputs))


def test_gated_linear_fallback_without_kernels():
    """On the PyTorch path (CPU without the interpreter, or forced) values and gradients are PyTorch's."""
    inputs = _inputs((3, 5, 40), 24, torch.float32)
    with runtime.count_launches() as counts, runtime.fallback_only():
        out = gated_linear(**inputs, activation="gelu_tanh")
        grads = torch.autograd.grad(out.square().sum(), list(inputs.values()))
    assert not counts
    expected = _torch_gated(**inputs, activation="gelu_tanh")
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads, torch.autograd.grad(expected.square().sum(), list(inputs.values())))


def _args(**changes):
    args = dict(x=torch.randn(4, 40), gate_weight=torch.randn(24, 40), gate_bias=torch.randn(24),
                value_weight=torch.randn(24, 40), value_bias=torch.randn(24), activation="silu")
    args.update(changes)
    return args


@pytest.mark.parametrize("kwargs, exc, words", [
    (_args(gate_weight=torch.randn(24, 39)), ValueError,
     "gate_weight has in_features 39 (shape (24, 39)) but x's last dimension has width 40"),
    (_args(value_weight=torch.randn(24, 41)), ValueError, "value_weight has in_features 41"),
    (_args(value_weight=torch.randn(25, 40), value_bias=torch.randn(25)), ValueError,
     "value_weight has out_features 25 (shape (25, 40)) but gate_weight has 24 (shape (24, 40))"),
    (_args(gate_weight=torch.randn(24 * 40)), ValueError, "gate_weight must be 2-D"),
    (_args(gate_bias=torch.randn(23)), ValueError, "gate_bias must have shape (24,), got (23,)"),
    (_args(value_bias=torch.randn(24, 1)), ValueError, "value_bias must have shape (24,), got (24, 1)"),
    (_args(activation="swish"), ValueError, "activation must be one of None, 'none', 'gelu'"),
    (_args(activation=F.silu), ValueError, "got <function silu"),
    (_args(x=torch.randn(4, 40).half()), TypeError,
     "gate_weight has dtype torch.float32 but x has dtype torch.float16"),
    (_args(value_weight=torch.randn(24, 40).half()), TypeError, "value_weight has dtype torch.float16 but x has"),
    (_args(value_bias=torch.randn(24).half()), TypeError, "value_bias has dtype torch.float16 but x has"),
    (_args(x=torch.ones(4, 40, dtype=torch.int64)), TypeError, "x must be float32"),
    (_args(gate_bias=2.0), TypeError, "gate_bias must be a torch.Tensor, got float"),
    (_args(value_weight=None), TypeError, "value_weight must be a torch.Tensor, got NoneType"),
    (_args(x=torch.randn(4, 0), gate_weight=torch.randn(24, 0), value_weight=torch.randn(24, 0)), ValueError,
     "non-empty last dimension"),
    (_args(value_bias=torch.randn(24, device="meta")), ValueError, "value_bias is on meta but x is on cpu"),
    (_args(gate_weight=torch.randn(24, 40).to_sparse()), TypeError, "gate_weight must be a dense (strided) tensor"),
])
def test_gated_linear_bad_input(kwargs, exc, words):
    with runtime.count_launches() as counts, pytest.raises(exc) as info:
        gated_linear(**kwargs)
    assert words in str(info.value)
    assert not counts


def test_gated_linear_op_registrations():
    """Schema, fake (meta) kernels and autograd registration of the forward and backward ops."""
    inputs = _inputs((5, 40), 24, torch.float32)
    torch.library.opcheck(torch.ops.vitfast.gated_linear_fwd.default, (*inputs.values(), "silu", True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
    x, wg, _, wv, _ = (t.detach() for t in inputs.values())
    dy, z = _randn(5, 24), _randn(5, 48)
    for args in ((dy, x, wg, wv, z, "gelu", True, True, True, True),
                 (dy, None, wg, wv, z, "none", True, False, False, False),
                 (dy, x, None, None, z, "silu", False, False, True, True)):
        torch.library.opcheck(torch.ops.vitfast.gated_linear_bwd.default, args,
                              test_utils=("test_schema", "test_faketensor"))


def test_gated_linear_fwd_without_preact_refuses_backward():
    """Called directly without the stored pre-activations, the op says why instead of guessing."""
    inputs = _inputs((5, 40), 24, torch.float32)
    y, _ = torch.ops.vitfast.gated_linear_fwd(*inputs.values(), "silu", False)
    with pytest.raises(RuntimeError, match="store_preact=False"):
        y.sum().backward()


def test_gated_linear_compiles_fullgraph():
    """torch.compile traces the forward and backward ops without graph breaks; results match eager."""
    require_triton_path()
    torch._dynamo.reset()
    inputs = _inputs((2, 5, 40), 24, torch.float32)
    leaves = list(inputs.values())

    def fn(x, gate_weight, gate_bias, value_weight, value_bias):
        return gated_linear(x, gate_weight, gate_bias, value_weight, value_bias, "gelu").square().sum()

    eager = torch.autograd.grad(fn(**inputs), leaves)
    compiled = torch.compile(fn, fullgraph=True, backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    with runtime.count_launches() as counts:
        grads = torch.autograd.grad(compiled(**inputs), leaves)
    assert counts.get("gated_linear_bwd") == 1
    torch.testing.assert_close(grads, eager)


def test_gated_linear_fx_traces_as_one_node():
    """``torch.fx.symbolic_trace`` records the op as one node that checks and dispatches when it runs."""
    require_triton_path()

    class Glu(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(40, 48)

        def forward(self, x):
            w, b = self.fc1.weight, self.fc1.bias
            return gated_linear(x, w[:24], b[:24], w[24:], b[24:])

    module = Glu().to(DEVICE)
    graph_module = torch.fx.symbolic_trace(module)
    assert [n.target for n in graph_module.graph.nodes if n.op == "call_function"].count(gated_linear) == 1
    x = _randn(3, 40)
    with torch.no_grad(), runtime.count_launches() as counts:
        assert torch.equal(graph_module(x), module(x))
    assert counts == {"gated_linear": 2}


@pytest.mark.gpu
def test_gpu_bf16_eva02_b_swiglu():
    """EVA02-B's SwiGLU fc1 at batch 8: 8·257 tokens, 768 → 2·2048, every gradient."""
    inputs = _inputs((8, 257, 768), 2048, torch.bfloat16)
    _check_forward(inputs, "silu")
    _check(gated_linear, _torch_gated, inputs, (8, 257, 2048), LAUNCHES, activation="silu")
