import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitfast
from vitfast import ops, runtime
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, layouts, require_triton_path

WIDTHS = [100, 192, 768, 1280]


def _inputs(shape, dtype, residual):
    width = shape[-1]
    x = torch.randn(*shape, device=DEVICE, dtype=dtype) * 2 + 0.5
    r = torch.randn(*shape, device=DEVICE, dtype=dtype) if residual else None
    w = torch.randn(width, device=DEVICE, dtype=dtype)
    b = torch.randn(width, device=DEVICE, dtype=dtype)
    return x, r, w, b


def _check(x, r, w, b, eps=1e-5):
    width = x.shape[-1]
    with runtime.count_launches() as launches:
        out = ops.layer_norm(x, w, b, eps, residual=r)
    assert launches.get("layer_norm") == 1
    xin = x if r is None else x + r
    pt = F.layer_norm(xin, (width,), w, b, eps)
    xd = x.double() if r is None else x.double() + r.double()
    ref = F.layer_norm(xd, (width,), None if w is None else w.double(), None if b is None else b.double(), eps)
    if r is None:
        assert_parity(out, pt, ref, what="y")
    else:
        y, s = out
        assert_parity(y, pt, ref, what="y")
        assert_parity(s, xin, xd, what="x + residual")
        assert s.dtype == x.dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_matches_torch(dtype, width, residual):
    require_triton_path()
    _check(*_inputs((3, 17, width), dtype, residual))


