"""Patch embedding as one GEMM: im2col in the A-operand loads, bias + position embedding + CLS row in
the epilogue, one launch writing the whole token buffer. Backward: two GEMMs, the weight gradient
(im2col in the loads, reduced over tokens) and the image gradient (col2im in the store).

Tokens M = B·N rows (N = (H/P)·(W/P) patches), output features D columns, reduction K = C·P·P.
Per image: read C·H·W pixels once from HBM (again from L2 for each further D tile), write (1 + N)·D
tokens once. No unfold copy, no [B, D, H/P, W/P] intermediate, no separate cat or add.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs, _select, _tuning
from ._launch import launch
from ._layout import vector_stride


@triton.jit
def _tile_ids(n_cols, BLOCK_N: tl.constexpr):
    """(row tile, column tile) of this program. The column tiles of one row tile run back to back,
    so the row operand they share stays in L2."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_cols, BLOCK_N)
    return pid // n_tiles, pid % n_tiles


@triton.jit
def _patch_offsets(tokens, N_PATCHES, GRID_W, P: tl.constexpr, stride_b, stride_h, stride_w):
    """(image b, patch p, offset of the patch's top-left pixel) of int64 tokens m = b·N + gy·GRID_W + gx,
    the patch's window starting at (gy·P, gx·P) of image b."""
    b = tokens // N_PATCHES
    p = tokens % N_PATCHES
    return b, p, b * stride_b + (p // GRID_W) * (P * stride_h) + (p % GRID_W) * (P * stride_w)


@triton.jit
def _window_offsets(ks, P: tl.constexpr, stride_c, stride_h, stride_w):
    """Offsets of reduction indices k = c·P·P + py·P + px (Conv2d's weight flattening) inside a
    P×P window with these strides: pixel (c, py, px) of a patch, or element [:, c, py, px] of W."""
    c = (ks // (P * P)).to(tl.int64)
    return c * stride_c + ((ks // P) % P) * stride_h + (ks % P) * stride_w


@triton.jit
def _patch_embed_kernel(
    X, W, BIAS, CLS, CLS_POS, POS, OUT,
    M, D, K, N_PATCHES, GRID_W,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wd, stride_wc, stride_wh, stride_ww,
    stride_bias, stride_cls, stride_cls_pos, stride_pos_n, stride_pos_d,
    stride_ob, stride_ot, stride_od,
    P: tl.constexpr, PREFIX: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_CLS_POS: tl.constexpr, HAS_POS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M tokens, BLOCK_N features] tile of ``tokens = im2col(X) @ W^T + bias + pos``.

    X: [B, C, H, W] images, any strides (NCHW and channels-last alike), fp32/fp16/bf16. Token
       m = b·N + gy·GRID_W + gx reads the P×P window at (gy·P, gx·P) of image b; reduction index
       k = c·P·P + py·P + px (Conv2d's weight flattening) reads pixel (c, gy·P + py, gx·P + px).
    W: [D, C, P, P] projection weight in Conv2d layout, any strides, dtype of X; read as [K, D].
    BIAS: [D] (read when HAS_BIAS), any float dtype, added in fp32.
    CLS: [D] class token (used when PREFIX == 1), any float dtype.
    CLS_POS: [D] position row of the class token (read when HAS_CLS_POS; absent in timm's
       ``no_embed_class`` layout, where the class token takes no position term).
    POS: [N, D] position rows of the patches (read when HAS_POS), any float dtype.
    OUT: [B, PREFIX + N, D] tokens, dtype of X: patch p of image b goes to row PREFIX + p; with
       PREFIX == 1 the tiles holding a patch 0 also write row 0 = CLS (+ CLS_POS) of that image.
    The product accumulates in fp32; bias, position and CLS are added in fp32; one rounding on store.
    """
    pid_m, pid_d = _tile_ids(D, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < D
    b, p, x_row = _patch_offsets(rows.to(tl.int64), N_PATCHES, GRID_W, P, stride_xb, stride_xh, stride_xw)
    cols64 = cols.to(tl.int64)
    w_col = cols64 * stride_wd

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x_k = _window_offsets(ks, P, stride_xc, stride_xh, stride_xw)
        w_k = _window_offsets(ks, P, stride_wc, stride_wh, stride_ww)
        a = tl.load(X + x_row[:, None] + x_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + w_k[:, None] + w_col[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + cols64 * stride_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_POS:
        pos = tl.load(POS + p[:, None] * stride_pos_n + cols64[None, :] * stride_pos_d, mask=mask, other=0.0)
        acc += pos.to(tl.float32)
    out_row = b * stride_ob + (PREFIX + p) * stride_ot
    tl.store(OUT + out_row[:, None] + cols64[None, :] * stride_od, acc.to(OUT.dtype.element_ty), mask=mask)

    if PREFIX == 1:
        cls = tl.load(CLS + cols64 * stride_cls, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_CLS_POS:
            cls += tl.load(CLS_POS + cols64 * stride_cls_pos, mask=col_ok, other=0.0).to(tl.float32)
        cls_tile = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32) + cls[None, :]
        first = row_ok & (p == 0)
        tl.store(OUT + (b * stride_ob)[:, None] + cols64[None, :] * stride_od,
                 cls_tile.to(OUT.dtype.element_ty), mask=first[:, None] & col_ok[None, :])


@triton.jit
def _patch_embed_dweight_kernel(
    DT, X, DW,
    D, K, M, N_PATCHES, GRID_W, TOKENS_PER_SPLIT,
    stride_tb, stride_tt, stride_td,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_ws, stride_wd, stride_wc, stride_wh, stride_ww,
    P: tl.constexpr, PREFIX: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M features, BLOCK_N pixels] tile of ``dW = dtokens^T @ im2col(X)`` over one slice
    of the tokens (program axis 1 picks the slice; BLOCK_K tokens per step).

    DT: [B, PREFIX + N, D] gradient of the tokens, any strides, dtype of X; rows PREFIX.. are read.
    X: [B, C, H, W] images, any strides; token m and pixel index k = c·P·P + py·P + px as in the
       forward kernel.
    DW: [S, D, C, P, P] through strides: with one slice (stride_ws = 0) the weight gradient itself,
       in the weight's layout and dtype; with S slices, fp32 partial sums the launcher adds up.
    Accumulates in fp32; one rounding on store.
    """
    pid_d, pid_k = _tile_ids(K, BLOCK_N)
    feats = (pid_d * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ks = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = feats < D
    k_ok = ks < K
    x_k = _window_offsets(ks, P, stride_xc, stride_xh, stride_xw)

    first = tl.program_id(1) * TOKENS_PER_SPLIT
    last = tl.minimum(first + TOKENS_PER_SPLIT, M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for m0 in range(first, last, BLOCK_K):
        tokens = (m0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        t_ok = tokens < last
        b, p, x_row = _patch_offsets(tokens, N_PATCHES, GRID_W, P, stride_xb, stride_xh, stride_xw)
        t_row = b * stride_tb + (PREFIX + p) * stride_tt
        dt = tl.load(DT + feats[:, None] * stride_td + t_row[None, :], mask=d_ok[:, None] & t_ok[None, :],
                     other=0.0)
        a = tl.load(X + x_row[:, None] + x_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(dt.to(a.dtype), a, acc, input_precision=INPUT_PRECISION)

    w_k = _window_offsets(ks, P, stride_wc, stride_wh, stride_ww)
    out = DW + tl.program_id(1).to(tl.int64) * stride_ws + feats[:, None] * stride_wd + w_k[None, :]
    tl.store(out, acc.to(DW.dtype.element_ty), mask=d_ok[:, None] & k_ok[None, :])


@triton.jit
def _patch_embed_dimages_kernel(
    DT, W, DX,
    K, D, M, N_PATCHES, GRID_W,
    stride_tb, stride_tt, stride_td,
    stride_wd, stride_wc, stride_wh, stride_ww,
    stride_xb, stride_xc, stride_xh, stride_xw,
    P: tl.constexpr, PREFIX: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M tokens, BLOCK_N pixels] tile of ``col2im(dtokens @ W)`` (BLOCK_K features per step).

    DT: [B, PREFIX + N, D] gradient of the tokens, any strides; rows PREFIX.. are read.
    W: [D, C, P, P] projection weight, any strides, dtype of DT; read as [D, K].
    DX: [B, C, H, W] gradient of the images, any strides (NCHW or channels-last). Patches do not
       overlap (stride = kernel), so each (token, k) is exactly one pixel: the tile is stored
       straight into the image layout, no overlap-add.
    Accumulates in fp32; one rounding on store.
    """
    pid_m, pid_k = _tile_ids(K, BLOCK_N)
    tokens = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ks = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = tokens < M
    k_ok = ks < K
    b, p, x_row = _patch_offsets(tokens, N_PATCHES, GRID_W, P, stride_xb, stride_xh, stride_xw)
    t_row = b * stride_tb + (PREFIX + p) * stride_tt
    w_k = _window_offsets(ks, P, stride_wc, stride_wh, stride_ww)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        feats = (d0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        d_ok = feats < D
        dt = tl.load(DT + t_row[:, None] + feats[None, :] * stride_td, mask=t_ok[:, None] & d_ok[None, :],
                     other=0.0)
        w = tl.load(W + feats[:, None] * stride_wd + w_k[None, :], mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(dt.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)

    x_k = _window_offsets(ks, P, stride_xc, stride_xh, stride_xw)
    tl.store(DX + x_row[:, None] + x_k[None, :], acc.to(DX.dtype.element_ty), mask=t_ok[:, None] & k_ok[None, :])


PATCH_EMBED = _select.kernel("patch_embed", _patch_embed_kernel, _configs.patch_rule, _configs.patch_candidates,
                             _configs.patch_interpreter)
PATCH_EMBED_DIMAGES = _select.kernel("patch_embed_dimages", _patch_embed_dimages_kernel, _configs.patch_rule,
                                     _configs.patch_candidates, _configs.patch_interpreter)
PATCH_EMBED_DWEIGHT = _select.kernel("patch_embed_dweight", _patch_embed_dweight_kernel, _configs.patch_rule,
                                     _configs.patch_candidates, _configs.patch_interpreter)


def _launch(kernel: _select.Kernel, rows: int, cols: int, reduction: int, splits: int, dtype: torch.dtype,
            args: tuple, meta: dict) -> None:
    """Launch a GEMM kernel over a [rows, cols] output, each element a ``reduction``-long sum with
    ``dtype`` operands, times ``splits`` slices of the reduction, in the config chosen for that shape."""
    key = _configs.PatchKey(triton.next_power_of_2(rows), cols, reduction, splits, dtype, meta["INPUT_PRECISION"])

    def run(cfg: triton.Config) -> None:
        grid = (triton.cdiv(rows, cfg.kwargs["BLOCK_M"]) * triton.cdiv(cols, cfg.kwargs["BLOCK_N"]), splits)
        launch(kernel.fn, grid, args, {**meta, **_select.tile_meta(cfg)})

    run(_select.config(kernel, args[0].get_device(), key, run))


def _input_precision(images: torch.Tensor) -> str:
    """fp32 operands use TF32 on the GPU where PyTorch's matmuls may (as Conv2d would)."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 and not _tuning.interpreting() else "ieee"


def patch_embed_fwd(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cls_token: torch.Tensor | None,
    cls_pos: torch.Tensor | None,
    pos: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Launch over images [B, C, H, W], weight [D, C, P, P], 1-D bias / cls_token / cls_pos [D],
    pos [N, D] and out [B, N + (cls_token is not None), D]; the op has checked every shape."""
    B, C, H, Wd = images.shape
    D, _, P, _ = weight.shape
    grid_w = Wd // P
    n_patches = (H // P) * grid_w
    M, K = B * n_patches, C * P * P
    if M == 0 or D == 0:
        return
    dummy = out  # stands in for absent pointers; never dereferenced behind a false constexpr
    args = (
        images, weight, dummy if bias is None else bias, dummy if cls_token is None else cls_token,
        dummy if cls_pos is None else cls_pos, dummy if pos is None else pos, out,
        M, D, K, n_patches, grid_w,
        *images.stride(), *weight.stride(),
        vector_stride(bias), vector_stride(cls_token), vector_stride(cls_pos),
        *(pos.stride() if pos is not None else (0, 0)),
        *out.stride(),
    )
    meta = dict(P=P, PREFIX=int(cls_token is not None), HAS_BIAS=bias is not None,
                HAS_CLS_POS=cls_pos is not None, HAS_POS=pos is not None,
                INPUT_PRECISION=_input_precision(images))
    _launch(PATCH_EMBED, M, D, K, 1, images.dtype, args, meta)


def _token_slices(m: int, d: int, k: int, device: torch.device) -> tuple[int, int]:
    """(slices, tokens per slice) for the weight gradient's reduction over the m tokens.

    D×K alone gives few output tiles (ViT-B/16: 36 of 128×128 for 132 SMs), so the tokens are cut
    into slices that run in parallel and write fp32 partials; each slice stays long (1024 tokens on
    the GPU) so the partials cost little next to reading dtokens and the images. The interpreter
    aims at 4 programs with 128-token slices, so small tests cover the sliced path too.
    """
    if device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        tiles, target, min_slice = triton.cdiv(d, 128) * triton.cdiv(k, 128), 2 * sm_count, 1024
    else:
        cfg = _configs.INTERPRETER_PATCH.kwargs
        tiles, target, min_slice = triton.cdiv(d, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_N"]), 4, 128
    slices = max(1, min(triton.cdiv(target, tiles), m // min_slice))
    per_slice = triton.cdiv(triton.cdiv(m, slices), 128) * 128  # whole token tiles per slice
    return triton.cdiv(m, per_slice), per_slice


def patch_embed_bwd(
    dtokens: torch.Tensor,
    images: torch.Tensor,
    weight: torch.Tensor,
    dimages: torch.Tensor | None,
    dweight: torch.Tensor | None,
) -> None:
    """Fill ``dimages`` [B, C, H, W] and ``dweight`` [D, C, P, P] (either may be None; any strides)
    from dtokens [B, PREFIX + N, D] (PREFIX = rows before the patches), images and weight."""
    B, C, H, Wd = images.shape
    D, _, P, _ = weight.shape
    grid_w = Wd // P
    n_patches = (H // P) * grid_w
    M, K = B * n_patches, C * P * P
    prefix = dtokens.shape[1] - n_patches
    if M == 0 or D == 0:
        for grad in (dimages, dweight):
            if grad is not None:
                grad.zero_()
        return
    meta = dict(P=P, PREFIX=prefix, INPUT_PRECISION=_input_precision(images))
    if dimages is not None:
        args = (dtokens, weight, dimages, K, D, M, n_patches, grid_w,
                *dtokens.stride(), *weight.stride(), *dimages.stride())
        _launch(PATCH_EMBED_DIMAGES, M, K, D, 1, weight.dtype, args, meta)
    if dweight is not None:
        slices, per_slice = _token_slices(M, D, K, images.device)
        target = dweight if slices == 1 else torch.empty(slices, D, C, P, P, dtype=torch.float32,
                                                         device=dweight.device)
        target_strides = (0, *dweight.stride()) if slices == 1 else target.stride()
        args = (dtokens, images, target, D, K, M, n_patches, grid_w, per_slice,
                *dtokens.stride(), *images.stride(), *target_strides)
        _launch(PATCH_EMBED_DWEIGHT, D, K, per_slice, slices, images.dtype, args, meta)
        if slices > 1:
            dweight.copy_(target.sum(0))
