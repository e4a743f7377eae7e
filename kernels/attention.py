"""Attention forward in the FlashAttention-2 style, reading Q, K and V through strides.

One program owns BLOCK_M query rows of one (batch, head); it streams K and V in BLOCK_N-row tiles,
keeps an fp32 running max and sum (online softmax, base 2) and an fp32 accumulator, and divides once
at the end, so the N×N score matrix never exists in memory. Memory traffic per (batch, head): read
Q once and K, V once per query tile, write O once and an fp32 log-sum-exp per row.

Q, K, V and O are [B, H, N, d] views with unit last stride and any other strides. The op passes views
of the packed in-projection output [B, N, 3·H·d] (no permute, no copy) or of SDPA-layout tensors.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Head sizes the kernel tiles (padded to the next power of two with masks); others fall back.
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128)

# Mask kinds (constexpr): what a mask element means.
NO_MASK, BOOL_MASK, ADDITIVE_MASK = 0, 1, 2

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


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


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles whose K/V pipeline overflows shared memory or whose accumulator spills."""
    elem = named_args["Q"].element_size()
    block_d = triton.next_power_of_2(named_args["HEAD_DIM"])
    fit = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        smem = (bm + 2 * c.num_stages * bn) * block_d * elem
        acc_per_thread = bm * block_d // (32 * c.num_warps)
        if smem <= 200 * 1024 and acc_per_thread <= 64:
            fit.append(c)
    return fit or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # One small tile under the interpreter keeps CPU tests fast and deterministic.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 4),
            (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 2), (64, 128, 8, 3),
        ]
    ]


@triton.autotune(configs=_configs(), key=["N_CTX", "HEAD_DIM"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE, MASK, KPM,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    H, N_CTX, qk_scale,
    HEAD_DIM: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """softmax(scale · Q Kᵀ + masks) V for BLOCK_M query rows of one (batch, head).

    Q, K, V: [B, H, N, HEAD_DIM] inputs (strides ``stride_{q,k,v}{b,h,n}``, unit last stride), one
       float dtype; typically three views into the packed [B, N, 3·H·HEAD_DIM] projection.
    O: [B, H, N, HEAD_DIM] output in the dtype of Q (strides ``stride_o*``; the op passes a view of
       a contiguous [B, N, H·HEAD_DIM] buffer or a contiguous [B, H, N, HEAD_DIM] one).
    LSE: [B, H, N] contiguous fp32, natural-log log-sum-exp of each row's masked, scaled scores;
       +inf for a row with no allowed key, so that exp(s - lse) recomputes p = 0 there.
    MASK: attention mask indexed [b, h, query, key] through ``stride_m*`` (stride 0 broadcasts),
       uint8 (nonzero = not allowed, nn.MultiheadAttention's convention) or float (added to the
       scaled scores) by MASK_KIND; unread when NO_MASK.
    KPM: key padding mask indexed [b, key] through ``stride_p*``, same kinds by KPM_KIND.
    qk_scale: softmax scale times log2(e); scores live in log2 units so the kernel uses exp2.
    Fuses the scale, the masks, causal masking, the softmax and both products; a row whose keys
    are all masked yields zeros.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(N_CTX, BLOCK_M)
    pid_m = pid % num_m
    bh = pid // num_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N_CTX
    dim_ok = dims < HEAD_DIM

    q_ptrs = Q + b * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_qn + dims[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    # Tile pointers start at key 0 and advance by BLOCK_N rows; the int64 base carries large offsets.
    k_ptrs = K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + dims[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn + dims[None, :]
    m_ptrs = MASK + b * stride_mb + h * stride_mh + rows.to(tl.int64)[:, None] * stride_mm \
        + cols[None, :] * stride_mn
    p_ptrs = KPM + b * stride_pb + cols[None, :] * stride_pn

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Causal rows never see keys past their own index: stop after this tile's diagonal.
    if IS_CAUSAL:
        hi = tl.minimum(N_CTX, (pid_m + 1) * BLOCK_M)
    else:
        hi = N_CTX
    for start_n in range(0, hi, BLOCK_N):
        keys = start_n + cols
        key_ok = keys < N_CTX
        k = tl.load(k_ptrs, mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        if IS_CAUSAL:
            s = tl.where(keys[None, :] <= rows[:, None], s, float("-inf"))
        s = _masked_scores(s, p_ptrs, key_ok[None, :], KPM_KIND)
        s = _masked_scores(s, m_ptrs, row_ok[:, None] & key_ok[None, :], MASK_KIND)

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # While every key so far is masked the max is -inf; shift by 0 so p = 0, never NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptrs, mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        m_ptrs += BLOCK_N * stride_mn
        p_ptrs += BLOCK_N * stride_pn

    alive = l_i > 0.0
    l_safe = tl.where(alive, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + rows.to(tl.int64)[:, None] * stride_on + dims[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    lse = tl.where(alive, (m_i + tl.math.log2(l_safe)) * _LN2, float("inf"))
    tl.store(LSE + bh.to(tl.int64) * N_CTX + rows, lse, mask=row_ok)


def _mask_strides(mask: torch.Tensor | None, heads: int) -> tuple[int, int, int, int]:
    """(batch, head, query, key) strides of an [N, N] or [B·H, N, N] mask; 0 broadcasts."""
    if mask is None:
        return 0, 0, 0, 0
    if mask.dim() == 2:
        return 0, 0, mask.stride(0), mask.stride(1)
    return heads * mask.stride(0), mask.stride(0), mask.stride(1), mask.stride(2)


def _mask_arg(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
    if mask is None:
        return None, NO_MASK
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), BOOL_MASK  # same bytes, same strides, loads as integers
    return mask, ADDITIVE_MASK


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
) -> None:
    """Launch over [B, H, N, d] views q, k, v, o (unit last stride; the op guarantees it) and a
    contiguous fp32 lse [B, H, N]. Masks: ``key_padding_mask`` [B, N], ``attn_mask`` [N, N] or
    [B·H, N, N], bool (True = not allowed) or float (additive)."""
    B, H, N, d = q.shape
    for t in (q, k, v, o):
        assert t.shape == (B, H, N, d) and t.stride(3) == 1
    assert lse.shape == (B, H, N) and lse.is_contiguous()
    if B * H * N == 0:
        return
    mask, mask_kind = _mask_arg(attn_mask)
    kpm, kpm_kind = _mask_arg(key_padding_mask)
    dummy = lse  # stands in for absent masks; never dereferenced behind a NO_MASK constexpr
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    _attention_fwd_kernel[grid](
        q, k, v, o, lse, dummy if mask is None else mask, dummy if kpm is None else kpm,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        *_mask_strides(mask, H),
        *((0, 0) if kpm is None else kpm.stride()),
        H, N, scale * 1.4426950408889634,
        HEAD_DIM=d, MASK_KIND=mask_kind, KPM_KIND=kpm_kind, IS_CAUSAL=is_causal,
        BLOCK_D=triton.next_power_of_2(d),
    )
