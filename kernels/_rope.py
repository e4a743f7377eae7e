"""Rotary position embedding (timm's 2-D RoPE) applied to q and k tiles as the attention kernels load them.

timm (EVA02, the RoPE ViTs) rotates every token after the first ``prefix`` ones (CLS, registers)
with a table [.., tokens - prefix, 2·d] holding sin | cos per column:

    rotated[j] = x[j]·cos[j] + sign(j)·x[partner(j)]·sin[j]

with the pairs either interleaved (``rot``: partner(2i) = 2i+1, partner(2i+1) = 2i) or split in
halves (``rope_rotate_half``: partner(j) = j ± d/2), and sign(j) = −1 where partner(j) > j, +1
otherwise. The rotation is computed in fp32 and rounded once to the dtype of x, as timm rounds it
before attention. Nothing rotated is ever written: the kernels load a tile, load its partner columns
through permuted column indices (the same cache lines) and the table rows of its tokens, and rotate.

The backward kernels compute gradients with respect to the rotated q and k, then apply the transpose
of the rotation before they store:

    g[j] = g_rot[j]·cos[j] − sign(j)·sin[partner(j)]·g_rot[partner(j)]

where the partner columns of a register tile come from ``tl.gather`` (an exact permutation).
"""
from __future__ import annotations

import triton
import triton.language as tl

# ROPE kinds (constexpr).
NO_ROPE, ROPE_INTERLEAVED, ROPE_HALF = 0, 1, 2


@triton.jit
def _partner(dims, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """The column each of ``dims`` pairs with. Every result is in [0, BLOCK_D) for padded columns
    too (BLOCK_D is even and at least HEAD_DIM), so it can index a register tile."""
    if ROPE == 1:
        return dims ^ 1
    else:
        return tl.where(dims < HEAD_DIM // 2, dims + HEAD_DIM // 2, dims - HEAD_DIM // 2)


@triton.jit
def _table(TAB, tokens, n_tokens, prefix, stride_rn, cols, HEAD_DIM: tl.constexpr, other: tl.constexpr):
    """fp32 [tokens, cols] entries of the table rows ``tokens - prefix`` (TAB already points at the
    sin or the cos half of this (batch, head)'s table); ``other`` where a token is a prefix token or
    past ``n_tokens``, or a column is padding."""
    pos = tokens - prefix
    ok = ((pos >= 0) & (tokens < n_tokens))[:, None] & (cols < HEAD_DIM)[None, :]
    ptrs = TAB + pos.to(tl.int64)[:, None] * stride_rn + cols[None, :]
    return tl.load(ptrs, mask=ok, other=other).to(tl.float32)


@triton.jit
def _rotated(x, xp, dims, partner, TAB, tokens, n_tokens, prefix, stride_rn, HEAD_DIM: tl.constexpr):
    """x·cos + sign·x_partner·sin of the tile ``x`` [tokens, BLOCK_D] and its partner columns ``xp``,
    in fp32, rounded once to the dtype of x."""
    sin = _table(TAB, tokens, n_tokens, prefix, stride_rn, dims, HEAD_DIM, 0.0)
    cos = _table(TAB + HEAD_DIM, tokens, n_tokens, prefix, stride_rn, dims, HEAD_DIM, 1.0)
    sign = tl.where(partner > dims, -1.0, 1.0)
    return (x.to(tl.float32) * cos + sign[None, :] * xp.to(tl.float32) * sin).to(x.dtype)


@triton.jit
def load_rotated(ptrs, ok, TAB, tokens, n_tokens, prefix, stride_rn, dims,
                 HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """The [tokens, BLOCK_D] tile at ``ptrs`` (unit column stride, loaded under ``ok``), rotated by the
    table at TAB ([n_tokens - prefix, 2·HEAD_DIM] rows through ``stride_rn``) unless ROPE is NO_ROPE,
    in the tile's dtype. Prefix tokens and padding pass through unchanged (cos = 1, sin = 0)."""
    x = tl.load(ptrs, mask=ok, other=0.0)
    if ROPE != 0:
        partner = _partner(dims, HEAD_DIM, ROPE)
        xp = tl.load(ptrs + (partner - dims)[None, :], mask=ok, other=0.0)
        x = _rotated(x, xp, dims, partner, TAB, tokens, n_tokens, prefix, stride_rn, HEAD_DIM)
    return x


@triton.jit
def rotate_tile(x, tokens, TAB, n_tokens, prefix, stride_rn, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """``load_rotated`` for a tile already loaded (a descriptor's [tokens, BLOCK_D] box, zeros past
    the head size): the partner columns come from the tile itself by ``tl.gather``."""
    if ROPE != 0:
        dims = tl.arange(0, x.shape[1])
        partner = _partner(dims, HEAD_DIM, ROPE)
        xp = tl.gather(x, tl.broadcast_to(partner[None, :], x.shape), 1)
        x = _rotated(x, xp, dims, partner, TAB, tokens, n_tokens, prefix, stride_rn, HEAD_DIM)
    return x


@triton.jit
def unrotate(g, TAB, tokens, n_tokens, prefix, stride_rn, dims, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """The fp32 gradient ``g`` [tokens, BLOCK_D] with respect to rotated rows, taken back through
    the rotation (its transpose) to the gradient with respect to the rows as stored; ``g`` itself
    when ROPE is NO_ROPE. Padded columns of the result are garbage: the caller masks its store."""
    if ROPE != 0:
        partner = _partner(dims, HEAD_DIM, ROPE)
        g_partner = tl.gather(g, tl.broadcast_to(partner[None, :], g.shape), 1)
        sin_partner = _table(TAB, tokens, n_tokens, prefix, stride_rn, partner, HEAD_DIM, 0.0)
        cos = _table(TAB + HEAD_DIM, tokens, n_tokens, prefix, stride_rn, dims, HEAD_DIM, 1.0)
        sign = tl.where(partner > dims, 1.0, -1.0)  # sign(partner(j)) = −sign(j)
        g = g * cos + sign[None, :] * sin_partner * g_partner
    return g
