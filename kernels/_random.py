"""Dropout's keep mask, shared by every kernel that drops: counter-based, so it is regenerated, never stored.

Each element draws one uniform number from Philox-4x32-10 (``tl.philox``), keyed by a 64-bit seed
that the op draws from PyTorch's generator once per call (``vitfast/ops/_random.py``), with the
element's coordinates as the counter: (c0, c1, c2, c3) = (column, row, plane, site). The number
depends on the element alone, not on the tile that computes it, so a forward and a backward that
tile differently (the attention kernels do) regenerate the same mask, and a launch's configuration
never changes which elements drop.

* GEMM epilogues (site ``GEMM``): element (row, column) of the [M, N] output; ``plane`` is
  row >> 32 (0 below four billion rows).
* Attention (site ``ATTENTION``): probability (query i, key j) of batch·head ``bh``: column j,
  row i, plane bh.

The element is kept when its uniform u in [0, 1) satisfies u >= p: probability 1 - p exactly up to
the 2⁻³¹ grid of u. ``keep_mask`` below launches the same function over a whole grid, so tests can
recover the mask a kernel used from its seed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch

GEMM, ATTENTION = 0, 1  # sites: the fourth Philox counter


@triton.jit
def keep(seed, column, row, plane, SITE: tl.constexpr, p):
    """True where an element survives dropout with probability p: ``seed`` an int64 scalar, ``column``,
    ``row`` and ``plane`` broadcastable int32 arrays of the element's coordinates."""
    zero = (column + row + plane) * 0  # broadcast the counters to one shape before Philox mixes them
    r, _, _, _ = tl.philox(seed, (column + zero).to(tl.uint32, bitcast=True), (row + zero).to(tl.uint32, bitcast=True),
                           (plane + zero).to(tl.uint32, bitcast=True), (zero + SITE).to(tl.uint32, bitcast=True))
    return tl.uint_to_uniform_float(r) >= p


@triton.jit
def _keep_mask_kernel(SEED, OUT, ROWS, COLS, p, SITE: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[plane, row, column] = keep(...) as uint8 for one row of one plane and BLOCK columns."""
    pid = tl.program_id(0)
    plane, row = pid // ROWS, pid % ROWS
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    kept = keep(tl.load(SEED), cols, row, plane, SITE, p)
    tl.store(OUT + pid.to(tl.int64) * COLS + cols, kept.to(tl.uint8), mask=cols < COLS)


def keep_mask(seed: torch.Tensor, planes: int, rows: int, cols: int, p: float, site: int) -> torch.Tensor:
    """The bool keep mask [planes, rows, cols] that a kernel given ``seed`` (the int64 tensor of one
    element the op drew) and ``p`` applies at ``site``: for a GEMM, planes = 1 and [rows, cols] is the
    output; for attention, [batch·heads, queries, keys]."""
    out = torch.empty(planes, rows, cols, dtype=torch.uint8, device=seed.device)
    if out.numel():
        block = 128
        launch(_keep_mask_kernel, (planes * rows, triton.cdiv(cols, block)), (seed, out, rows, cols, float(p)),
               dict(SITE=site, BLOCK=block))
    return out.bool()
