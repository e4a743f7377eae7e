"""Tiled GEMM with a fused epilogue, Y = r ⊙ s ⊙ dropout(act(X · Wᵀ + b)) + R, and its backward.

X and W are read through their strides (W in ``nn.Linear`` layout [out, in]), so no transposed copy
is ever made. The product accumulates in fp32; bias, activation (exact GELU, tanh GELU, CLIP's
QuickGELU, ReLU, SiLU or none), the per-column scale s (timm's LayerScale) and the residual add happen on
the fp32 tile in registers, and the result is cast to Y's dtype once, on the store. An MLP is two
launches: fc1 + bias + GELU, then fc2 + bias (+ scale) + residual.

Training: the forward also stores the pre-activation Z = X · Wᵀ + b (one extra M·N·e write, what
PyTorch's eager autograd keeps too) instead of recomputing a GEMM in the backward. The backward is
one elementwise launch, dZ = dY ⊙ s ⊙ act'(Z), which in the same pass sums dY ⊙ act(Z) over its rows
for the scale's gradient (none at all when there is no activation, scale, dropout or row factor:
dZ = dY), then
the forward kernel twice through strides: dX = dZ · W reads W transposed, dW = dZᵀ · X reads both
operands transposed.

Dropout and stochastic depth (training): Y = R + r ⊙ s ⊙ dropout_p(act(X · Wᵀ + b)), with r a
per-row factor (stochastic depth's per-sample scale, an fp32 [M] vector). The keep mask is Philox
keyed by a seed and the element's (row, column) (``kernels/_random.py``), so the backward's
elementwise kernel regenerates it, dZ = dY ⊙ r ⊙ s ⊙ mask/(1 - p) ⊙ act'(Z): the mask is never
stored, and Z stays the undropped pre-activation.

Traffic per launch (element size e): read M·K·e of X once per column of tiles (L2 absorbs most
re-reads thanks to the grouped tile order), N·K·e of W, M·N·e of R (and 4·M bytes of r); write M·N·e
of Y. Dropout adds no memory traffic beyond the 8-byte seed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs, _select, gemm_tactic, linear_tma
from ._launch import launch
from ._layout import vector_stride
from ._gemm_epilogue import ACTIVATIONS, _activate, _activate_bwd, _tile_position, branch, gemm_keep


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for operands of ``dtype``: "ieee" for fp32 unless PyTorch allows
    TF32 (``torch.backends.cuda.matmul.allow_tf32``); it matters only for fp32, and "tf32" is the
    16-bit types' default."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


@triton.jit
def _linear_kernel(
    X, W, B, S, R, Y, Z, SEED, ROW_SCALE,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_s, stride_rm, stride_rn, stride_ym, stride_zm,
    dropout_p, keep_scale,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    STORE_PREACT: tl.constexpr, DROPOUT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One BLOCK_M × BLOCK_N tile of Y per program.

    X: [M, K] input rows, any strides (the backward reads transposed tensors here), fp32/fp16/bf16.
    W: [N, K] weight in ``nn.Linear`` layout, any strides, dtype of X.
    B: [N] bias, any float dtype, any stride (0 included), added in fp32 (read only when HAS_BIAS).
    S: [N] per-column scale multiplying the activation, any float dtype, any stride (0 included),
       applied in fp32 (read only when HAS_SCALE).
    R: [M, N] residual, any strides, dtype of X (read only when HAS_RESIDUAL).
    Y: [M, N] output (row stride ``stride_ym``, unit column stride).
    Z: [M, N] pre-activation X · Wᵀ + b in Y's dtype (row stride ``stride_zm``, unit column stride),
       written only when STORE_PREACT, for the backward (undropped, unscaled).
    SEED: [1] int64 Philox key of the dropout mask (read only when DROPOUT): act's output is kept
       with probability 1 - ``dropout_p`` and multiplied by ``keep_scale`` = 1 / (1 - dropout_p).
    ROW_SCALE: [M] contiguous fp32 per-row factor (stochastic depth), read only when HAS_ROW_SCALE.
    Tiles are walked as ``_tile_position`` orders them.
    """
    tile_m, tile_n = _tile_position(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns re-read a valid one (wrapped) so the main loop masks only on K;
    # the store drops them.
    rows_in = (rows % M).to(tl.int64)
    cols_in = (cols % N).to(tl.int64)
    x_ptrs = X + rows_in[:, None] * stride_xm + ks[None, :].to(tl.int64) * stride_xk
    w_ptrs = W + cols_in[None, :] * stride_wn + ks[:, None].to(tl.int64) * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    mask = (rows < M)[:, None] & col_ok[None, :]
    cols64 = cols.to(tl.int64)
    if HAS_BIAS:
        acc += tl.load(B + cols64 * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if STORE_PREACT:
        tl.store(Z + rows64[:, None] * stride_zm + cols[None, :], acc.to(Z.dtype.element_ty), mask=mask)
    acc = branch(acc, rows, cols, M, N, S, stride_s, SEED, ROW_SCALE, dropout_p, keep_scale, ACTIVATION, DROPOUT,
                 HAS_SCALE, HAS_ROW_SCALE)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64[:, None] * stride_rm + cols64[None, :] * stride_rn, mask=mask, other=0.0)
        acc += r.to(tl.float32)
    tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=mask)


