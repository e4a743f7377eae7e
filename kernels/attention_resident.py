"""Attention's forward for ViT token counts: each program holds a head's whole K and V on chip.

The general forward (``attention._attention_fwd_kernel``) streams K and V in BLOCK_N-key tiles past
BLOCK_M query rows, so a (batch, head) of N tokens reads its K and V once per query tile, and every
tile of keys rescales the running output. ViT sequences are short and fixed (197 or 257 tokens at
224 px, 577 at 384 px, 729 for SigLIP towers): a head's K and V, 2 × N × d elements, fit in an sm_90
block's shared memory up to several hundred tokens. Here a program

* loads its (batch, head)'s K and V once, in ``KV_CHUNKS`` chunks of ``BLOCK_KV`` keys, each one TMA
  copy through a tensor descriptor (the copy engine zero-fills keys past N_KV and columns past the
  head size); they stay in shared memory for the program's life;
* walks query tiles ``group``, ``group + GROUPS``, ... of that head: ``GROUPS`` programs share a head,
  so that small batches still fill the GPU;
* per query tile computes the scores against every key, the softmax and the output. With one chunk
  (N_KV ≤ 256: ViT-S/B/L at 224 px) the softmax is exact in one pass: one row max, one exp2 per
  score, one sum, no rescaling. Over several chunks it keeps the running max and sum across them
  (the online softmax, KV_CHUNKS - 1 rescales per query tile);
* writes O through a descriptor (rows past N_Q dropped by the copy engine) and the log-sum-exp as
  the general kernel does, so the backward is the same for either forward.

Traffic per (batch, head): Q, K and V read once and O written once, the op's compulsory traffic; the
general kernel reads K and V cdiv(N_Q, BLOCK_M) times (from L2 when its programs run together).
Causal masking (top-left), the rotary embedding (q and each K chunk rotated as they arrive, the
partner columns by ``tl.gather``) and N_Q ≠ N_KV are handled here; masks, dropout and the rest go to
the general kernel by ``_resident_configs.reason``, and the model's report lists the route and reason
of each launch key (``attention.routes``).
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from . import _resident_configs, _select, linear_tma
from ._configs import AttentionKey
from ._launch import launch
from ._rope import rotate_tile
from ._tuning import interpreting

_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _head_desc(P, b, h, stride_b, stride_h, stride_n, N, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """The descriptor of one (batch, head)'s [N, HEAD_DIM] rows of a [B, H, N, d] view, read and
    written in [BLOCK_R, BLOCK_D] boxes."""
    return tl.make_tensor_descriptor(P + b * stride_b + h * stride_h, [N, HEAD_DIM], [stride_n, 1],
                                     [BLOCK_R, BLOCK_D])


@triton.jit
def _rows(desc, start, BLOCK_R: tl.constexpr, tab, n_tokens, prefix, stride_rn, HEAD_DIM: tl.constexpr,
          ROPE: tl.constexpr):
    """Rows ``start`` .. ``start + BLOCK_R`` of a head (zeros past its end), rotated when ROPE."""
    x = desc.load([start, 0])
    return rotate_tile(x, start + tl.arange(0, BLOCK_R), tab, n_tokens, prefix, stride_rn, HEAD_DIM, ROPE)


@triton.jit
def _chunks(desc, BLOCK_KV: tl.constexpr, KV_CHUNKS: tl.constexpr, tab, n_tokens, prefix, stride_rn,
            HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """A head's first KV_CHUNKS chunks of BLOCK_KV rows, as a tuple (each its own shared-memory tile)."""
    out = (_rows(desc, 0, BLOCK_KV, tab, n_tokens, prefix, stride_rn, HEAD_DIM, ROPE),)
    for c in tl.static_range(1, KV_CHUNKS):
        out = out + (_rows(desc, c * BLOCK_KV, BLOCK_KV, tab, n_tokens, prefix, stride_rn, HEAD_DIM, ROPE),)
    return out


