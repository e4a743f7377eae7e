"""LayerNorm backward on the kernel: every gradient against PyTorch's own autograd, three ways."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitfast
from vitfast import ops, runtime
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, layouts, require_triton_path

NAMES = ("x", "residual", "weight", "bias")


def _torch_layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """PyTorch's LayerNorm (and the sum before it); fp32 math when parameters and input differ in dtype."""
    s = x if residual is None else x + residual
    params = [p for p in (weight, bias) if p is not None]
    if any(p.dtype != s.dtype for p in params):
        y = F.layer_norm(s.float(), s.shape[-1:], weight, bias, eps).to(s.dtype)
    else:
        y = F.layer_norm(s, s.shape[-1:], weight, bias, eps)
    return y if residual is None else (y, s)


def _leaf(t, dtype):
    return None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)


def _grads(fn, inputs, upstream, dtype=None, eps=1e-5):
    """Gradients of sum(output · upstream) over the used outputs (y, then s) w.r.t. the inputs that
    require grad, each input first cast to ``dtype`` (None: kept). Returns them and which outputs
    carry gradients."""
    leaves = {k: _leaf(t, dtype) for k, t in inputs.items()}
    out = fn(**leaves, eps=eps)
    outs = out if isinstance(out, tuple) else (out,)
    used = [(o, g) for o, g in zip(outs, upstream) if g is not None and o.requires_grad]
    wrt = [leaves[k] for k in NAMES if leaves[k] is not None and leaves[k].requires_grad]
    grads = torch.autograd.grad([o for o, _ in used], wrt, [g.to(o.dtype) for o, g in used])
    return grads, [o.requires_grad for o in outs]


def _check(inputs, use_y=True, use_sum=True, eps=1e-5):
    """Three-way parity of every gradient; the forward and the backward kernel each run once."""
    x, has_sum = inputs["x"], inputs["residual"] is not None
    upstream = (torch.randn_like(x) if use_y else None, torch.randn_like(x) if has_sum and use_sum else None)
    with runtime.count_launches() as launches, runtime.poison_outputs():
        out, out_differentiable = _grads(ops.layer_norm, inputs, upstream, eps=eps)
    assert launches == {"layer_norm": 1, "layer_norm_bwd": 1}
    pt, pt_differentiable = _grads(_torch_layer_norm, inputs, upstream, eps=eps)
    ref, _ = _grads(_torch_layer_norm, inputs, upstream, torch.float64, eps=eps)
    assert out_differentiable == pt_differentiable
    names = [k for k in NAMES if inputs.get(k) is not None and inputs[k].requires_grad]
    for name, o, p, r in zip(names, out, pt, ref, strict=True):
        assert o.dtype == inputs[name].dtype, name
        assert_parity(o, p, r, what=f"grad of {name}")


