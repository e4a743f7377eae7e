"""Gated GEMM (GLU: SwiGLU, GeGLU), Y = act(X · Wgᵀ + bg) ⊙ (X · Wvᵀ + bv), and its backward.

One program computes one BLOCK_M × BLOCK_N tile of Y with two fp32 accumulators, the gate columns and
the value columns: both products share each X tile the program loads, so X is read as often as for
one plain GEMM of width H while the two GEMMs of the unfused composite read it twice and write both
[M, H] products out, then read them back for act and the product. Both biases, the activation and
the product run on the fp32 tiles in registers; Y is cast to its dtype once, on the store. The
weights are read through their strides (``nn.Linear`` layout [H, K]), so the two halves of one packed
[2H, K] weight (timm's ``GluMlp``/``SwiGLUPacked``) are read in place.

Training: the forward also stores both pre-activations Z = [Zg | Zv] (one extra 2·M·H·e write), as
``linear`` stores its pre-activation. The backward is one elementwise launch, dZg = dY ⊙ Zv ⊙ act'(Zg)
and dZv = dY ⊙ act(Zg), then GEMMs on the linear kernel through strides (see ``ops.gated_linear``).

Dropout (timm SwiGLU's ``drop1``, training): Y = dropout_p(act(Zg) ⊙ Zv) in the same epilogue, the
keep mask Philox keyed by a seed and the element's (row, column) of Y (``kernels/_random.py``, the
GEMM site, as ``linear``). The backward's elementwise launch regenerates it and starts from
dY ⊙ mask/(1 - p): the mask is never stored, and Z stays undropped.

Traffic per forward launch (element size e): M·K·e of X once per column of tiles (L2 absorbs most
re-reads), 2·H·K·e of weights, M·H·e of Y written (plus 2·M·H·e of Z when training).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs, _select, gated_linear_tma, linear_tma
from ._launch import launch
from ._layout import vector_stride
from ._gemm_epilogue import ACTIVATIONS, _activate, _activate_bwd, _tile_position, gemm_keep
from .linear import input_precision


@triton.jit
def _gated_linear_kernel(
    X, WG, WV, BG, BV, Y, Z, SEED,
    M, H, K,
    stride_xm, stride_xk, stride_wgn, stride_wgk, stride_wvn, stride_wvk, stride_bg, stride_bv, stride_ym, stride_zm,
    dropout_p, keep_scale,
    ACTIVATION: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, HAS_VALUE_BIAS: tl.constexpr,
    STORE_PREACT: tl.constexpr, DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One BLOCK_M × BLOCK_N tile of Y per program.

    X: [M, K] input rows, any strides, fp32/fp16/bf16.
    WG, WV: [H, K] gate and value weights in ``nn.Linear`` layout, any strides, dtype of X.
    BG, BV: [H] gate and value biases, any float dtype, any stride (0 included), added in fp32 (read
       only when HAS_GATE_BIAS / HAS_VALUE_BIAS).
    Y: [M, H] act(X · WGᵀ + BG) ⊙ (X · WVᵀ + BV) (row stride ``stride_ym``, unit column stride).
    Z: [M, 2H] pre-activations in Y's dtype, the gate's X · WGᵀ + BG in columns [0, H) and the value's
       X · WVᵀ + BV in [H, 2H) (row stride ``stride_zm``, unit column stride), written only when
       STORE_PREACT, for the backward (undropped).
    SEED: [1] int64 Philox key of Y's dropout mask (read only when DROPOUT): each element of Y is kept
       with probability 1 - ``dropout_p`` and multiplied by ``keep_scale`` = 1 / (1 - dropout_p).
    Tiles are walked as ``_tile_position`` orders them.
    """
    tile_m, tile_n = _tile_position(tl.program_id(0), M, H, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns re-read a valid one (wrapped) so the main loop masks only on K;
    # the stores drop them.
    rows_in = (rows % M).to(tl.int64)
    cols_in = (cols % H).to(tl.int64)
    ks64 = ks.to(tl.int64)
    x_ptrs = X + rows_in[:, None] * stride_xm + ks64[None, :] * stride_xk
    wg_ptrs = WG + cols_in[None, :] * stride_wgn + ks64[:, None] * stride_wgk
    wv_ptrs = WV + cols_in[None, :] * stride_wvn + ks64[:, None] * stride_wvk

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=k_ok[:, None], other=0.0)
        wv = tl.load(wv_ptrs, mask=k_ok[:, None], other=0.0)
        acc_g = tl.dot(x, wg, acc_g, input_precision=INPUT_PRECISION)
        acc_v = tl.dot(x, wv, acc_v, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wgk
        wv_ptrs += BLOCK_K * stride_wvk

    col_ok = cols < H
    rows64 = rows.to(tl.int64)
    mask = (rows < M)[:, None] & col_ok[None, :]
    cols64 = cols.to(tl.int64)
    if HAS_GATE_BIAS:
        acc_g += tl.load(BG + cols64 * stride_bg, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_VALUE_BIAS:
        acc_v += tl.load(BV + cols64 * stride_bv, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if STORE_PREACT:
        z_ptrs = Z + rows64[:, None] * stride_zm + cols64[None, :]
        tl.store(z_ptrs, acc_g.to(Z.dtype.element_ty), mask=mask)
        tl.store(z_ptrs + H, acc_v.to(Z.dtype.element_ty), mask=mask)
    y = _activate(acc_g, ACTIVATION) * acc_v
    if DROPOUT:  # where, not a multiply by 0: an infinite product drops to 0, not NaN
        y = tl.where(gemm_keep(SEED, rows[:, None], cols[None, :], dropout_p), y * keep_scale, 0.0)
    tl.store(Y + rows64[:, None] * stride_ym + cols64[None, :], y.to(Y.dtype.element_ty), mask=mask)


GATED_LINEAR = _select.kernel("gated_linear", _gated_linear_kernel, _configs.gated_linear_rule,
                              _configs.gated_linear_candidates, _configs.gemm_interpreter)


def gated_linear_fwd(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    value_weight: torch.Tensor,
    value_bias: torch.Tensor | None,
    activation: str,
    y: torch.Tensor,
    z: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    keep_scale: float = 1.0,
) -> None:
    """Launch over 2-D views: x [M, K] and the weights [H, K] with any strides, 1-D biases [H] with any
    stride; y [M, H] (and z [M, 2H], which receives [gate | value] pre-activations when given) with
    unit column stride. Given ``seed`` (int64 [1]), y's elements drop with probability ``dropout_p``
    and survivors are multiplied by ``keep_scale``."""
    M, K = x.shape
    H = gate_weight.shape[0]
    assert y.stride(1) == 1 and activation in ACTIVATIONS
    assert z is None or (z.shape == (M, 2 * H) and z.stride(1) == 1)
    assert seed is None or (seed.dtype == torch.int64 and seed.numel() == 1)
    if M == 0 or H == 0:
        return
    precision = input_precision(x.dtype)
    args = (
        x, gate_weight, value_weight, gate_bias if gate_bias is not None else y,
        value_bias if value_bias is not None else y, y, z if z is not None else y, seed if seed is not None else y,
        M, H, K,
        x.stride(0), x.stride(1), gate_weight.stride(0), gate_weight.stride(1),
        value_weight.stride(0), value_weight.stride(1), vector_stride(gate_bias), vector_stride(value_bias),
        y.stride(0), z.stride(0) if z is not None else 0, float(dropout_p), float(keep_scale),
    )
    meta = dict(ACTIVATION=activation, HAS_GATE_BIAS=gate_bias is not None, HAS_VALUE_BIAS=value_bias is not None,
                STORE_PREACT=z is not None, DROPOUT=seed is not None, INPUT_PRECISION=precision)
    key = _configs.GemmKey(triton.next_power_of_2(M), H, K, x.dtype, y.dtype, x.stride(1) == 1,
                           gate_weight.stride(1) == 1 and value_weight.stride(1) == 1, precision, activation,
                           False, z is not None, seed is not None)

    device = x.get_device()
    if (gated_linear_tma.eligible(precision, x, gate_weight, value_weight, y, z)
            and linear_tma.arch_takes_descriptors(device)):
        kernel = gated_linear_tma.GATED_LINEAR_TMA
        run = gated_linear_tma.launcher(x, gate_weight, gate_bias, value_weight, value_bias, y, z, seed, dropout_p,
                                        keep_scale, meta)
    else:
        kernel = GATED_LINEAR

        def run(cfg: triton.Config) -> None:
            grid = (triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(H, cfg.kwargs["BLOCK_N"]),)
            launch(_gated_linear_kernel, grid, args, {**meta, **_select.tile_meta(cfg)})
    run(_select.config(kernel, device, key, run))


@triton.jit
def _gated_epilogue_bwd_kernel(
    DY, Z, DZ, SEED, M, H,
    stride_dym, stride_dyn, stride_zm, stride_dzm,
    dropout_p, keep_scale,
    ACTIVATION: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward of the epilogue dropout(act(Zg) ⊙ Zv) on one BLOCK_M × BLOCK_N tile, in fp32.

    DY: [M, H] upstream gradient of Y, any strides (autograd may hand in an expanded tensor).
    Z: [M, 2H] the forward's pre-activations [Zg | Zv] (row stride ``stride_zm``, unit column stride).
    DZ: [M, 2H] receives [dY ⊙ Zv ⊙ act'(Zg) | dY ⊙ act(Zg)] in Z's dtype, rounded once on the store
       (row stride ``stride_dzm``, unit column stride); with DROPOUT, dY is first replaced by
       dY ⊙ M·``keep_scale``, M the forward's keep mask regenerated from SEED ([1] int64).
    """
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    g = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        g = tl.where(gemm_keep(SEED, rows[:, None], cols[None, :], dropout_p), g * keep_scale, 0.0)
    z_ptrs = Z + rows[:, None] * stride_zm + cols[None, :]
    zg = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
    zv = tl.load(z_ptrs + H, mask=mask, other=0.0).to(tl.float32)
    dz_ptrs = DZ + rows[:, None] * stride_dzm + cols[None, :]
    tl.store(dz_ptrs, _activate_bwd(g * zv, zg, ACTIVATION).to(DZ.dtype.element_ty), mask=mask)
    tl.store(dz_ptrs + H, (g * _activate(zg, ACTIVATION)).to(DZ.dtype.element_ty), mask=mask)


def gated_epilogue_bwd(dy: torch.Tensor, z: torch.Tensor, activation: str, dz: torch.Tensor,
                       seed: torch.Tensor | None = None, dropout_p: float = 0.0, keep_scale: float = 1.0) -> None:
    """Fill ``dz`` [M, 2H] with [g ⊙ zv ⊙ act'(zg) | g ⊙ act(zg)] from dy [M, H] (any strides) and the
    forward's z = [zg | zv] [M, 2H], g = dy, or dy ⊙ mask·keep_scale with the forward's keep mask
    regenerated from ``seed`` and ``dropout_p``; z and dz have unit column stride."""
    M, H = dy.shape
    assert activation in ACTIVATIONS
    for t in (z, dz):
        assert t.shape == (M, 2 * H) and t.stride(1) == 1
    if M == 0 or H == 0:
        return
    block_m, block_n = 32, 128
    launch(_gated_epilogue_bwd_kernel, (triton.cdiv(M, block_m), triton.cdiv(H, block_n)), (
        dy, z, dz, dz if seed is None else seed, M, H, dy.stride(0), dy.stride(1), z.stride(0), dz.stride(0),
        float(dropout_p), float(keep_scale),
    ), dict(ACTIVATION=activation, DROPOUT=seed is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4))
