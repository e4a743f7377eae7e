"""LayerNorm over the last dimension, optionally fused with the residual add before it: forward and
backward.

Forward memory traffic per row of width N (element size e): read x (and r), write y (and s = x + r):
2·N·e bytes without the residual, 4·N·e with it, plus 8 bytes of fp32 statistics when kept.
Backward: read dy, the normalised input and the statistics (and ds), write dx: 3·N·e (4·N·e), plus
one fp32 partial row of dweight and dbias per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tuning
from ._configs import layer_norm_config
from ._launch import launch
from ._layout import vector_stride

# Widest row one program holds in registers; wider rows take the PyTorch fallback.
MAX_WIDTH = 16384


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, Y, S, W, B, MEAN, RSTD,
    M, N,
    stride_x, stride_r, stride_y, stride_s, stride_w, stride_b,
    eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Normalise BLOCK_M rows per program.

    X: [M, N] input rows (row stride ``stride_x``, unit column stride), any float dtype.
    R: [M, N] residual, same dtype as X (read only when HAS_RESIDUAL).
    Y: [M, N] output, dtype of X.
    S: [M, N] output x + r, dtype of X, rounded before the statistics are taken so that
       Y = LayerNorm(S) exactly (written only when HAS_RESIDUAL).
    W, B: [N] affine weight and bias (any float dtype, any stride, 0 included; read as fp32).
    MEAN, RSTD: [M] fp32 statistics for the backward pass (written only when STORE_STATS).
    Statistics and the normalisation are computed in fp32; each output is cast once, on the store.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)

    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + rows64[:, None] * stride_s + cols[None, :], s, mask=mask)
        x = s
    x = x.to(tl.float32)

    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    # Rows past M hold zeros: with eps = 0 they would divide by zero (harmless, but numpy warns under
    # the interpreter), so they take 1.
    rstd = 1.0 / tl.sqrt(tl.where(row_ok, var + eps, 1.0))
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + cols.to(tl.int64) * stride_w, mask=col_ok, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols.to(tl.int64) * stride_b, mask=col_ok, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if STORE_STATS:
        tl.store(MEAN + rows64, mean, mask=row_ok)
        tl.store(RSTD + rows64, rstd, mask=row_ok)


def layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    y: torch.Tensor,
    s: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor | None,
) -> None:
    """Launch over 2-D views [M, N] whose last stride is 1 (the op guarantees it); weight and bias
    are 1-D [N] with any stride."""
    M, N = x.shape
    for t in (x, residual, y, s):
        assert t is None or (t.dim() == 2 and t.stride(1) == 1)
    if M == 0:
        return
    block_m, block_n, num_warps = layer_norm_config(N)
    dummy = y  # stands in for absent pointers; never dereferenced behind a false constexpr
    launch(_layer_norm_fwd_kernel, (triton.cdiv(M, block_m),), (
        x, residual if residual is not None else dummy, y, s if s is not None else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        mean if mean is not None else dummy, rstd if rstd is not None else dummy,
        M, N,
        x.stride(0), residual.stride(0) if residual is not None else 0,
        y.stride(0), s.stride(0) if s is not None else 0,
        vector_stride(weight), vector_stride(bias),
        eps,
    ), dict(HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, STORE_STATS=mean is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps))


@triton.jit
def _layer_norm_bwd_kernel(
    DY, DS, XIN, W, MEAN, RSTD, DX, DW_PART, DB_PART,
    M, N, ROWS_PER_PROGRAM,
    stride_dy, stride_ds, stride_xin, stride_dx, stride_w,
    HAS_DS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients of ``y = LayerNorm(xin) * w + b`` for the ROWS_PER_PROGRAM rows of one program.

    DY: [M, N] upstream gradient of y (row stride ``stride_dy``, unit column stride).
    DS: [M, N] gradient arriving on the returned sum s = x + r from outside the norm, added to the
       input gradient (read only when HAS_DS).
    XIN: [M, N] the tensor the forward normalised (x, or the stored s when the residual was fused).
    W: [N] affine weight, any float dtype, any stride, read as fp32 (when HAS_WEIGHT).
    MEAN, RSTD: [M] fp32 statistics the forward stored.
    DX: [M, N] gradient of xin (plus DS), dtype of xin (written when COMPUTE_DX).
    DW_PART, DB_PART: [num_programs, N] fp32, one row of partial sums over this program's rows of
       dy · x̂ and dy (written when COMPUTE_DW / COMPUTE_DB); the launcher reduces them.
    All arithmetic is fp32; DX is rounded once, on the store.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols.to(tl.int64) * stride_w, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid * ROWS_PER_PROGRAM
    for r0 in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        rows = first + r0 + tl.arange(0, BLOCK_M)
        row_ok = (rows < M) & (r0 + tl.arange(0, BLOCK_M) < ROWS_PER_PROGRAM)
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xin = tl.load(XIN + rows64[:, None] * stride_xin + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows64, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows64, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (xin - mean[:, None]) * rstd[:, None], 0.0)
        if COMPUTE_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if COMPUTE_DB:
            db_acc += tl.sum(dy, axis=0)
        if COMPUTE_DX:
            g = dy
            if HAS_WEIGHT:
                g = g * w[None, :]
            # d xhat / d xin removes the mean of g and its projection on xhat, then scales by rstd.
            mean_g = tl.sum(g, axis=1) / N
            mean_gx = tl.sum(g * xhat, axis=1) / N
            dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
            if HAS_DS:
                dx += tl.load(DS + rows64[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PART + pid * N + cols, dw_acc, mask=col_ok)
    if COMPUTE_DB:
        tl.store(DB_PART + pid * N + cols, db_acc, mask=col_ok)


def _backward_programs(m: int, block_m: int, compiled: bool) -> tuple[int, int]:
    """(programs, rows per program). Each program writes one fp32 partial row of the weight and bias
    gradients, so their count is capped: 512 fills an H100's 132 SMs a few times over while the
    partials stay far below the row traffic; the interpreter takes 4, so its loops run several rows."""
    blocks = triton.cdiv(m, block_m)
    rows_per_program = triton.cdiv(blocks, min(blocks, 512 if compiled else 4)) * block_m
    return triton.cdiv(m, rows_per_program), rows_per_program


def layer_norm_bwd(
    dy: torch.Tensor,
    ds: torch.Tensor | None,
    xin: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dx: torch.Tensor | None,
    compute_dw: bool,
    compute_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch over 2-D views [M, N] with unit column stride and a 1-D weight [N] with any stride;
    fills ``dx`` (when given) and returns the fp32 weight and bias gradients [N] (None where not
    asked for)."""
    M, N = xin.shape
    if M == 0:
        zeros = xin.new_zeros(N, dtype=torch.float32)
        return (zeros if compute_dw else None), (zeros.clone() if compute_db else None)
    for t in (dy, ds, xin, dx):
        assert t is None or (t.dim() == 2 and t.stride(1) == 1)
    block_m, block_n, num_warps = layer_norm_config(N)
    programs, rows_per_program = _backward_programs(M, block_m, not _tuning.interpreting())
    dw_part = torch.empty(programs if compute_dw else 0, N, dtype=torch.float32, device=xin.device)
    db_part = torch.empty(programs if compute_db else 0, N, dtype=torch.float32, device=xin.device)
    dummy = xin  # stands in for absent pointers; never dereferenced behind a false constexpr
    launch(_layer_norm_bwd_kernel, (programs,), (
        dy, ds if ds is not None else dummy, xin, weight if weight is not None else dummy,
        mean, rstd, dx if dx is not None else dummy, dw_part, db_part,
        M, N, rows_per_program,
        dy.stride(0), ds.stride(0) if ds is not None else 0, xin.stride(0),
        dx.stride(0) if dx is not None else 0, vector_stride(weight),
    ), dict(HAS_DS=ds is not None, HAS_WEIGHT=weight is not None,
            COMPUTE_DX=dx is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps))
    return (dw_part.sum(0) if compute_dw else None), (db_part.sum(0) if compute_db else None)