def _inputs(shape, dtype, residual=False, weight=True, bias=True, param_dtype=None, grad=NAMES):
    width = shape[-1]
    param_dtype = param_dtype or dtype
    t = dict(x=torch.randn(*shape, device=DEVICE, dtype=dtype) * 2 + 0.5,
             residual=torch.randn(*shape, device=DEVICE, dtype=dtype) if residual else None,
             weight=torch.randn(width, device=DEVICE, dtype=param_dtype) if weight else None,
             bias=torch.randn(width, device=DEVICE, dtype=param_dtype) if bias else None)
    return {k: None if v is None else v.requires_grad_(k in grad) for k, v in t.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("width", [100, 768])
@pytest.mark.parametrize("rows", [(1,), (17,), (3, 65)], ids=["1", "17", "3x65"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_backward_matches_torch(dtype, width, rows, residual):
    """With the residual, both outputs feed the loss: dx = dr = dLN(dy) + ds."""
    require_triton_path()
    _check(_inputs((*rows, width), dtype, residual))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("used", ["y", "sum"])
def test_layer_norm_backward_one_output_used(dtype, used):
    """Post-norm uses only y (no gradient arrives on the sum); a sum used alone sends ds straight through."""
    grad = NAMES if used == "y" else ("x", "residual")
    _check(_inputs((17, 100), dtype, residual=True, grad=grad), use_y=used == "y", use_sum=used == "sum")


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)], ids=["none", "weight", "bias"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_backward_weight_or_bias_none(affine, residual):
    _check(_inputs((3, 65, 100), torch.float32, residual, *affine), eps=1e-3)


@pytest.mark.parametrize("grad", [("weight", "bias"), ("x",), ("residual", "bias"), ("weight",)],
                         ids=["params", "x", "residual-bias", "weight"])
def test_layer_norm_backward_some_inputs_need_grad(grad):
    _check(_inputs((2, 17, 100), torch.float16, residual=True, grad=grad))


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_backward_fp16_input_fp32_params(residual):
    """Mixed precision: x (and dx) fp16, weight and bias (and their gradients) fp32."""
    _check(_inputs((3, 65, 130), torch.float16, residual, param_dtype=torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_layer_norm_backward_strided_rows(dtype):
    """Rows sliced out of a wider buffer: the gradient lands in the slice of the buffer's gradient."""
    big = torch.randn(33, 400, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.randn(100, device=DEVICE, dtype=dtype, requires_grad=True)
    upstream = torch.randn(33, 100, device=DEVICE, dtype=dtype)
    with runtime.count_launches() as launches:
        out = torch.autograd.grad(ops.layer_norm(big[:, 50:150], w, None), (big, w), upstream)
    assert launches == {"layer_norm": 1, "layer_norm_bwd": 1}
    pt = torch.autograd.grad(F.layer_norm(big[:, 50:150], (100,), w), (big, w), upstream)
    big64, w64 = big.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.autograd.grad(F.layer_norm(big64[:, 50:150], (100,), w64), (big64, w64), upstream.double())
    assert_parity(out, pt, ref, what="grads of (buffer, weight)")
    assert out[0][:, :50].eq(0).all() and out[0][:, 150:].eq(0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_layer_norm_backward_parameter_layouts(dtype):
    """Strided and stride-0 weight and bias leaves: the backward kernel reads the weight through its
    stride, and every gradient lands in its leaf's shape with PyTorch's values."""
    require_triton_path()
    inputs = _inputs((3, 17, 100), dtype, residual=True)
    for (name, w), (_, b) in zip(layouts(inputs["weight"]), layouts(inputs["bias"])):
        assert name == "contiguous" or not w.is_contiguous()
        _check({**inputs, "weight": w, "bias": b})


def test_layer_norm_module_trains_on_the_kernels():
    """A few SGD steps of vitfast's LayerNorm track nn.LayerNorm's (float64 reference) step by step."""
    mods = {name: nn.LayerNorm(100, eps=1e-6).to(DEVICE, dtype) for name, dtype in
            (("ref", torch.float64), ("pt", torch.float32), ("out", torch.float32))}
    mods["out"] = vitfast.modules.LayerNorm(100, eps=1e-6).to(DEVICE)
    for m in mods.values():
        m.load_state_dict({k: v.to(m.weight.dtype) for k, v in mods["ref"].state_dict().items()})
    for _ in range(3):
        x, target = torch.randn(2, 9, 100, device=DEVICE), torch.randn(2, 9, 100, device=DEVICE)
        with runtime.count_launches() as launches:
            loss = (mods["out"](x) - target).square().sum()
            loss.backward()
        assert launches == {"layer_norm": 1, "layer_norm_bwd": 1}
        for name in ("ref", "pt"):
            m = mods[name]
            (m(x.to(m.weight.dtype)) - target.to(m.weight.dtype)).square().sum().backward()
        for p in ("weight", "bias"):
            grads = [getattr(mods[n], p).grad for n in ("out", "pt", "ref")]
            assert_parity(*grads, what=f"grad of {p}")
        for m in mods.values():
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.01 * p.grad
                    p.grad = None


def test_layer_norm_backward_op_registrations():
    """Schema, fake (meta) kernel and autograd registration agree with the real ops."""
    x, r = torch.randn(5, 100, device=DEVICE, requires_grad=True), torch.randn(5, 100, device=DEVICE)
    w, b = torch.randn(100, device=DEVICE, requires_grad=True), torch.randn(100, device=DEVICE)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.vitfast.layer_norm_fwd, (x, w, b, 1e-5, r, True), test_utils=tests)
    y, s, mean, rstd = torch.ops.vitfast.layer_norm_fwd(x.detach(), w.detach(), b, 1e-5, r, True)
    for flags in ((True, True, True), (False, True, False)):
        torch.library.opcheck(torch.ops.vitfast.layer_norm_bwd,
                              (torch.randn_like(y), torch.randn_like(y), s, w.detach(), mean, rstd, *flags),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_backward_gpu_bf16_vit_b(residual):
    """ViT-B's 256 x 197 rows of 768: enough rows that the partial sums come from 512 programs."""
    _check(_inputs((256, 197, 768), torch.bfloat16, residual))
