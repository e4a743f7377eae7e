"""The Hopper kernel of ``gated_linear`` (SwiGLU, GeGLU): ``gated_linear._gated_linear_kernel``'s
product and epilogue, Y = dropout(act(X · Wgᵀ + bg) ⊙ (X · Wvᵀ + bv)), shaped as ``linear_tma``'s:

* X, both weights, Y and both halves of the pre-activation Z = [Zg | Zv] through tensor descriptors
  (TMA on sm_90): each X tile is copied once and feeds both products' wgmma;
* a persistent grid (at most one program per SM) walking the output tiles in grouped order;
* the epilogue in ``EPILOGUE_SLICES`` column slices of the two accumulators.

``linear_tma.eligible`` decides for it as for ``linear`` (X, each weight, Y), plus Z's value half,
which starts H columns in and so needs 16-byte-aligned H·e; the rest keep the pointer kernel.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from . import _configs, _select
from ._gemm_epilogue import _activate, _tile_position, gemm_keep
from ._launch import launch
from ._layout import vector_stride
from .linear_tma import (TMA_ALIGN, _column_slices, ensure_allocator, operand_desc, operand_layout, operand_tile,
                         programs_per_wave)
from .linear_tma import eligible as linear_eligible
from ._tuning import interpreting


@triton.jit
def _gated_slice(acc_g, acc_v, off_m, off_n, H, y_desc, zg_desc, zv_desc, BG, BV, SEED, stride_bg, stride_bv,
                 dropout_p, keep_scale, ACTIVATION: tl.constexpr, HAS_GATE_BIAS: tl.constexpr,
                 HAS_VALUE_BIAS: tl.constexpr, STORE_PREACT: tl.constexpr, DROPOUT: tl.constexpr):
    """The epilogue of one column slice of both accumulators at output (``off_m``, ``off_n``)."""
    rows = off_m + tl.arange(0, acc_g.shape[0])
    cols = off_n + tl.arange(0, acc_g.shape[1])
    col_ok = cols < H
    if HAS_GATE_BIAS:
        acc_g += tl.load(BG + cols.to(tl.int64) * stride_bg, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_VALUE_BIAS:
        acc_v += tl.load(BV + cols.to(tl.int64) * stride_bv, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if STORE_PREACT:
        zg_desc.store([off_m, off_n], acc_g.to(zg_desc.dtype))
        zv_desc.store([off_m, off_n], acc_v.to(zv_desc.dtype))
    y = _activate(acc_g, ACTIVATION) * acc_v
    if DROPOUT:  # where, not a multiply by 0: an infinite product drops to 0, not NaN
        y = tl.where(gemm_keep(SEED, rows[:, None], cols[None, :], dropout_p), y * keep_scale, 0.0)
    y_desc.store([off_m, off_n], y.to(y_desc.dtype))


@triton.jit
def _gated_linear_tma_kernel(
    X, WG, WV, BG, BV, Y, Z, SEED,
    M, H, K,
    stride_x, stride_wg, stride_wv, stride_bg, stride_bv, stride_y, stride_z,
    dropout_p, keep_scale, NUM_PROGRAMS,
    ACTIVATION: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, HAS_VALUE_BIAS: tl.constexpr,
    STORE_PREACT: tl.constexpr, DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    X_T: tl.constexpr, WG_T: tl.constexpr, WV_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SLICES: tl.constexpr,
):
    """Output tiles ``program_id(0)``, + NUM_PROGRAMS, ... of the M × H output, in grouped order.

    X: [M, K], unit stride along K and row stride ``stride_x`` (X_T: stored [K, M]). WG, WV: [H, K]
    in ``nn.Linear`` layout, row strides ``stride_wg``, ``stride_wv`` (WG_T, WV_T: stored [K, H]).
    Y: [M, H] and Z: [M, 2H] with unit column stride (row strides ``stride_y``, ``stride_z``); Z's
    gate half in columns [0, H), its value half in [H, 2H), written when STORE_PREACT. Bases and row
    strides 16-byte aligned, H·e too when STORE_PREACT. The rest as ``_gated_linear_kernel``.
    """
    SLICE_N: tl.constexpr = BLOCK_N // EPILOGUE_SLICES
    x_desc = operand_desc(X, M, K, stride_x, BLOCK_M, BLOCK_K, X_T)
    wg_desc = operand_desc(WG, H, K, stride_wg, BLOCK_N, BLOCK_K, WG_T)
    wv_desc = operand_desc(WV, H, K, stride_wv, BLOCK_N, BLOCK_K, WV_T)
    y_desc = tl.make_tensor_descriptor(Y, [M, H], [stride_y, 1], [BLOCK_M, SLICE_N])
    zg_desc = y_desc
    zv_desc = y_desc
    if STORE_PREACT:  # two [M, H] halves: a store past H in one never reaches the other
        zg_desc = tl.make_tensor_descriptor(Z, [M, H], [stride_z, 1], [BLOCK_M, SLICE_N])
        zv_desc = tl.make_tensor_descriptor(Z + H, [M, H], [stride_z, 1], [BLOCK_M, SLICE_N])

    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(H, BLOCK_N)
    for tile in range(tl.program_id(0), tiles, NUM_PROGRAMS):
        tile_m, tile_n = _tile_position(tile, M, H, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = tile_m * BLOCK_M
        off_n = tile_n * BLOCK_N
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_v = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            x = operand_tile(x_desc, off_m, k, X_T)
            wg = tl.trans(operand_tile(wg_desc, off_n, k, WG_T))
            wv = tl.trans(operand_tile(wv_desc, off_n, k, WV_T))
            acc_g = tl.dot(x, wg, acc_g, input_precision=INPUT_PRECISION)
            acc_v = tl.dot(x, wv, acc_v, input_precision=INPUT_PRECISION)
        gates = _column_slices(acc_g, EPILOGUE_SLICES)
        values = _column_slices(acc_v, EPILOGUE_SLICES)
        for i in tl.static_range(EPILOGUE_SLICES):
            _gated_slice(gates[i], values[i], off_m, off_n + i * SLICE_N, H, y_desc, zg_desc, zv_desc, BG, BV, SEED,
                         stride_bg, stride_bv, dropout_p, keep_scale, ACTIVATION, HAS_GATE_BIAS, HAS_VALUE_BIAS,
                         STORE_PREACT, DROPOUT)


def eligible(precision: str, x: torch.Tensor, gate_weight: torch.Tensor, value_weight: torch.Tensor,
             y: torch.Tensor, z: torch.Tensor | None) -> bool:
    """Whether a ``gated_linear`` launch can take the descriptor kernel (``linear_tma.eligible`` for
    each product, and Z's value half aligned)."""
    if not (linear_eligible(precision, x, gate_weight, y, z) and linear_eligible(precision, x, value_weight, y)):
        return False
    return z is None or (gate_weight.shape[0] * z.element_size()) % TMA_ALIGN == 0


def launcher(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor | None, value_weight: torch.Tensor,
             value_bias: torch.Tensor | None, y: torch.Tensor, z: torch.Tensor | None, seed: torch.Tensor | None,
             dropout_p: float, keep_scale: float, meta: dict) -> Callable[[triton.Config], None]:
    """``gated_linear.gated_linear_fwd``'s launch on the descriptor kernel (``eligible`` holds), as a
    function of the config; ``meta`` the flags."""
    M, K = x.shape
    H = gate_weight.shape[0]
    x_t, wg_t, wv_t = operand_layout(x), operand_layout(gate_weight), operand_layout(value_weight)
    args = (
        x, gate_weight, value_weight, gate_bias if gate_bias is not None else y,
        value_bias if value_bias is not None else y, y, z if z is not None else y, seed if seed is not None else y,
        M, H, K,
        x.stride(1 if x_t else 0), gate_weight.stride(1 if wg_t else 0), value_weight.stride(1 if wv_t else 0),
        vector_stride(gate_bias), vector_stride(value_bias), y.stride(0), z.stride(0) if z is not None else 0,
        float(dropout_p), float(keep_scale),
    )
    wave = programs_per_wave(x.get_device())
    if not interpreting():
        ensure_allocator()

    def run(cfg: triton.Config) -> None:
        programs = min(triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(H, cfg.kwargs["BLOCK_N"]), wave)
        launch(_gated_linear_tma_kernel, (programs,), (*args, programs),
               {**meta, "X_T": x_t, "WG_T": wg_t, "WV_T": wv_t, **_select.tile_meta(cfg)})
    return run


GATED_LINEAR_TMA = _select.kernel("gated_linear_tma", _gated_linear_tma_kernel, _configs.gated_linear_tma_rule,
                                  _configs.gated_linear_tma_candidates, _configs.gemm_tma_interpreter)
