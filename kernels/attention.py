"""Attention in the FlashAttention-2 style, forward and backward, reading Q, K and V through strides.

Forward: one program owns BLOCK_M query rows of one (batch, head); it streams K and V in BLOCK_N-row
tiles, keeps an fp32 running max and sum (online softmax, base 2) and an fp32 accumulator, and
divides once at the end, so the N×N score matrix never exists in memory. Memory traffic per
(batch, head): read Q once and K, V once per query tile, write O once and an fp32 log-sum-exp per row.

Backward (FlashAttention-2, Dao 2023, Algorithm 2), from the saved log-sum-exp, in three launches:
  1. Δ = rowsum(dO ⊙ O) − dlse, fp32, one value per query row;
  2. one program per (key tile, batch·head) streams the query tiles, recomputes P = exp(S − lse) and
     accumulates dV = Pᵀ dO and dK = scale · dSᵀ Q with dS = P ⊙ (dO Vᵀ − Δ);
  3. one program per (query tile, batch·head) streams the key tiles and accumulates dQ = scale · dS K.
dQ gets its own kernel rather than fp32 atomics from launch 2: each gradient element is written once
by one program, so the backward is deterministic (bit-identical run to run) and needs no zeroed
fp32 scratch buffer, for the price of recomputing S and dP a second time.

Q, O, dQ and dO are [B, H, N_Q, d] views and K, V, dK, dV [B, H, N_KV, d] views, with unit last
stride and any other strides (a query broadcast over the batch with stride 0 is read in place). The
op passes views of the packed in-projection output [B, N, 3·H·d] (no permute, no copy) and of its
gradient, or SDPA-layout tensors. N_Q may differ from N_KV (cross-attention; attention pooling's
1..4 learned queries over every token): causal masking is then SDPA's top-left one (query i sees
keys 0..i), and when N_Q fits 16 rows the kernels take 16-row query tiles (``_configs``), so one
query does not fill a 128-row tile with padding.

Forward launches that ``attention_resident.takes`` (16-bit, unmasked, no dropout, K and V of a head
within shared memory, sm_90) run ``attention_resident``'s kernel instead: a head's K and V loaded once
and kept on chip while its query tiles pass. ``routes()`` says which forward each launch key ran.

Rotary position embedding (``_rope.py``, timm's 2-D RoPE, N_Q = N_KV): with ROPE set, every kernel
rotates the q and k tiles as it loads them (partner columns through permuted indices, sin | cos
rows of the table), so no rotated copy exists; the backward kernels take their gradients with
respect to the rotated q and k back through the rotation before the store.

Dropout on the probabilities (DROPOUT set, FlashAttention's way): probability (query i, key j) of
batch·head bh survives when ``_random.keep(seed, j, i, bh, ATTENTION, p)`` says so. The mask is a
Philox draw keyed by the seed the op drew and counted by the element's coordinates, so every kernel
regenerates it on its own tile, in its own orientation, and it is never stored. The forward sums the
undropped P into the softmax normaliser (so the log-sum-exp is the undropped one) and accumulates
(P ⊙ M) V, scaling by 1/(1 − p) once at the end; the backward uses dV = (P ⊙ M / (1 − p))ᵀ dO and
dP = (dO Vᵀ) ⊙ M / (1 − p), while Δ = rowsum(dO ⊙ O) needs no change since O already holds the
dropout. Without DROPOUT the seed is never loaded and no extra work is done.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

from . import _configs, _select, attention_resident
from ._launch import launch
from ._random import ATTENTION, keep
from ._rope import NO_ROPE, ROPE_HALF, ROPE_INTERLEAVED, load_rotated, unrotate

# Head sizes the kernel tiles (padded to the next power of two with masks); others fall back. 72 is
# SigLIP-So400m's (1152 / 16 heads).
HEAD_DIMS = (16, 32, 48, 64, 72, 80, 96, 128)

# Mask kinds (constexpr): what a mask element means.
NO_MASK, BOOL_MASK, ADDITIVE_MASK = 0, 1, 2

# (device, launch key) -> (forward kernel, its config, why not the resident kernel) of the latest launch.
ran: dict[tuple[int, _configs.AttentionKey], tuple[_select.Kernel, triton.Config, str | None]] = {}

# A launch as a function of its config.
_Run = Callable[[triton.Config], None]

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# A jit function reads only constexpr globals (the interpreter reads any, the compiler does not).
_ATTENTION_SITE = tl.constexpr(ATTENTION)


@triton.jit
def _masked_scores(s, ptrs, valid, KIND: tl.constexpr):
    """Apply one mask to scores ``s`` (log2 units): BOOL_MASK sends nonzero elements to -inf,
    ADDITIVE_MASK adds the element (natural-log units, so scaled by log2 e)."""
    if KIND == 1:
        m = tl.load(ptrs, mask=valid, other=0)
        s = tl.where(m != 0, float("-inf"), s)
    elif KIND == 2:
        m = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
        s = s + m * _LOG2E
    return s


@triton.jit
def _mask_tile(s, qi, kj, N_Q, N_KV, MASK, KPM, stride_mm, stride_mn, stride_pn,
               MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Every mask on a tile of scores ``s`` (log2 units), in either orientation: ``qi`` and ``kj``
    are the query and key indices as broadcastable 2-D arrays ([M, 1] and [1, N], or transposed).
    MASK and KPM point at this (batch, head)'s mask and this batch's padding row. Keys past N_KV
    get -inf, so padded tile columns carry no probability; causal is top-left (key j <= query i)."""
    key_ok = kj < N_KV
    s = tl.where(key_ok, s, float("-inf"))
    if IS_CAUSAL:
        s = tl.where(kj <= qi, s, float("-inf"))
    kj64 = kj.to(tl.int64)  # a transposed or sliced mask's strides can be large
    s = _masked_scores(s, KPM + kj64 * stride_pn, key_ok, KPM_KIND)
    s = _masked_scores(s, MASK + qi.to(tl.int64) * stride_mm + kj64 * stride_mn, (qi < N_Q) & key_ok, MASK_KIND)
    return s