LINEAR = _select.kernel("linear", _linear_kernel, _configs.linear_rule, _configs.linear_candidates,
                        _configs.gemm_interpreter)
gemm_tactic.declare(LINEAR)


def gemm_key(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, activation: str,
             residual: torch.Tensor | None, z: torch.Tensor | None, seed: torch.Tensor | None) -> _configs.GemmKey:
    """The launch key of ``linear_fwd``'s arguments: what its configs and tactic are chosen by."""
    return _configs.GemmKey(triton.next_power_of_2(x.shape[0]), weight.shape[0], x.shape[1], x.dtype, y.dtype,
                            x.stride(1) == 1, weight.stride(1) == 1, input_precision(x.dtype), activation,
                            residual is not None, z is not None, seed is not None)


def linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    y: torch.Tensor,
    z: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    keep_scale: float = 1.0,
    row_scale: torch.Tensor | None = None,
) -> None:
    """Launch over 2-D views: x [M, K], weight [N, K] and residual [M, N] with any strides, 1-D bias
    and scale [N] with any stride; y [M, N] (and z [M, N], which receives the pre-activation when
    given) with unit column stride. Given ``seed`` (int64 [1]), act's output drops with probability
    ``dropout_p`` and survivors are multiplied by ``keep_scale``; ``row_scale`` (contiguous fp32 [M])
    multiplies each row after the scale."""
    M, K = x.shape
    N = weight.shape[0]
    assert y.stride(1) == 1 and (z is None or z.stride(1) == 1) and activation in ACTIVATIONS
    assert seed is None or (seed.dtype == torch.int64 and seed.numel() == 1)
    assert row_scale is None or (row_scale.shape == (M,) and row_scale.dtype == torch.float32
                                 and row_scale.is_contiguous())
    if M == 0 or N == 0:
        return
    key = gemm_key(x, weight, y, activation, residual, z, seed)
    precision = key.precision
    meta = dict(ACTIVATION=activation, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
                HAS_RESIDUAL=residual is not None, STORE_PREACT=z is not None, DROPOUT=seed is not None,
                HAS_ROW_SCALE=row_scale is not None, INPUT_PRECISION=precision)

    device = x.get_device()
    if linear_tma.eligible(precision, x, weight, y, z, residual) and linear_tma.arch_takes_descriptors(device):
        kernel = linear_tma.LINEAR_TMA
        run_fused = linear_tma.launcher(x, weight, bias, scale, residual, y, z, seed, row_scale, dropout_p,
                                        keep_scale, meta)
    else:
        kernel = LINEAR
        args = (
            x, weight, bias if bias is not None else y, scale if scale is not None else y,
            residual if residual is not None else y, y, z if z is not None else y,
            seed if seed is not None else y, row_scale if row_scale is not None else y,
            M, N, K,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), vector_stride(bias), vector_stride(scale),
            residual.stride(0) if residual is not None else 0, residual.stride(1) if residual is not None else 0,
            y.stride(0), z.stride(0) if z is not None else 0,
            float(dropout_p), float(keep_scale),
        )

        def run_fused(cfg: triton.Config) -> None:
            grid = (triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(N, cfg.kwargs["BLOCK_N"]),)
            launch(_linear_kernel, grid, args, {**meta, **_select.tile_meta(cfg)})
    fused = _select.config(kernel, device, key, run_fused)  # chosen (measured) before the tactic is

    def run(tactic: triton.Config) -> None:
        if tactic.kwargs["TACTIC"] == gemm_tactic.CUBLAS:
            gemm_tactic.cublas_fwd(x, weight, bias, residual, activation, y, z, scale, seed, dropout_p, keep_scale,
                                   row_scale)
        else:
            run_fused(fused)

    tactic = _select.config(gemm_tactic.TACTICS[kernel.name], device, key, run)
    gemm_tactic.ran[device, key] = (tactic, kernel, fused)
    run(tactic)