@pytest.mark.parametrize("rows", [1, 2, 65])
def test_layer_norm_row_counts(rows):
    _check(*_inputs((rows, 768), torch.float32, True))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_layer_norm_strided_rows(dtype):
    """Rows further apart than their width (a slice of a wider buffer) are read in place."""
    big = torch.randn(33, 400, device=DEVICE, dtype=dtype)
    rbig = torch.randn(33, 300, device=DEVICE, dtype=dtype)
    x, r = big[:, 50:150], rbig[:, :100]
    assert x.stride(0) == 400 and not x.is_contiguous()
    w = torch.randn(100, device=DEVICE, dtype=dtype)
    b = torch.randn(100, device=DEVICE, dtype=dtype)
    _check(x, None, w, b)
    _check(x, r, w, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_layer_norm_parameter_layouts(dtype):
    """Weight and bias are read through their strides: a slice of a larger tensor, one value broadcast
    with ``expand`` (stride 0, which a unit-stride read would take past its one-element allocation)."""
    require_triton_path()
    x, r, w, b = _inputs((3, 17, 100), dtype, True)
    for (name, wl), (_, bl) in zip(layouts(w), layouts(b)):
        assert name == "contiguous" or not wl.is_contiguous()
        _check(x, None, wl, bl)
        _check(x, r, wl, bl)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_layer_norm_eps_zero_runs_on_the_kernel(dtype):
    """eps = 0 is F.layer_norm's too: the same values, and NaN on a constant row as PyTorch gives."""
    x, _, w, b = _inputs((2, 9, 100), dtype, False)
    _check(x, None, w, b, eps=0)
    x[1, 4] = 3.0
    with runtime.count_launches() as launches:
        out = ops.layer_norm(x, w, b, eps=0.0)
    assert launches == {"layer_norm": 1}
    pt = F.layer_norm(x, (100,), w, b, eps=0.0)
    assert out[1, 4].isnan().all() and pt[1, 4].isnan().all()
    keep = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    keep[1, 4] = False
    ref = F.layer_norm(x.double(), (100,), w.double(), b.double(), eps=0.0)
    assert_parity(out[keep], pt[keep], ref[keep])


def test_layer_norm_numpy_eps():
    """A NumPy eps (from a config file, say) is a number as F.layer_norm takes it."""
    x, _, w, b = _inputs((5, 96), torch.float32, False)
    _check(x, None, w, b, eps=np.float32(1e-3))


def test_layer_norm_non_affine_and_eps():
    x, r, _, _ = _inputs((5, 96), torch.float32, True)
    _check(x, r, None, None, eps=1e-3)
    w = torch.randn(96, device=DEVICE)
    _check(x, None, w, None, eps=1e-6)


def test_layer_norm_fp32_params_with_fp16_input():
    x = torch.randn(9, 130, device=DEVICE, dtype=torch.float16)
    w = torch.randn(130, device=DEVICE)
    b = torch.randn(130, device=DEVICE)
    out = ops.layer_norm(x, w, b)
    assert out.dtype == torch.float16
    pt = F.layer_norm(x.float(), (130,), w, b).half()
    ref = F.layer_norm(x.double(), (130,), w.double(), b.double())
    assert_parity(out, pt, ref)


@pytest.mark.gpu
def test_layer_norm_gpu_large_offsets():
    storage = torch.randn(2**31 // 1024 + 8, 1024, device=DEVICE, dtype=torch.float16)
    x = storage[::8][:, :768]  # row stride 8192 elements, last row beyond 2**31 elements
    assert (x.shape[0] - 1) * x.stride(0) > 2**31 - 2**22
    w = torch.randn(768, device=DEVICE, dtype=torch.float16)
    b = torch.randn(768, device=DEVICE, dtype=torch.float16)
    _check(x, None, w, b)


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_gpu_bf16_vit_b(residual):
    _check(*_inputs((256, 197, 768), torch.bfloat16, residual))


def test_layer_norm_module_drop_in():
    ref_mod = nn.LayerNorm(100, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        ref_mod.weight.normal_()
        ref_mod.bias.normal_()
    mod = vitfast.modules.LayerNorm(100, eps=1e-6).to(DEVICE)
    mod.load_state_dict(ref_mod.state_dict())
    assert isinstance(mod, nn.LayerNorm)
    assert list(mod.state_dict()) == list(ref_mod.state_dict())
    nn.LayerNorm(100).load_state_dict(mod.state_dict())
    x = torch.randn(2, 7, 100, device=DEVICE)
    r = torch.randn(2, 7, 100, device=DEVICE)
    with torch.no_grad():
        assert_parity(mod(x), ref_mod(x), F.layer_norm(x.double(), (100,), ref_mod.weight.double(),
                                                     ref_mod.bias.double(), 1e-6))
        y, s = mod(x, r)
        assert_parity(y, ref_mod(x + r), F.layer_norm(x.double() + r.double(), (100,),
                                                      ref_mod.weight.double(), ref_mod.bias.double(), 1e-6))
    shared = vitfast.modules.LayerNorm.from_torch(ref_mod)
    assert shared.weight is ref_mod.weight


def test_layer_norm_gradients_run_on_the_kernels():
    """Inputs that need gradients take the forward kernel and, on backward, the backward kernel."""
    x = torch.randn(4, 100, device=DEVICE, requires_grad=True)
    ln = vitfast.modules.LayerNorm(100).to(DEVICE)
    ref = nn.LayerNorm(100).to(DEVICE)
    with runtime.count_launches() as launches:
        ln(x).square().sum().backward()
    assert launches == {"layer_norm": 1, "layer_norm_bwd": 1}
    gx = x.grad.clone()
    x.grad = None
    ref(x).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(ln.weight.grad, ref.weight.grad)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(weight=torch.ones(99)), ValueError, "weight must have shape (100,), got (99,)"),
        (dict(bias=torch.ones(3, 100)), ValueError, "bias must have shape"),
        (dict(x=torch.ones(4, 100, dtype=torch.int64)), TypeError, "x must be float32"),
        (dict(eps=-1e-5), ValueError, "eps must be a finite number >= 0, got -1e-05"),
        (dict(eps=math.nan), ValueError, "eps must be a finite number >= 0, got nan"),
        (dict(eps=math.inf), ValueError, "eps must be a finite number >= 0, got inf"),
        (dict(eps="1e-5"), ValueError, "eps must be a finite number >= 0, got '1e-5'"),
        (dict(residual=torch.ones(4, 99)), ValueError, "residual must have shape (4, 100)"),
        (dict(residual=torch.ones(4, 100, dtype=torch.float16)), TypeError, "residual has dtype"),
        (dict(weight="w"), TypeError, "weight must be a torch.Tensor"),
    ],
)
def test_layer_norm_bad_input(kwargs, exc, words):
    args = dict(x=torch.randn(4, 100), weight=torch.ones(100), bias=torch.zeros(100), eps=1e-5, residual=None)
    args.update(kwargs)
    with runtime.count_launches() as launches, pytest.raises(exc) as info:
        ops.layer_norm(**args)
    assert words in str(info.value)
    assert not launches


def test_layer_norm_device_mix():
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        ops.layer_norm(torch.randn(4, 8), torch.ones(8, device="meta"), None)