@triton.jit
def _tile_program(N, H, BLOCK: tl.constexpr):
    """This program's BLOCK-token tile and its (batch·head, batch, head); consecutive programs share
    a (batch, head), so the tiles they stream stay in L2."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(N, BLOCK)
    bh = pid // tiles
    return pid % tiles, bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _tile_ptrs(BASE, b, h, stride_b, stride_h, stride_n, tokens, dims):
    """Pointers to the [tokens, dims] tile of one (batch, head) of a [B, H, N, d] view (int64 offsets)."""
    return BASE + b * stride_b + h * stride_h + tokens.to(tl.int64)[:, None] * stride_n + dims[None, :]


@triton.jit
def _row_stats(LSE, DELTA, bh, rows, N_Q):
    """The forward's log-sum-exp (in log2 units) and Δ of query ``rows``; a padded row reads
    lse = +inf, so its P, and every product it enters, is exactly 0."""
    offs = bh.to(tl.int64) * N_Q + rows
    lse = tl.load(LSE + offs, mask=rows < N_Q, other=float("inf")) * _LOG2E
    return lse, tl.load(DELTA + offs, mask=rows < N_Q, other=0.0)


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE, MASK, KPM, TAB, SEED,  # noqa: E741  (O: the output, as the papers name it)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    stride_rb, stride_rh, stride_rn,
    H, N_Q, N_KV, ROPE_PREFIX, qk_scale, dropout_p, keep_scale,
    HEAD_DIM: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr,
    IS_CAUSAL: tl.constexpr, ROPE: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """softmax(scale · Q Kᵀ + masks) V for BLOCK_M query rows of one (batch, head).

    Q: [B, H, N_Q, HEAD_DIM]; K, V: [B, H, N_KV, HEAD_DIM] inputs (strides ``stride_{q,k,v}{b,h,n}``,
       unit last stride), one float dtype; typically three views into the packed
       [B, N, 3·H·HEAD_DIM] projection.
    O: [B, H, N_Q, HEAD_DIM] output in the dtype of Q (strides ``stride_o*``; the op passes a view
       of a contiguous [B, N_Q, H·HEAD_DIM] buffer or a contiguous [B, H, N_Q, HEAD_DIM] one).
    LSE: [B, H, N_Q] contiguous fp32, natural-log log-sum-exp of each row's masked, scaled scores;
       +inf for a row with no allowed key, so that exp(s - lse) recomputes p = 0 there.
    MASK: attention mask indexed [b, h, query, key] through ``stride_m*`` (stride 0 broadcasts),
       uint8 (nonzero = not allowed, nn.MultiheadAttention's convention) or float (added to the
       scaled scores) by MASK_KIND; unread when NO_MASK.
    KPM: key padding mask indexed [b, key] through ``stride_p*``, same kinds by KPM_KIND.
    TAB: rotary table [b, h, token - ROPE_PREFIX, sin | cos] through ``stride_r*`` (unit last
       stride, stride 0 broadcasts), any float dtype; read when ROPE (then N_Q = N_KV) to rotate
       q and k as they load. Unread when NO_ROPE.
    SEED: int64 tensor of one element, the Philox key of the dropout mask; loaded only when DROPOUT.
    qk_scale: softmax scale times log2(e); scores live in log2 units so the kernel uses exp2.
    dropout_p, keep_scale: with DROPOUT, each probability is dropped with probability dropout_p
       (``_random.keep``, column = key, row = query, plane = batch·head) and the kept ones scaled
       by keep_scale = 1/(1 - dropout_p) (0 when dropout_p = 1); the log-sum-exp stays undropped.
    Fuses the rotation, the scale, the masks, causal masking, the softmax, dropout and both
    products; a row whose keys are all masked yields zeros.
    """
    pid_m, bh, b, h = _tile_program(N_Q, H, BLOCK_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N_Q
    dim_ok = dims < HEAD_DIM
    qd_ok = row_ok[:, None] & dim_ok[None, :]
    tab = TAB + b * stride_rb + h * stride_rh

    q = load_rotated(_tile_ptrs(Q, b, h, stride_qb, stride_qh, stride_qn, rows, dims), qd_ok,
                     tab, rows, N_Q, ROPE_PREFIX, stride_rn, dims, HEAD_DIM, ROPE)
    # Tile pointers start at key 0 and advance by BLOCK_N rows.
    k_ptrs = _tile_ptrs(K, b, h, stride_kb, stride_kh, stride_kn, cols, dims)
    v_ptrs = _tile_ptrs(V, b, h, stride_vb, stride_vh, stride_vn, cols, dims)
    mask_base = MASK + b * stride_mb + h * stride_mh
    kpm_base = KPM + b * stride_pb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(SEED)

    # Causal rows never see keys past their own index: stop after this tile's diagonal.
    if IS_CAUSAL:
        hi = tl.minimum(N_KV, (pid_m + 1) * BLOCK_M)
    else:
        hi = N_KV
    for start_n in range(0, hi, BLOCK_N):
        keys = start_n + cols
        kd_ok = (keys < N_KV)[:, None] & dim_ok[None, :]
        k = load_rotated(k_ptrs, kd_ok, tab, keys, N_KV, ROPE_PREFIX, stride_rn, dims, HEAD_DIM, ROPE)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = _mask_tile(s, rows[:, None], keys[None, :], N_Q, N_KV, mask_base, kpm_base,
                       stride_mm, stride_mn, stride_pn, MASK_KIND, KPM_KIND, IS_CAUSAL)

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # While every key so far is masked the max is -inf; shift by 0 so p = 0, never NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:  # the normaliser above sums every p; only the kept ones reach the output
            p = tl.where(keep(seed, keys[None, :], rows[:, None], bh, _ATTENTION_SITE, dropout_p), p, 0.0)
        v = tl.load(v_ptrs, mask=kd_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    alive = l_i > 0.0
    l_safe = tl.where(alive, l_i, 1.0)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * keep_scale
    tl.store(_tile_ptrs(O, b, h, stride_ob, stride_oh, stride_on, rows, dims), out.to(O.dtype.element_ty),
             mask=qd_ok)
    lse = tl.where(alive, (m_i + tl.math.log2(l_safe)) * _LN2, float("inf"))
    tl.store(LSE + bh.to(tl.int64) * N_Q + rows, lse, mask=row_ok)


@triton.jit
def _attention_bwd_delta_kernel(
    O, DO, DLSE, DELTA,  # noqa: E741
    stride_ob, stride_oh, stride_on,
    stride_db, stride_dh, stride_dn,
    H, N_Q,
    HEAD_DIM: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Δ = rowsum(dO ⊙ O) − dlse for BLOCK_M query rows of one (batch, head).

    O, DO: [B, H, N_Q, HEAD_DIM] forward output and its gradient (unit last stride, any other strides).
    DLSE: [B, H, N_Q] contiguous fp32 gradient of the log-sum-exp output, read when HAS_DLSE
       (d lse / d s = P, so it folds into Δ: dS = P ⊙ (dP − Δ)).
    DELTA: [B, H, N_Q] contiguous fp32 output.
    """
    pid_m, bh, b, h = _tile_program(N_Q, H, BLOCK_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N_Q
    ok = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    o = tl.load(_tile_ptrs(O, b, h, stride_ob, stride_oh, stride_on, rows, dims), mask=ok, other=0.0)
    do = tl.load(_tile_ptrs(DO, b, h, stride_db, stride_dh, stride_dn, rows, dims), mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    row_ptr = bh.to(tl.int64) * N_Q + rows
    if HAS_DLSE:
        delta -= tl.load(DLSE + row_ptr, mask=row_ok, other=0.0)
    tl.store(DELTA + row_ptr, delta, mask=row_ok)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, MASK, KPM, TAB, SEED,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    stride_rb, stride_rh, stride_rn,
    H, N_Q, N_KV, ROPE_PREFIX, qk_scale, sm_scale, dropout_p, keep_scale,
    HEAD_DIM: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr,
    IS_CAUSAL: tl.constexpr, ROPE: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK and dV for BLOCK_N keys of one (batch, head), streaming BLOCK_M-row query tiles.

    Q, DO: [B, H, N_Q, HEAD_DIM]; K, V: [B, H, N_KV, HEAD_DIM]: forward inputs and output gradient,
       one float dtype (unit last stride, strides ``stride_{q,k,v,do}*``).
    LSE: [B, H, N_Q] contiguous fp32 log-sum-exp from the forward (+inf for a row with no allowed
       key, so its P and hence its contribution is exactly 0). DELTA: [B, H, N_Q] contiguous fp32 Δ.
    DK, DV: [B, H, N_KV, HEAD_DIM] outputs in the dtype of Q (strides ``stride_{dk,dv}*``; the op
       passes views of the packed gradient [B, N, 3·H·HEAD_DIM] or contiguous tensors).
    MASK, KPM, TAB, SEED, qk_scale, dropout_p, keep_scale: as in the forward; sm_scale is the
       softmax scale itself. With ROPE, q and k are rotated as they load and dK, taken with respect
       to the rotated k, is rotated back (the transpose) before the store. With DROPOUT,
       dV = (P ⊙ M · keep_scale)ᵀ dO and dP = (dO Vᵀ) ⊙ M · keep_scale, M regenerated from SEED.
    Works on the transposed tile Sᵀ (keys × queries) so that Pᵀ and dSᵀ feed the dots directly.
    """
    pid_n, bh, b, h = _tile_program(N_KV, H, BLOCK_N)
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    kd_ok = (keys < N_KV)[:, None] & dim_ok[None, :]
    tab = TAB + b * stride_rb + h * stride_rh
    k = load_rotated(_tile_ptrs(K, b, h, stride_kb, stride_kh, stride_kn, keys, dims), kd_ok,
                     tab, keys, N_KV, ROPE_PREFIX, stride_rn, dims, HEAD_DIM, ROPE)
    v = tl.load(_tile_ptrs(V, b, h, stride_vb, stride_vh, stride_vn, keys, dims), mask=kd_ok, other=0.0)
    mask_base = MASK + b * stride_mb + h * stride_mh
    kpm_base = KPM + b * stride_pb

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(SEED)
    # Causal: queries before this key tile's first key never see it; start at the tile holding it.
    if IS_CAUSAL:
        lo = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
    else:
        lo = 0
    for start_m in range(lo, N_Q, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        qd_ok = (rows < N_Q)[:, None] & dim_ok[None, :]
        q = load_rotated(_tile_ptrs(Q, b, h, stride_qb, stride_qh, stride_qn, rows, dims), qd_ok,
                         tab, rows, N_Q, ROPE_PREFIX, stride_rn, dims, HEAD_DIM, ROPE)
        do = tl.load(_tile_ptrs(DO, b, h, stride_dob, stride_doh, stride_don, rows, dims), mask=qd_ok, other=0.0)
        lse, delta = _row_stats(LSE, DELTA, bh, rows, N_Q)

        st = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale
        st = _mask_tile(st, rows[None, :], keys[:, None], N_Q, N_KV, mask_base, kpm_base,
                        stride_mm, stride_mn, stride_pn, MASK_KIND, KPM_KIND, IS_CAUSAL)
        pt = tl.math.exp2(st - lse[None, :])
        dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
        if DROPOUT:  # the tile is transposed: keys run down its rows, queries across its columns
            kept = keep(seed, keys[:, None], rows[None, :], bh, _ATTENTION_SITE, dropout_p)
            dv += tl.dot(tl.where(kept, pt * keep_scale, 0.0).to(do.dtype), do, input_precision="ieee")
            dpt = tl.where(kept, dpt * keep_scale, 0.0)
        else:
            dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision="ieee")

    dk = unrotate(dk * sm_scale, tab, keys, N_KV, ROPE_PREFIX, stride_rn, dims, HEAD_DIM, ROPE)
    tl.store(_tile_ptrs(DK, b, h, stride_dkb, stride_dkh, stride_dkn, keys, dims), dk.to(DK.dtype.element_ty),
             mask=kd_ok)
    tl.store(_tile_ptrs(DV, b, h, stride_dvb, stride_dvh, stride_dvn, keys, dims), dv.to(DV.dtype.element_ty),
             mask=kd_ok)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, MASK, KPM, TAB, SEED,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    stride_rb, stride_rh, stride_rn,
    H, N_Q, N_KV, ROPE_PREFIX, qk_scale, sm_scale, dropout_p, keep_scale,
    HEAD_DIM: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr,
    IS_CAUSAL: tl.constexpr, ROPE: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ = scale · (P ⊙ (dO Vᵀ − Δ)) K for BLOCK_M query rows of one (batch, head), streaming
    BLOCK_N-row key tiles. Pointers as in ``_attention_bwd_dkdv_kernel``; DQ: [B, H, N_Q, HEAD_DIM]
    output in the dtype of Q (strides ``stride_dq*``), rotated back from the gradient with respect
    to the rotated q when ROPE; with DROPOUT, dP = (dO Vᵀ) ⊙ M · keep_scale."""
    pid_m, bh, b, h = _tile_program(N_Q, H, BLOCK_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    qd_ok = (rows < N_Q)[:, None] & dim_ok[None, :]
    tab = TAB + b * stride_rb + h * stride_rh
    q = load_rotated(_tile_ptrs(Q, b, h, stride_qb, stride_qh, stride_qn, rows, dims), qd_ok,
                     tab, rows, N_Q, ROPE_PREFIX, stride_rn, dims, HEAD_DIM, ROPE)
    do = tl.load(_tile_ptrs(DO, b, h, stride_dob, stride_doh, stride_don, rows, dims), mask=qd_ok, other=0.0)
    lse, delta = _row_stats(LSE, DELTA, bh, rows, N_Q)
    k_ptrs = _tile_ptrs(K, b, h, stride_kb, stride_kh, stride_kn, cols, dims)
    v_ptrs = _tile_ptrs(V, b, h, stride_vb, stride_vh, stride_vn, cols, dims)
    mask_base = MASK + b * stride_mb + h * stride_mh
    kpm_base = KPM + b * stride_pb

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(SEED)
    if IS_CAUSAL:
        hi = tl.minimum(N_KV, (pid_m + 1) * BLOCK_M)
    else:
        hi = N_KV
    for start_n in range(0, hi, BLOCK_N):
        keys = start_n + cols
        kd_ok = (keys < N_KV)[:, None] & dim_ok[None, :]
        k = load_rotated(k_ptrs, kd_ok, tab, keys, N_KV, ROPE_PREFIX, stride_rn, dims, HEAD_DIM, ROPE)
        v = tl.load(v_ptrs, mask=kd_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = _mask_tile(s, rows[:, None], keys[None, :], N_Q, N_KV, mask_base, kpm_base,
                       stride_mm, stride_mn, stride_pn, MASK_KIND, KPM_KIND, IS_CAUSAL)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        if DROPOUT:
            kept = keep(seed, keys[None, :], rows[:, None], bh, _ATTENTION_SITE, dropout_p)
            dp = tl.where(kept, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    dq = unrotate(dq * sm_scale, tab, rows, N_Q, ROPE_PREFIX, stride_rn, dims, HEAD_DIM, ROPE)
    tl.store(_tile_ptrs(DQ, b, h, stride_dqb, stride_dqh, stride_dqn, rows, dims), dq.to(DQ.dtype.element_ty),
             mask=qd_ok)


ATTENTION_FWD = _select.kernel("attention_fwd", _attention_fwd_kernel, _configs.attention_rule("fwd"),
                               _configs.attention_candidates("fwd"), _configs.attention_interpreter)
ATTENTION_DKDV = _select.kernel("attention_bwd_dkdv", _attention_bwd_dkdv_kernel, _configs.attention_rule("dkdv"),
                                _configs.attention_candidates("dkdv"), _configs.attention_interpreter)
ATTENTION_DQ = _select.kernel("attention_bwd_dq", _attention_bwd_dq_kernel, _configs.attention_rule("dq"),
                              _configs.attention_candidates("dq"), _configs.attention_interpreter)


def _runner(kernel: _select.Kernel, tile: str, n: int, programs_per_tile: int, args: tuple, meta: dict
            ) -> _Run:
    """The launch of cdiv(n, tile) · programs_per_tile programs as a function of the config."""
    def run(cfg: triton.Config) -> None:
        launch(kernel.fn, (triton.cdiv(n, cfg.kwargs[tile]) * programs_per_tile,), args,
               {**meta, **_select.tile_meta(cfg)})
    return run


def _launch(kernel: _select.Kernel, key: _configs.AttentionKey, run: _Run, device: int) -> triton.Config:
    """Launch ``run`` in the config chosen for ``key``; returns it."""
    cfg = _select.config(kernel, device, key, run)
    run(cfg)
    return cfg


def routes() -> list[dict]:
    """Which forward each attention launch key met in this process ran last: the device, the key
    (``_configs.key_text``), the kernel and its config, and for the general kernel why the resident
    one did not take it."""
    out = []
    for (device, key), (kernel, cfg, why) in list(ran.items()):  # another thread may be launching
        row = {"device": device, "key": _configs.key_text(key), "kernel": kernel.name, "config": _select.tile_meta(cfg)}
        if why is not None:
            row["reason"] = why
        out.append(row)
    return out


def _key(B: int, H: int, N_Q: int, N_KV: int, d: int, dtype: torch.dtype, meta: dict) -> _configs.AttentionKey:
    return _configs.AttentionKey(triton.next_power_of_2(B * H), N_Q, N_KV, d, dtype, meta["MASK_KIND"],
                                 meta["KPM_KIND"], meta["IS_CAUSAL"], meta["ROPE"], meta["DROPOUT"])


def _mask_strides(mask: torch.Tensor | None, heads: int) -> tuple[int, int, int, int]:
    """(batch, head, query, key) strides of an [N_Q, N_KV], [B·H, N_Q, N_KV] or 4-D
    [B or 1, H or 1, N_Q, N_KV] mask; 0 broadcasts."""
    if mask is None:
        return 0, 0, 0, 0
    if mask.dim() == 2:
        return 0, 0, mask.stride(0), mask.stride(1)
    if mask.dim() == 3:
        return heads * mask.stride(0), mask.stride(0), mask.stride(1), mask.stride(2)
    return tuple(0 if size == 1 else stride for size, stride in zip(mask.shape, mask.stride()))


def _mask_arg(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
    if mask is None:
        return None, NO_MASK
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), BOOL_MASK  # same bytes, same strides, loads as integers
    return mask, ADDITIVE_MASK


def _mask_args(key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None, heads: int,
               dummy: torch.Tensor) -> tuple[tuple, dict]:
    """Kernel arguments for both masks: (pointers, strides) and the constexpr kinds. ``dummy``
    stands in for an absent mask; it is never dereferenced behind a NO_MASK constexpr."""
    mask, mask_kind = _mask_arg(attn_mask)
    kpm, kpm_kind = _mask_arg(key_padding_mask)
    pointers = (dummy if mask is None else mask, dummy if kpm is None else kpm)
    strides = (*_mask_strides(mask, heads), *((0, 0) if kpm is None else kpm.stride()))
    return pointers + strides, dict(MASK_KIND=mask_kind, KPM_KIND=kpm_kind)


class Rope(NamedTuple):
    """A rotary table as the kernels read it: ``table`` [.., N - prefix, 2·d] (sin | cos, unit last
    stride) broadcastable to [B, H, N - prefix, 2·d]; ``prefix`` leading tokens stay unrotated;
    ``half`` pairs column j with j ± d/2 (``rope_rotate_half``) instead of 2i with 2i+1 (``rot``)."""
    table: torch.Tensor
    prefix: int
    half: bool


def _rope_args(rope: Rope | None, dummy: torch.Tensor) -> tuple[tuple, int, dict]:
    """Kernel arguments for the rotary table: (pointer, batch, head and token strides, 0 for a
    broadcast dimension), the prefix, and the ROPE constexpr."""
    if rope is None:
        return (dummy, 0, 0, 0), 0, dict(ROPE=NO_ROPE)
    t = rope.table
    assert t.dim() in (2, 3, 4) and t.stride(-1) == 1
    lead = [0 if size == 1 else stride for size, stride in zip(t.shape[:-2], t.stride()[:-2])]
    strides = ([0, 0] + lead)[-2:]
    return (t, *strides, t.stride(-2)), rope.prefix, dict(ROPE=ROPE_HALF if rope.half else ROPE_INTERLEAVED)


def _dropout_args(dropout_p: float, seed: torch.Tensor | None, dummy: torch.Tensor) -> tuple[tuple, dict]:
    """Kernel arguments for dropout: (seed pointer, dropout_p, keep_scale) and the DROPOUT constexpr.
    p = 0 compiles the kernel without dropout; ``dummy`` stands in for the seed, never loaded then."""
    if dropout_p == 0.0:
        return (dummy, 0.0, 1.0), dict(DROPOUT=False)
    assert seed is not None and seed.dtype == torch.int64 and seed.numel() == 1 and 0.0 < dropout_p <= 1.0
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    return (seed, float(dropout_p), keep_scale), dict(DROPOUT=True)


def _strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    """(batch, head, token) strides of each [B, H, N, d] view, in order."""
    return tuple(s for t in tensors for s in t.stride()[:3])


def _check_views(B: int, H: int, N: int, d: int, *tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.shape == (B, H, N, d) and t.stride(3) == 1


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    rope: Rope | None = None,
    *,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> None:
    """Launch over [B, H, N_Q, d] views q, o, [B, H, N_KV, d] views k, v (unit last stride; the op
    guarantees it) and a contiguous fp32 lse [B, H, N_Q]. Masks: ``key_padding_mask`` [B, N_KV],
    ``attn_mask`` [N_Q, N_KV], [B·H, N_Q, N_KV] or 4-D, bool (True = not allowed) or float
    (additive). ``rope``: rotate q and k as they load (N_Q = N_KV). ``dropout_p`` > 0: drop each
    probability with that probability, the mask keyed by ``seed`` (int64 tensor of one element on
    q's device); lse stays the undropped one."""
    B, H, N_Q, d = q.shape
    N_KV = k.shape[2]
    _check_views(B, H, N_Q, d, q, o)
    _check_views(B, H, N_KV, d, k, v)
    assert lse.shape == (B, H, N_Q) and lse.is_contiguous()
    assert rope is None or N_Q == N_KV
    if B * H * N_Q == 0:
        return
    key, general, resident = _forward(q, k, v, o, lse, key_padding_mask, attn_mask, scale, is_causal, rope,
                                      dropout_p, seed)
    why = attention_resident.takes(q, k, v, o, key)
    if why is None:
        kernel, run = attention_resident.ATTENTION_RESIDENT, resident()
    else:
        kernel, run = ATTENTION_FWD, general
    ran[q.get_device(), key] = (kernel, _launch(kernel, key, run, q.get_device()), why)


def _forward(q, k, v, o, lse, key_padding_mask, attn_mask, scale, is_causal, rope, dropout_p, seed):
    """(launch key, the general kernel's launch as a function of the config, a function making the
    resident kernel's) of ``attention_fwd``'s arguments."""
    B, H, N_Q, d = q.shape
    mask_args, mask_meta = _mask_args(key_padding_mask, attn_mask, H, lse)
    rope_args, prefix, rope_meta = _rope_args(rope, lse)
    (seed_arg, *drop_scalars), drop_meta = _dropout_args(dropout_p, seed, lse)
    meta = dict(HEAD_DIM=d, IS_CAUSAL=is_causal, BLOCK_D=triton.next_power_of_2(d), **mask_meta, **rope_meta,
                **drop_meta)
    args = (q, k, v, o, lse, *mask_args[:2], rope_args[0], seed_arg, *_strides(q, k, v, o), *mask_args[2:],
            *rope_args[1:], H, N_Q, k.shape[2], prefix, scale * 1.4426950408889634, *drop_scalars)
    return (_key(B, H, N_Q, k.shape[2], d, q.dtype, meta), _runner(ATTENTION_FWD, "BLOCK_M", N_Q, B * H, args, meta),
            lambda: attention_resident.launcher(q, k, v, o, lse, rope_args, prefix, scale, meta))


def forward_launchers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                      scale: float, is_causal: bool = False, rope: Rope | None = None
                      ) -> tuple[_configs.AttentionKey, _Run, _Run]:
    """(launch key, the general kernel's launch, the resident kernel's launch) of ``attention_fwd``'s
    arguments without masks or dropout, each a function of the config and bare of the route's checks,
    whether or not the route would take the resident kernel: for instruments that time both kernels."""
    key, general, resident = _forward(q, k, v, o, lse, None, None, scale, is_causal, rope, 0.0, None)
    return key, general, resident()


def attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    do: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    rope: Rope | None = None,
    *,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> None:
    """Gradients of ``attention_fwd`` into the [B, H, N_Q, d] view dq and the [B, H, N_KV, d] views
    dk, dv (unit last stride, any other strides, e.g. three views of one packed [B, N, 3·H·d]
    buffer); with ``rope``, with respect to q and k as stored (before the rotation). q, o, do:
    [B, H, N_Q, d] and k, v: [B, H, N_KV, d] views with unit last stride; lse: the forward's
    contiguous fp32 [B, H, N_Q]; dlse: None or the contiguous fp32 [B, H, N_Q] gradient of lse.
    Masks, scale, causality, rope, ``dropout_p`` and ``seed`` as in the forward (the same seed
    regenerates the forward's mask; o is the dropped output)."""
    B, H, N_Q, d = q.shape
    N_KV = k.shape[2]
    _check_views(B, H, N_Q, d, q, o, do, dq)
    _check_views(B, H, N_KV, d, k, v, dk, dv)
    for t in (lse, dlse):
        assert t is None or (t.shape == (B, H, N_Q) and t.is_contiguous() and t.dtype == torch.float32)
    assert rope is None or N_Q == N_KV
    if B * H * N_Q * N_KV == 0:  # no score exists: every gradient is zero
        for t in (dq, dk, dv):
            t.zero_()
        return
    block_d = triton.next_power_of_2(d)
    delta = torch.empty_like(lse)
    delta_rows = 64
    launch(_attention_bwd_delta_kernel, (triton.cdiv(N_Q, delta_rows) * B * H,),
           (o, do, lse if dlse is None else dlse, delta, *_strides(o, do), H, N_Q),
           dict(HEAD_DIM=d, HAS_DLSE=dlse is not None, BLOCK_M=delta_rows, BLOCK_D=block_d))

    mask_args, mask_meta = _mask_args(key_padding_mask, attn_mask, H, lse)
    rope_args, prefix, rope_meta = _rope_args(rope, lse)
    (seed_arg, *drop_scalars), drop_meta = _dropout_args(dropout_p, seed, lse)
    meta = dict(HEAD_DIM=d, IS_CAUSAL=is_causal, BLOCK_D=block_d, **mask_meta, **rope_meta, **drop_meta)
    scalars = (H, N_Q, N_KV, prefix, scale * 1.4426950408889634, scale, *drop_scalars)
    pointers = (*mask_args[:2], rope_args[0], seed_arg)
    strides = (*mask_args[2:], *rope_args[1:])
    args = (q, k, v, do, lse, delta, dk, dv, *pointers, *_strides(q, k, v, do, dk, dv), *strides, *scalars)
    key = _key(B, H, N_Q, N_KV, d, q.dtype, meta)
    _launch(ATTENTION_DKDV, key, _runner(ATTENTION_DKDV, "BLOCK_N", N_KV, B * H, args, meta), q.get_device())
    args = (q, k, v, do, lse, delta, dq, *pointers, *_strides(q, k, v, do, dq), *strides, *scalars)
    _launch(ATTENTION_DQ, key, _runner(ATTENTION_DQ, "BLOCK_M", N_Q, B * H, args, meta), q.get_device())
