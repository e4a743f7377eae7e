"""Tiled GEMM with a fused epilogue: Y = act(X · Wᵀ + b) + R.

W is read in ``nn.Linear`` layout [out, in] through its strides, so no transposed copy is made. The
product accumulates in fp32; bias, activation (exact GELU, tanh GELU, ReLU or none) and the residual
add happen on the fp32 tile in registers, and the result is cast to Y's dtype once, on the store.
An MLP is two launches: fc1 + bias + GELU, then fc2 + bias + residual.

Traffic per launch (element size e): read M·K·e of X once per column of tiles (L2 absorbs most
re-reads thanks to the grouped tile order), N·K·e of W, M·N·e of R; write M·N·e of Y.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "relu")

# H100/H200 shared memory per block (227 KiB opt-in); configs whose pipeline needs more are pruned.
_SMEM_BYTES = 227 * 1024
# Accumulator registers per thread above which a config spills.
_MAX_ACC_REGS = 128


def _hopper_configs() -> list[triton.Config]:
    """A short list of tile shapes that do well on Hopper for ViT widths (768..4096)."""
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps
        (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
        (128, 256, 32, 4, 8), (256, 64, 64, 4, 4), (64, 256, 64, 4, 4), (128, 64, 64, 4, 4),
        (64, 128, 64, 5, 4), (128, 128, 32, 5, 4), (64, 64, 64, 5, 4), (64, 64, 32, 5, 4),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_stages=stages, num_warps=warps)
            for bm, bn, bk, stages, warps in shapes]


def _interpreter_configs() -> list[triton.Config]:
    # One small tile keeps interpreter runs deterministic; 64×64 runs 2.5× faster there than 32×32
    # and still leaves ragged edges at the odd test sizes (M = 17, 591; N = 96; K = 100).
    return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8},
                          num_stages=1, num_warps=4)]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs that cannot fit (shared memory, registers) or that overshoot the problem."""
    M, N, K = named_args["M"], named_args["N"], named_args["K"]
    elem = named_args["X"].element_size()
    m_cap, n_cap = max(64, triton.next_power_of_2(M)), max(64, triton.next_power_of_2(N))
    k_cap = max(32, triton.next_power_of_2(K))
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        smem = c.num_stages * (bm + bn) * bk * elem
        acc_regs = bm * bn // (32 * c.num_warps)
        if smem <= _SMEM_BYTES and acc_regs <= _MAX_ACC_REGS and bm <= m_cap and bn <= n_cap and bk <= k_cap:
            kept.append(c)
    # Never empty: the smallest tile fits every problem.
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]


def _interpreting() -> bool:
    # kernels/ sits above vitfast.runtime in the layering, so it reads the switch itself.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.autotune(
    configs=_interpreter_configs() if _interpreting() else _hopper_configs(),
    key=["M_BUCKET", "N", "K", "INPUT_PRECISION"],  # dtypes join the key by themselves
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _linear_kernel(
    X, W, B, R, Y,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_wk, stride_rm, stride_rn, stride_ym,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One BLOCK_M × BLOCK_N tile of Y per program.

    X: [M, K] input rows (row stride ``stride_xm``, unit column stride), fp32/fp16/bf16.
    W: [N, K] weight in ``nn.Linear`` layout, any strides, dtype of X.
    B: [N] bias, dtype of X (read only when HAS_BIAS).
    R: [M, N] residual, any strides, dtype of X (read only when HAS_RESIDUAL).
    Y: [M, N] output (row stride ``stride_ym``, unit column stride).
    M_BUCKET only keys the autotuner. Programs walk the tiles in groups of GROUP_M row-tiles so that
    consecutive programs share W's column tiles and X's row tiles in L2.
    """
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group_start = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - group_start, GROUP_M)
    within = pid % per_group
    tile_m = group_start + within % group_rows
    tile_n = within // group_rows

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns re-read a valid one (wrapped) so the main loop masks only on K;
    # the store drops them.
    rows_in = (rows % M).to(tl.int64)
    cols_in = (cols % N).to(tl.int64)
    x_ptrs = X + rows_in[:, None] * stride_xm + ks[None, :]
    w_ptrs = W + cols_in[None, :] * stride_wn + ks[:, None].to(tl.int64) * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk

    col_ok = cols < N
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == "gelu":
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # 0.5·(1 + tanh(u)) = sigmoid(2u), with u = sqrt(2/π)·(a + 0.044715·a³).
        u2 = 1.5957691216057308 * (acc + 0.044715 * acc * acc * acc)
        # The floor keeps exp(-u2) finite; it moves the result by less than 1e-33.
        acc = acc * tl.sigmoid(tl.maximum(u2, -80.0))
    elif ACTIVATION == "relu":
        acc = tl.maximum(acc, 0.0)

    rows64 = rows.to(tl.int64)
    mask = (rows < M)[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:
        r = tl.load(R + rows64[:, None] * stride_rm + cols[None, :].to(tl.int64) * stride_rn, mask=mask, other=0.0)
        acc += r.to(tl.float32)
    tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=mask)


def linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    y: torch.Tensor,
) -> None:
    """Launch over 2-D views: x [M, K] and y [M, N] with unit column stride (the op guarantees it),
    weight [N, K] and residual [M, N] with any strides."""
    M, K = x.shape
    N = weight.shape[0]
    assert x.stride(1) == 1 and y.stride(1) == 1 and activation in ACTIVATIONS
    if M == 0 or N == 0:
        return
    tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    # input_precision matters only for fp32 operands; "tf32" is the 16-bit types' default.
    precision = "ieee" if x.dtype == torch.float32 and not tf32 else "tf32"

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _linear_kernel[grid](
        x, weight, bias if bias is not None else y, residual if residual is not None else y, y,
        M, N, K, triton.next_power_of_2(M),
        x.stride(0), weight.stride(0), weight.stride(1),
        residual.stride(0) if residual is not None else 0, residual.stride(1) if residual is not None else 0,
        y.stride(0),
        ACTIVATION=activation, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        INPUT_PRECISION=precision,
    )