@triton.jit
def _epilogue_bwd_kernel(
    DY, Z, S, DZ, DS_PART, SEED, ROW_SCALE, M, N,
    stride_dym, stride_dyn, stride_zm, stride_s, stride_dzm,
    dropout_p, keep_scale,
    ACTIVATION: tl.constexpr, HAS_SCALE: tl.constexpr, STORE_DZ: tl.constexpr, COMPUTE_DSCALE: tl.constexpr,
    READ_Z: tl.constexpr, DROPOUT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward of the epilogue r ⊙ s ⊙ dropout(act(Z)) on one BLOCK_M × BLOCK_N tile, in fp32.

    DY: [M, N] upstream gradient of Y, any strides (autograd may hand in an expanded tensor).
    Z: [M, N] pre-activation the forward stored (row stride ``stride_zm``, unit column stride);
       read when READ_Z (there is an activation, or COMPUTE_DSCALE).
    S: [N] the forward's scale, any float dtype and stride (read when HAS_SCALE).
    SEED: [1] int64, the forward's dropout key (read when DROPOUT): the kernel regenerates the
       forward's keep mask M and multiplies by M · ``keep_scale``.
    ROW_SCALE: [M] contiguous fp32, the forward's per-row factor r (read when HAS_ROW_SCALE).
    DZ: [M, N] dY ⊙ r ⊙ s ⊙ M·keep_scale ⊙ act'(Z), dtype of Z, rounded once on the store (row stride
       ``stride_dzm``, unit column stride; written when STORE_DZ).
    DS_PART: [cdiv(M, BLOCK_M), N] contiguous fp32: row ``program_id(0)`` receives this tile's column
       sums of dY ⊙ r ⊙ M·keep_scale ⊙ act(Z), the scale's gradient before the launcher adds the rows
       up (COMPUTE_DSCALE).
    """
    pid_m = tl.program_id(0)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    cols64 = cols.to(tl.int64)
    g = tl.load(DY + rows[:, None] * stride_dym + cols64[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
    if HAS_ROW_SCALE:
        g *= tl.load(ROW_SCALE + rows, mask=rows < M, other=0.0)[:, None]
    if DROPOUT:
        kept = gemm_keep(SEED, rows[:, None], cols[None, :], dropout_p)
    if READ_Z:
        z = tl.load(Z + rows[:, None] * stride_zm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if COMPUTE_DSCALE:
        # The forward's dropped activation, selected as the forward did (a dropped inf is 0, not NaN).
        a = _activate(z, ACTIVATION)
        if DROPOUT:
            a = tl.where(kept, a * keep_scale, 0.0)
        # Masked elements load dY = 0, so they add nothing.
        tl.store(DS_PART + pid_m.to(tl.int64) * N + cols, tl.sum(g * a, axis=0), mask=col_ok)
    if STORE_DZ:
        if DROPOUT:
            g = tl.where(kept, g * keep_scale, 0.0)
        if HAS_SCALE:
            g *= tl.load(S + cols64 * stride_s, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION != "none":  # z is read only then
            g = _activate_bwd(g, z, ACTIVATION)
        tl.store(DZ + rows[:, None] * stride_dzm + cols[None, :], g.to(DZ.dtype.element_ty), mask=mask)


def epilogue_bwd(
    dy: torch.Tensor,
    z: torch.Tensor | None,
    scale: torch.Tensor | None,
    activation: str,
    dz: torch.Tensor | None,
    compute_dscale: bool,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    keep_scale: float = 1.0,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Fill ``dz`` [M, N] (unit column stride; when given) with dy ⊙ row_scale ⊙ scale ⊙ mask·keep_scale
    ⊙ act'(z) and return the scale's fp32 gradient [N], Σ_rows dy ⊙ row_scale ⊙ mask·keep_scale ⊙
    act(z), when ``compute_dscale``. dy [M, N] has any strides; z [M, N] unit column stride (needed for
    an activation or the scale's gradient); scale [N] any stride; the mask is regenerated from
    ``seed`` and ``dropout_p`` as the forward drew it (none without a seed); row_scale is contiguous
    fp32 [M]."""
    M, N = dy.shape
    assert activation in ACTIVATIONS
    assert z is not None or (activation == "none" and not compute_dscale)
    for t in (z, dz):
        assert t is None or (t.shape == (M, N) and t.stride(1) == 1)
    assert row_scale is None or (row_scale.shape == (M,) and row_scale.dtype == torch.float32
                                 and row_scale.is_contiguous())
    block_m, block_n = 32, 128
    dscale_part = torch.empty(triton.cdiv(M, block_m) if compute_dscale else 0, N, dtype=torch.float32,
                              device=dy.device)
    if M > 0 and N > 0 and (dz is not None or compute_dscale):
        dummy = dscale_part if dz is None else dz  # stands in for absent pointers, never dereferenced
        launch(_epilogue_bwd_kernel, (triton.cdiv(M, block_m), triton.cdiv(N, block_n)), (
            dy, dummy if z is None else z, dummy if scale is None else scale, dummy if dz is None else dz,
            dscale_part, dummy if seed is None else seed, dummy if row_scale is None else row_scale, M, N,
            dy.stride(0), dy.stride(1), 0 if z is None else z.stride(0), vector_stride(scale),
            0 if dz is None else dz.stride(0), float(dropout_p), float(keep_scale),
        ), dict(ACTIVATION=activation, HAS_SCALE=scale is not None, STORE_DZ=dz is not None,
                COMPUTE_DSCALE=compute_dscale, READ_Z=activation != "none" or compute_dscale,
                DROPOUT=seed is not None, HAS_ROW_SCALE=row_scale is not None,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4))
    return dscale_part.sum(0) if compute_dscale else None


def linear_bwd(
    dz: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    dx: torch.Tensor | None,
    dw: torch.Tensor | None,
) -> None:
    """The two GEMMs of the backward, both on the forward kernel through strides, no copies:
    dx [M, K] = dz · weight (weight [N, K] read as an [K, N] "nn.Linear" weight) and
    dw [N, K] = dzᵀ · x (dz [M, N] read as [N, M] rows, x [M, K] as a [K, M] weight).
    ``dz`` has any strides; ``dx``/``dw`` (unit column stride) are filled when given."""
    if dx is not None:
        linear_fwd(dz, weight.t(), None, None, "none", dx)
    if dw is not None:
        linear_fwd(dz.t(), x.t(), None, None, "none", dw)