@triton.jit
def _attention_resident_fwd_kernel(
    Q, K, V, O, LSE, TAB,  # noqa: E741  (O: the output, as the papers name it)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_rb, stride_rh, stride_rn,
    H, N_Q, N_KV, ROPE_PREFIX, qk_scale, GROUPS,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_KV: tl.constexpr, KV_CHUNKS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """softmax(scale · Q Kᵀ) V for query tiles ``group``, ``group + GROUPS``, ... of one (batch, head),
    with program_id(0) = batch·head · GROUPS + group.

    Q, O: [B, H, N_Q, HEAD_DIM] and K, V: [B, H, N_KV, HEAD_DIM] views, one 16-bit dtype, unit last
       stride, every base 16-byte aligned and the batch, head and token strides (``stride_{q,k,v,o}*``)
       multiples of 16 bytes (what a descriptor needs; the launcher checks it); 0 < N_KV ≤ KV_CHUNKS ·
       BLOCK_KV.
    LSE, TAB, ROPE_PREFIX, ``stride_r*``, qk_scale, IS_CAUSAL and ROPE as in
       ``attention._attention_fwd_kernel``.
    GROUPS: the programs per (batch, head), a launch argument rather than a constexpr, so that batch
       sizes whose rule differs only in it share one compiled kernel (Triton still specializes 1).
    """
    pid = tl.program_id(0)
    bh = pid // GROUPS
    group = pid % GROUPS
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    tab = TAB + b * stride_rb + h * stride_rh
    q_desc = _head_desc(Q, b, h, stride_qb, stride_qh, stride_qn, N_Q, HEAD_DIM, BLOCK_M, BLOCK_D)
    k_desc = _head_desc(K, b, h, stride_kb, stride_kh, stride_kn, N_KV, HEAD_DIM, BLOCK_KV, BLOCK_D)
    v_desc = _head_desc(V, b, h, stride_vb, stride_vh, stride_vn, N_KV, HEAD_DIM, BLOCK_KV, BLOCK_D)
    o_desc = _head_desc(O, b, h, stride_ob, stride_oh, stride_on, N_Q, HEAD_DIM, BLOCK_M, BLOCK_D)
    ks = _chunks(k_desc, BLOCK_KV, KV_CHUNKS, tab, N_KV, ROPE_PREFIX, stride_rn, HEAD_DIM, ROPE)
    vs = _chunks(v_desc, BLOCK_KV, KV_CHUNKS, tab, N_KV, ROPE_PREFIX, stride_rn, HEAD_DIM, 0)

    for tile in range(group, tl.cdiv(N_Q, BLOCK_M), GROUPS):
        start = tile * BLOCK_M
        rows = start + tl.arange(0, BLOCK_M)
        q = _rows(q_desc, start, BLOCK_M, tab, N_Q, ROPE_PREFIX, stride_rn, HEAD_DIM, ROPE)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for c in tl.static_range(KV_CHUNKS):
            keys = c * BLOCK_KV + tl.arange(0, BLOCK_KV)
            s = tl.dot(q, tl.trans(ks[c]), input_precision="ieee") * qk_scale
            s = tl.where(keys[None, :] < N_KV, s, float("-inf"))
            if IS_CAUSAL:  # top-left: query i sees keys 0..i
                s = tl.where(keys[None, :] <= rows[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row whose keys so far are all masked has max -inf: shift by 0 so p = 0, never NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_shift[:, None])
            if c == 0:  # nothing to rescale yet: with one chunk the softmax is exact in one pass
                l_i = tl.sum(p, axis=1)
            else:
                alpha = tl.math.exp2(m_i - m_shift)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None]
            acc = tl.dot(p.to(vs[c].dtype), vs[c], acc, input_precision="ieee")
            m_i = m_new

        alive = l_i > 0.0
        l_safe = tl.where(alive, l_i, 1.0)
        o_desc.store([start, 0], (acc / l_safe[:, None]).to(o_desc.dtype))
        lse = tl.where(alive, (m_i + tl.math.log2(l_safe)) * _LN2, float("inf"))
        tl.store(LSE + bh.to(tl.int64) * N_Q + rows, lse, mask=rows < N_Q)


def _view_ok(t: torch.Tensor, output: bool = False) -> bool:
    """Whether a [B, H, N, d] view can be described head by head: unit last stride, a 16-byte-aligned
    base, batch, head and token strides that are multiples of 16 bytes, and rows that do not overlap
    (an output is not broadcast at all)."""
    e = t.element_size()
    b, h, n, _ = t.stride()
    rows_apart = n >= t.shape[3] and (not output or (b > 0 or t.shape[0] == 1) and (h > 0 or t.shape[1] == 1))
    return (t.stride(3) == 1 and rows_apart and t.data_ptr() % linear_tma.TMA_ALIGN == 0
            and all((s * e) % linear_tma.TMA_ALIGN == 0 for s in (b, h, n)))


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, key: AttentionKey) -> str | None:
    """Why ``attention.attention_fwd`` launches the general kernel for these views and ``key``, or None
    when this kernel takes the launch."""
    why = _resident_configs.reason(key)
    if why is None and not linear_tma.arch_takes_descriptors(q.get_device()):
        why = "not an sm_90 GPU (the kernel's descriptors and configs are Hopper's)"
    if why is None and not (all(_view_ok(t) for t in (q, k, v)) and _view_ok(o, output=True)):
        why = "q, k, v or the output not 16-byte aligned for descriptors"
    return why


def launcher(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
             rope_args: tuple, prefix: int, scale: float, meta: dict) -> Callable[[triton.Config], None]:
    """The launch of the views ``attention.attention_fwd`` checked (``takes`` holds) as a function of the
    config: q, o [B, H, N_Q, d], k, v [B, H, N_KV, d], lse [B, H, N_Q] fp32; ``rope_args`` (table, its
    batch, head and token strides) and ``prefix`` as that launcher builds them, ``meta`` its HEAD_DIM,
    IS_CAUSAL, ROPE and BLOCK_D."""
    B, H, N_Q, _ = q.shape
    args = (q, k, v, o, lse, rope_args[0], *(s for t in (q, k, v, o) for s in t.stride()[:3]), *rope_args[1:],
            H, N_Q, k.shape[2], prefix, scale * 1.4426950408889634)
    consts = {name: meta[name] for name in ("HEAD_DIM", "IS_CAUSAL", "ROPE", "BLOCK_D")}
    if not interpreting():
        linear_tma.ensure_allocator()

    def run(cfg: triton.Config) -> None:
        meta = _select.tile_meta(cfg)
        groups = meta.pop("GROUPS")
        if meta["KV_CHUNKS"] * meta["BLOCK_KV"] < k.shape[2]:  # a config read from a tuned-picks file, say
            raise ValueError(f"attention_resident: {meta['KV_CHUNKS']} chunks of {meta['BLOCK_KV']} keys cannot "
                             f"hold {k.shape[2]} keys")
        launch(_attention_resident_fwd_kernel, (B * H * groups,), (*args, groups), {**consts, **meta})
    return run


ATTENTION_RESIDENT = _select.kernel("attention_resident_fwd", _attention_resident_fwd_kernel, _resident_configs.rule,
                                    _resident_configs.candidates, _resident_configs.interpreter)
