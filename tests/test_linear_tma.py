"""linear's and gated_linear's descriptor kernels (kernels/linear_tma.py, gated_linear_tma.py) and the
GEMM sites' tactics (kernels/gemm_tactic.py) in the interpreter: which launches take the descriptor
kernels and which keep the pointer kernels, every epilogue and operand layout against the pointer
kernel and float64, the backward's transposed operands, and the cuBLAS tactic (forced, measured by a
tuning session, reported, replayed).
"""
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

import vitfast
import vitfast.tuning
from vitfast import runtime
from vitfast.kernels import _configs, _select, gated_linear, gated_linear_tma, gemm_tactic, linear, linear_tma
from vitfast.ops.linear import linear as linear_op
from helpers import assert_parity, require_triton_path
from test_optimize import FAMILIES, IMG, _logits, _randomize
from test_replay import replays  # noqa: F401  (a fixture)

ACT = {"none": lambda t: t, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
       "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t), "relu": F.relu, "silu": F.silu}


@pytest.fixture(autouse=True)
def _fresh_choices(tmp_path, monkeypatch):
    """Fresh config and tactic choices, and TF32 allowed: fp32 products take the descriptor kernel only
    then (the interpreter computes them in fp32 either way)."""
    require_triton_path()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    monkeypatch.setenv("VITFAST_TUNING_FILE", str(tmp_path / "picks.json"))
    _select.reset()
    gemm_tactic.ran.clear()
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32
    _select.reset()
    gemm_tactic.ran.clear()


@pytest.fixture
def kernels(monkeypatch):
    """The names of the kernels ``linear_fwd`` launched, in order."""
    seen = []
    for module in (linear, linear_tma, gemm_tactic, gated_linear, gated_linear_tma):
        real = module.launch

        def spy(fn, grid, args, meta, real=real):
            seen.append(fn.__name__ if hasattr(fn, "__name__") else fn.fn.__name__)
            real(fn, grid, args, meta)
        monkeypatch.setattr(module, "launch", spy)
    return seen


@pytest.fixture
def cublas(monkeypatch):
    """Every GEMM site runs the cuBLAS tactic (the interpreter's default is the fused kernel)."""
    for tactic in gemm_tactic.TACTICS.values():
        monkeypatch.setattr(tactic, "interpreter", lambda key: _configs._TACTICS[1])


def _reference(x, w, b, act, scale, row_scale, residual):
    z = x.double() @ w.double().t() + (0 if b is None else b.double())
    y = ACT[act](z)
    if scale is not None:
        y = y * scale.double()
    if row_scale is not None:
        y = y * row_scale.double()[:, None]
    return (y if residual is None else y + residual.double()), z


def _launch(x, w, b, act, scale=None, row_scale=None, residual=None, preact=False, out_dtype=None, seed=None,
            p=0.0):
    M, N = x.shape[0], w.shape[0]
    y = torch.full((M, N), float("nan"), dtype=out_dtype or x.dtype)
    z = torch.full((M, N), float("nan"), dtype=x.dtype) if preact else None
    linear.linear_fwd(x, w, b, residual, act, y, z, scale, seed, p, 1.0 / (1.0 - p), row_scale)
    return y, z


def _transposed(t):
    return t.t().contiguous().t()


# Aligned shapes with ragged edges against the interpreter's 64 × 64 × 32 tiles and 3 programs.
SHAPES = [(24, 96, 64), (136, 136, 72), (200, 64, 48), (8, 8, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
def test_descriptor_kernel_matches_float64_in_every_layout(dtype, shape, kernels):
    M, N, K = shape
    torch.manual_seed(M + N + K)
    for (x_t, w_t), act in zip(itertools.product((False, True), repeat=2), ("gelu", "none", "silu", "gelu_tanh")):
        x = torch.randn(M, K, dtype=dtype)
        w = (torch.randn(N, K) * K ** -0.5).to(dtype)
        b = torch.randn(N, dtype=dtype)
        x, w = (_transposed(x) if x_t else x), (_transposed(w) if w_t else w)
        residual, scale, row_scale = torch.randn(M, N, dtype=dtype), torch.randn(N), torch.rand(M)
        kernels.clear()
        y, z = _launch(x, w, b, act, scale, row_scale, residual, preact=True)
        assert kernels == ["_linear_tma_kernel"], (x_t, w_t)
        want, want_z = _reference(x, w, b, act, scale, row_scale, residual)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
        torch.testing.assert_close(z.double(), want_z, rtol=tol, atol=tol)


@pytest.mark.parametrize("act", ["none", "gelu", "quick_gelu", "relu"])
def test_descriptor_and_pointer_kernels_agree_with_dropout(act, kernels, monkeypatch):
    """The keep mask is Philox on the element's coordinates: both kernels drop the same elements."""
    torch.manual_seed(1)
    x, w, b = torch.randn(136, 72), torch.randn(96, 72) / 8, torch.randn(96)
    residual, row_scale = torch.randn(136, 96), torch.rand(136)
    seed = torch.tensor([1234], dtype=torch.int64)
    got, _ = _launch(x, w, b, act, None, row_scale, residual, seed=seed, p=0.25)
    monkeypatch.setattr(linear_tma, "arch_takes_descriptors", lambda device: False)
    want, _ = _launch(x, w, b, act, None, row_scale, residual, seed=seed, p=0.25)
    kept, _ = _launch(x, w, b, act, None, row_scale, residual)
    assert kernels == ["_linear_tma_kernel", "_linear_kernel", "_linear_kernel"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dropped = (got == residual) & (kept != residual)  # the branch dropped to the residual alone
    assert 0.15 < dropped.float().mean() / (kept != residual).float().mean() < 0.35


def test_operands_a_descriptor_cannot_take_keep_the_pointer_kernel(kernels):
    torch.manual_seed(2)
    w, b = torch.randn(96, 64), torch.randn(96)
    cases = {
        "rows of 50 fp16 (100 bytes)": (torch.randn(17, 50).half(), torch.randn(96, 50).half(), None),
        "base off 16 bytes": (torch.randn(17, 65)[:, 1:], w, None),
        "strided along K": (torch.randn(17, 128)[:, ::2], w, None),
        "residual rows of 388 bytes": (torch.randn(17, 64), w, torch.randn(17, 97)[:, :96]),
        "broadcast rows (stride 0, a gradient of a sum)": (torch.randn(1, 64).expand(17, 64), w, None),
        "broadcast residual": (torch.randn(17, 64), w, torch.randn(1, 96).expand(17, 96)),
        "K = 0": (torch.randn(17, 0), torch.randn(96, 0), None),
    }
    for what, (x, weight, residual) in cases.items():
        kernels.clear()
        bias = b.to(x.dtype)
        y, _ = _launch(x, weight, bias, "gelu", residual=residual)
        assert kernels == ["_linear_kernel"], what
        want, _ = _reference(x, weight, bias, "gelu", None, None, residual)
        torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2, msg=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_gated_descriptor_kernel_matches_float64_and_the_pointer_kernel(dtype, kernels, monkeypatch):
    """SwiGLU's fc1 from a packed [2H, K] weight (timm's layout): Y and both halves of Z against float64
    at ragged sizes; with dropout, the pointer kernel's result exactly (the same Philox mask)."""
    torch.manual_seed(6)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for M, H, K in ((24, 96, 64), (136, 72, 48), (200, 64, 40)):
        x = torch.randn(M, K, dtype=dtype)
        w, b = (torch.randn(2 * H, K) / 8).to(dtype), torch.randn(2 * H, dtype=dtype)
        args = (x, w[:H], b[:H], w[H:], b[H:], "silu")
        y, z = torch.full((M, H), float("nan"), dtype=dtype), torch.full((M, 2 * H), float("nan"), dtype=dtype)
        kernels.clear()
        gated_linear.gated_linear_fwd(*args, y, z)
        assert kernels == ["_gated_linear_tma_kernel"]
        zg, zv = (x.double() @ w[:H].double().t() + b[:H].double(), x.double() @ w[H:].double().t() + b[H:].double())
        torch.testing.assert_close(y.double(), F.silu(zg) * zv, rtol=tol, atol=tol)
        torch.testing.assert_close(z.double(), torch.cat([zg, zv], 1), rtol=tol, atol=tol)
    seed = torch.tensor([99], dtype=torch.int64)
    dropped = [torch.empty(M, H, dtype=dtype) for _ in range(2)]
    gated_linear.gated_linear_fwd(*args, dropped[0], None, seed, 0.3, 1 / 0.7)
    monkeypatch.setattr(linear_tma, "arch_takes_descriptors", lambda device: False)
    gated_linear.gated_linear_fwd(*args, dropped[1], None, seed, 0.3, 1 / 0.7)
    assert kernels[-2:] == ["_gated_linear_tma_kernel", "_gated_linear_kernel"]
    torch.testing.assert_close(dropped[0], dropped[1], rtol=tol, atol=tol)


def test_exact_fp32_products_keep_the_pointer_kernel(kernels):
    """Without TF32 an fp32 product runs on FMAs, where the descriptor kernel's tiles spill."""
    torch.backends.cuda.matmul.allow_tf32 = False  # the fixture restores it
    x, w = torch.randn(24, 64), torch.randn(96, 64)
    y, _ = _launch(x, w, None, "none")
    assert kernels == ["_linear_kernel"]
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)


def test_backward_runs_its_transposed_products_on_the_descriptor_kernel(kernels):
    """dX = dZ · W reads W as a [K, N] operand, dW = dZᵀ · X reads both transposed: all three products
    take the descriptor kernel, with the gradients of float64's."""
    torch.manual_seed(3)
    x = torch.randn(40, 64, requires_grad=True)
    w = (torch.randn(96, 64) / 8).requires_grad_()
    b = torch.randn(96, requires_grad=True)
    residual = torch.randn(40, 96, requires_grad=True)
    y = linear_op(x, w, b, activation="gelu", residual=residual)
    y.backward(torch.cos(y.detach()))
    assert kernels.count("_linear_tma_kernel") == 3 and "_linear_kernel" not in kernels, kernels
    xd, wd, bd, rd = (t.detach().double().requires_grad_() for t in (x, w, b, residual))
    yd = F.gelu(F.linear(xd, wd, bd)) + rd
    yd.backward(torch.cos(yd.detach()))
    for got, want in ((x.grad, xd.grad), (w.grad, wd.grad), (b.grad, bd.grad), (residual.grad, rd.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_cublas_tactic_computes_every_epilogue(dtype, cublas, kernels):
    torch.manual_seed(4)
    M, N, K = 40, 96, 64
    x, w = torch.randn(M, K, dtype=dtype), (torch.randn(N, K) / 8).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for act, bias_dtype, residual, scaled, preact in (
            ("none", dtype, False, False, False), ("gelu", dtype, True, True, True),
            ("silu", torch.float32, False, False, True), ("none", torch.float32, True, False, False)):
        b = torch.randn(N, dtype=bias_dtype)
        r = torch.randn(M, N, dtype=dtype) if residual else None
        scale, row_scale = (torch.randn(N), torch.rand(M)) if scaled else (None, None)
        kernels.clear()
        y, z = _launch(x, w, b, act, scale, row_scale, r, preact=preact)
        bare = act == "none" and not residual and bias_dtype == dtype
        assert "_linear_kernel" not in kernels and "_linear_tma_kernel" not in kernels
        assert kernels.count("_epilogue_fwd_kernel") == (0 if bare else 1 + (preact and bias_dtype != dtype))
        want, want_z = _reference(x, w, b, act, scale, row_scale, r)
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol, msg=f"{act} {bias_dtype}")
        if preact:
            torch.testing.assert_close(z.double(), want_z, rtol=tol, atol=tol)
    assert {row["tactic"] for row in gemm_tactic.chosen()} == {"cublas"}


def test_cublas_tactic_trains_a_block_as_the_fused_kernel_does(cublas):
    torch.manual_seed(5)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, norm_first=True)
    x = torch.randn(2, 9, 64)
    fast = vitfast.optimize(torch.nn.Sequential(layer))
    with runtime.count_launches() as counts:
        out = fast(x)
    out.square().mean().backward()
    assert counts.get("linear", 0) + counts.get("mlp", 0) > 0, counts
    ref_layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, norm_first=True)
    ref_layer.load_state_dict(layer.state_dict())
    ref = ref_layer(x)
    ref.square().mean().backward()
    assert_parity(out, ref, ref.detach())
    for (name, p), q in zip(layer.named_parameters(), ref_layer.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert {row["tactic"] for row in gemm_tactic.chosen()} == {"cublas"}


def test_tuning_keeps_the_faster_tactic_saves_it_and_the_report_names_it(tmp_path, kernels):
    """A fake timer calls cuBLAS faster: the session keeps that tactic for the site, saves it, and a
    fresh process state launches cuBLAS from the file; ``Report.gemm_sites`` names it."""
    def timer(run):
        before = len(kernels)
        run()
        ran_fused = any(k in ("_linear_tma_kernel", "_linear_kernel") for k in kernels[before:])
        return 1.0 if ran_fused else 0.5

    x, w = torch.randn(24, 64), torch.randn(96, 64)
    with vitfast.tuning.tune(timer) as session:
        _launch(x, w, None, "gelu")
    saved = json.loads(session.written[0].read_text())["kernels"]["gemm_tactic_linear_tma"]["picks"]
    assert [pick["TACTIC"] for pick in saved.values()] == [_configs.TACTIC_CUBLAS]
    _select.reset()
    gemm_tactic.ran.clear()
    kernels.clear()
    y, _ = _launch(x, w, None, "gelu")
    assert kernels == ["_epilogue_fwd_kernel"]
    torch.testing.assert_close(y, F.gelu(x @ w.t()), rtol=1e-4, atol=1e-4)
    report = vitfast.optimize(torch.nn.Sequential(torch.nn.Linear(8, 8))).vitfast_report
    assert [(row["tactic"], "kernel" in row) for row in report.gemm_sites()] == [("cublas", False)]
    assert "cublas m=32 n=96 k=64" in str(report)
    vitfast.tuning.forget()


def test_a_model_on_the_cublas_tactic_replays_its_products(cublas, replays):
    """A settled call records cuBLAS's products (``mm``/``addmm`` with ``out=``) as steps of its own and
    replays them with its launches: the second call replays, with the first call's result exactly."""
    ran = replays
    model = _randomize(FAMILIES["timm"][0]()).eval()
    fast = vitfast.optimize(model)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        first = _logits(fast, x)
        assert not ran
        second = _logits(fast, x)
    assert ran and any(step[0] == "call" for replay in ran for step in replay.steps)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert {row["tactic"] for row in gemm_tactic.chosen()} == {"cublas"}


def test_compiling_ahead_runs_no_cublas_product(monkeypatch):
    """Inside ``_precompile.compiling()`` nothing runs: the cuBLAS tactic hands only its epilogue's launch
    on (to be compiled) and leaves the product unmade."""
    from vitfast.kernels import _precompile

    launched = []
    monkeypatch.setattr(_precompile, "active", lambda: True)
    monkeypatch.setattr(gemm_tactic, "launch", lambda fn, grid, args, meta: launched.append(fn))
    x, w = torch.randn(24, 64), torch.randn(96, 64)
    y = torch.full((24, 96), float("nan"))
    gemm_tactic.cublas_fwd(x, w, None, None, "gelu", y, None, None, None, 0.0, 1.0, None)
    assert launched == [gemm_tactic._epilogue_fwd_kernel] and y.isnan().all()
