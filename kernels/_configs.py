"""Which launch configs each kernel may run, and the one it runs unless a tuned pick says otherwise.

A launch is described by its key (a ``GemmKey``, ``AttentionKey`` or ``PatchKey``): the shape class a
config is chosen for, what Triton's autotuners keyed on before (bucketed token count, widths, strides
along K, precision, dtypes) plus the flags that change a kernel's registers or traffic. For each
kernel this file holds:

* ``*_candidates(key)``: the short list that ``vitfast.tuning`` measures, pruned to what fits the key
  (shared memory and accumulator registers per thread, as Triton's pruners did);
* ``*_rule(arch, key)``: one config with no measuring. For sm_90 (H100, H200) it starts from the H100
  autotuner's picks at ViT-B shapes (benchmarks/NOTES.md) and trades tile size for programs where the
  token count is small: a 132-SM GPU running 18 programs of 256×128 for ViT-B's QKV at batch 1
  (M = 197) leaves 114 SMs idle, so the rule takes the largest tile of its preference list that still
  launches one program per SM, or the one that launches the most. Other architectures get small
  tiles that fit any GPU Triton supports (48-64 KiB of shared memory in fp32, 4 warps);
* ``*_interpreter(key)``: one small tile under Triton's interpreter, which keeps tests fast and
  deterministic (tests depend on these tiles: ragged edges at their sizes).

Every config an sm_90 rule returns is in its kernel's candidate list, so ``benchmarks/hopper_compile.py
--all`` compiles it and tuning measures it against the others. The resident-K/V attention forward's
rule, and which launches take that kernel, are in ``_resident_configs.py``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import triton

# H100/H200 shared memory per block (227 KiB opt-in); configs whose pipeline needs more are pruned.
SMEM_BYTES = 227 * 1024
# Programs in one wave on sm_90: H100 SXM and H200 have 132 SMs (H100 PCIe 114: about one wave too).
SM90_WAVE = 132
# fp32 accumulator registers per thread above which a GEMM config spills (of 255 per thread).
_MAX_ACC_REGS = 128
# After the measured picks, the rules take only tiles with at most this many accumulator registers
# per thread: NOTES.md's H100 counts show the 128-register tiles spilling under the GELU epilogue and
# under the residual epilogue in 8 warps, so smaller tiles keep room for every epilogue.
_LEAN_ACC_REGS = 64


class GemmKey(NamedTuple):
    """The shape class of a ``linear`` or ``gated_linear`` launch (n: the output width, H for the gated
    kernel). ``m`` is the next power of two of the token rows M."""
    m: int
    n: int
    k: int
    dtype: torch.dtype  # operands
    out_dtype: torch.dtype
    x_k_major: bool  # X's stride along K is 1 (the backward's transposed reads are not)
    w_k_major: bool
    precision: str  # tl.dot's input_precision
    activation: str  # the epilogue's activation ("none" included): registers
    residual: bool  # an [M, N] load in the epilogue
    preact: bool  # an [M, N] store of the pre-activation (training)
    dropout: bool  # Philox in the epilogue: registers


class AttentionKey(NamedTuple):
    """The shape class of an attention launch (forward, dK/dV or dQ). ``bh`` is the next power of two
    of batch × heads, the other factor of the program count."""
    bh: int
    n_q: int
    n_kv: int
    head_dim: int
    dtype: torch.dtype
    mask: int  # MASK_KIND
    kpm: int  # KPM_KIND
    causal: bool
    rope: int
    dropout: bool


class PatchKey(NamedTuple):
    """The shape class of a patch-embedding GEMM: ``rows`` (next power of two) × ``cols`` outputs, each
    a reduction of length ``reduction``, times ``splits`` slices of that reduction (the weight
    gradient's token slices)."""
    rows: int
    cols: int
    reduction: int
    splits: int
    dtype: torch.dtype
    precision: str


def key_text(key: tuple) -> str:
    """A launch key as text (the tuned-picks file's keys): ``"m=256 n=2304 ... dtype=bfloat16 ..."``."""
    return " ".join(f"{name}={str(value).removeprefix('torch.')}" for name, value in zip(key._fields, key))


def tile_configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """GEMM configs from (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps), tiles walked in groups of 8."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_stages=stages, num_warps=warps)
            for bm, bn, bk, stages, warps in shapes]


def by_waves(preferred: list[triton.Config], programs: Callable[[triton.Config], int], wave: int) -> triton.Config:
    """The first config of ``preferred`` (largest tiles first) that launches at least ``wave`` programs,
    else the one that launches the most (the earliest of those)."""
    for c in preferred:
        if programs(c) >= wave:
            return c
    return max(preferred, key=programs)


def _tiles(c: triton.Config) -> int:
    return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]


# ---------------------------------------------------------------------------------------------------
# GEMMs: linear (one accumulator) and gated_linear (two accumulators sharing each X tile).

LINEAR_CANDIDATES = tile_configs([  # BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps: Hopper, ViT widths
    (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
    (128, 256, 32, 4, 8), (256, 64, 64, 4, 4), (64, 256, 64, 4, 4), (128, 64, 64, 4, 4),
    (64, 128, 64, 5, 4), (128, 128, 32, 5, 4), (64, 64, 64, 5, 4), (64, 64, 32, 5, 4),
])
# Each BLOCK_M × BLOCK_N tile costs the registers and weight-tile shared memory of a BLOCK_M × 2·BLOCK_N
# plain tile.
GATED_CANDIDATES = tile_configs([
    (128, 128, 32, 4, 8), (128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (256, 64, 64, 3, 8), (64, 256, 64, 3, 8),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 128, 64, 5, 4), (64, 64, 64, 5, 4), (64, 64, 32, 5, 4),
])


def _gemm_tile(configs: list[triton.Config], bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    """The config of ``configs`` with these tiles, stages and warps (the rules pick from the lists)."""
    return next(c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                       c.num_stages, c.num_warps) == (bm, bn, bk, stages, warps))


# The H100 autotuner's picks at ViT-B, batch 64 (M = 12,608), bf16 (NOTES.md: registers, spills, smem).
_QKV_PICK = _gemm_tile(LINEAR_CANDIDATES, 256, 128, 64, 3, 8)  # bias only: 184 registers, 144 KiB
_FC1_PICK = _gemm_tile(LINEAR_CANDIDATES, 128, 256, 32, 4, 8)  # + GELU: 255 registers, 96 B spilled, 96 KiB
_PROJ_PICK = _gemm_tile(LINEAR_CANDIDATES, 128, 128, 32, 5, 4)  # + residual, K = 768: 252 registers, 80 KiB
_FC2_PICK = _gemm_tile(LINEAR_CANDIDATES, 128, 128, 64, 4, 4)  # + residual, K = 3072: 252 registers, 128 KiB
# The residual picks split on K between the two measured widths: a long reduction takes BLOCK_K = 64,
# whose fewer, wider steps pay off once the loop is long; K = 768 ran best with thin steps, 5 deep.
_LONG_K = 2048
# gated_linear's first tile is fc1's pick in its terms: 128 × 2·128 accumulators in 8 warps, 96 KiB.
_GATED_PICK = GATED_CANDIDATES[0]

# Small tiles for architectures other than sm_90: 2 stages of 64 × 64 × 32 fit in 48 KiB even with
# two fp32 weight tiles, under every GPU's shared memory.
_SAFE_GEMM = tile_configs([(64, 64, 32, 2, 4)])[0]
# One small tile keeps interpreter runs deterministic; 64×64 runs 2.5× faster there than 32×32 and
# still leaves ragged edges at the odd test sizes (M = 17, 591; N = 96; K = 100).
_INTERPRETER_GEMM = tile_configs([(64, 64, 32, 1, 4)])[0]


def _acc_regs(c: triton.Config, weight_tiles: int) -> int:
    return weight_tiles * _tiles(c) // (32 * c.num_warps)


def prune_tiles(configs: list[triton.Config], M: int, N: int, K: int, elem: int,
                weight_tiles: int = 1) -> list[triton.Config]:
    """The configs (in order) that fit an M × N × K problem with ``elem``-byte operands: shared memory
    and registers, no tile far wider than the problem; for a kernel that pairs each X tile with
    ``weight_tiles`` weight tiles in shared memory and keeps as many BLOCK_M × BLOCK_N fp32
    accumulators in registers. Never empty: the smallest tile stands in when none fits."""
    m_cap, n_cap = max(64, triton.next_power_of_2(M)), max(64, triton.next_power_of_2(N))
    k_cap = max(32, triton.next_power_of_2(K))
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        smem = c.num_stages * (bm + weight_tiles * bn) * bk * elem
        if (smem <= SMEM_BYTES and _acc_regs(c, weight_tiles) <= _MAX_ACC_REGS
                and bm <= m_cap and bn <= n_cap and bk <= k_cap):
            kept.append(c)
    return kept or [min(configs, key=lambda c: _tiles(c) * c.num_stages)]


def _gemm_rule(pick: triton.Config, candidates: list[triton.Config], weight_tiles: int,
               key: GemmKey) -> triton.Config:
    """``pick`` where the key's rows give a wave of its tiles, else smaller lean tiles (see _LEAN_ACC_REGS)."""
    lean = [c for c in candidates if _acc_regs(c, weight_tiles) <= _LEAN_ACC_REGS]
    fitting = prune_tiles([pick, *lean], key.m, key.n, key.k, key.dtype.itemsize, weight_tiles)

    def programs(c: triton.Config) -> int:
        return triton.cdiv(key.m, c.kwargs["BLOCK_M"]) * triton.cdiv(key.n, c.kwargs["BLOCK_N"])
    return by_waves(fitting, programs, SM90_WAVE)


def linear_rule(arch: int | str, key: GemmKey) -> triton.Config:
    """``linear``'s config on ``arch`` (Triton's target: 90 for sm_90) without measuring.

    sm_90: the H100 pick of the key's epilogue class (a residual; else an activation; else none), as
    long as M gives at least one wave of its tiles; below that the largest lean tile that does (ViT-B
    at batch 1, M = 197: 64 × 64 tiles, 144 programs for QKV) or, for narrow outputs, the tile with
    the most programs. fp32 operands double the shared memory, so the pruner moves them to smaller
    pipelines."""
    if arch != 90:
        return _SAFE_GEMM
    if key.residual:
        pick = _FC2_PICK if key.k >= _LONG_K else _PROJ_PICK
    else:
        pick = _QKV_PICK if key.activation == "none" else _FC1_PICK
    return _gemm_rule(pick, LINEAR_CANDIDATES, 1, key)


def gated_linear_rule(arch: int | str, key: GemmKey) -> triton.Config:
    """``gated_linear``'s config on ``arch`` without measuring: on sm_90 fc1's pick recast for two
    accumulators (128 × 128 × 32, 8 warps, 4 stages), then lean tiles by waves as ``linear_rule``."""
    if arch != 90:
        return _SAFE_GEMM
    return _gemm_rule(_GATED_PICK, GATED_CANDIDATES, 2, key)


# ---------------------------------------------------------------------------------------------------
# linear's descriptor kernel (kernels/linear_tma.py): persistent, TMA-fed, the epilogue in column slices.

def tma_configs(shapes: list[tuple[int, int, int, int, int, int]]) -> list[triton.Config]:
    """Descriptor-kernel configs from (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, EPILOGUE_SLICES)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "EPILOGUE_SLICES": sl},
                          num_stages=stages, num_warps=warps)
            for bm, bn, bk, stages, warps, sl in shapes]


LINEAR_TMA_CANDIDATES = tma_configs([
    (128, 256, 64, 3, 8, 2), (128, 256, 64, 3, 8, 4), (256, 128, 64, 3, 8, 2), (256, 128, 64, 3, 8, 4),
    (128, 128, 64, 4, 8, 1), (128, 128, 64, 4, 4, 2), (128, 128, 64, 5, 4, 2), (128, 128, 32, 5, 4, 2),
    (128, 128, 32, 5, 4, 4),
    (128, 64, 64, 4, 4, 1), (128, 64, 64, 4, 4, 2), (64, 128, 64, 4, 4, 1), (64, 128, 64, 4, 4, 2),
    (64, 64, 64, 4, 4, 1),
])
_INTERPRETER_TMA = tma_configs([(64, 64, 32, 1, 4, 2)])[0]


def linear_candidates(key: GemmKey) -> list[triton.Config]:
    """What tuning measures for a ``linear`` launch: the Hopper list, pruned to the key."""
    return prune_tiles(LINEAR_CANDIDATES, key.m, key.n, key.k, key.dtype.itemsize)


def gated_linear_candidates(key: GemmKey) -> list[triton.Config]:
    """What tuning measures for a ``gated_linear`` launch: its Hopper list, pruned to the key."""
    return prune_tiles(GATED_CANDIDATES, key.m, key.n, key.k, key.dtype.itemsize, weight_tiles=2)


def gemm_interpreter(key: GemmKey) -> triton.Config:
    """The GEMMs' fixed tile under Triton's interpreter."""
    return _INTERPRETER_GEMM


def _tma_fits(key: GemmKey, candidates: list[triton.Config] | None = None,
              weight_tiles: int = 1) -> list[triton.Config]:
    """The descriptor kernel's candidates (``linear``'s by default) whose pipeline and epilogue staging
    tile (BLOCK_M × BLOCK_N / EPILOGUE_SLICES of Y, which the TMA store reads from shared memory) fit
    together."""
    return [c for c in (LINEAR_TMA_CANDIDATES if candidates is None else candidates)
            if c.num_stages * (c.kwargs["BLOCK_M"] + weight_tiles * c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"]
            * key.dtype.itemsize
            + c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // c.kwargs["EPILOGUE_SLICES"] * key.out_dtype.itemsize
            <= SMEM_BYTES]


def linear_tma_candidates(key: GemmKey) -> list[triton.Config]:
    """What tuning measures for a descriptor-kernel launch: its list, pruned to the key and to shared
    memory with the epilogue's staging tile."""
    return prune_tiles(_tma_fits(key) or LINEAR_TMA_CANDIDATES[-1:], key.m, key.n, key.k, key.dtype.itemsize)


GATED_TMA_CANDIDATES = tma_configs([  # two accumulators: a BLOCK_M × BLOCK_N tile costs a BLOCK_M × 2·BLOCK_N one
    (128, 128, 64, 3, 8, 2), (128, 128, 64, 3, 8, 4), (128, 64, 64, 4, 4, 1), (128, 64, 64, 4, 4, 2),
    (64, 128, 64, 4, 4, 1), (64, 128, 64, 4, 4, 2), (64, 64, 64, 4, 4, 1), (64, 64, 64, 4, 4, 2),
])


def gated_linear_tma_candidates(key: GemmKey) -> list[triton.Config]:
    """What tuning measures for a gated descriptor-kernel launch: its list, pruned as ``linear``'s."""
    return prune_tiles(_tma_fits(key, GATED_TMA_CANDIDATES, 2) or GATED_TMA_CANDIDATES[-1:], key.m, key.n, key.k,
                       key.dtype.itemsize, weight_tiles=2)


def gated_linear_tma_rule(arch: int | str, key: GemmKey) -> triton.Config:
    """The gated descriptor kernel's config without measuring: ``linear_tma_rule``'s choice over its
    own list (the activation always runs in the most slices)."""
    return _tma_rule(GATED_TMA_CANDIDATES, 2, key)


def linear_tma_rule(arch: int | str, key: GemmKey) -> triton.Config:
    """The descriptor kernel's config without measuring (it runs on sm_90 only): 128 × 256 tiles in two
    warpgroups where the rows give a wave of them, below that the largest lean tile that does (as
    ``linear_rule``). An epilogue that holds tiles or temporaries of its own (an activation, dropout's
    Philox, a residual tile) runs in the most column slices the tile has a config for, a bias alone in
    the fewest: ``benchmarks/hopper_compile.py --vit-sites`` finds no spill that way at ViT-S/B/L/H
    widths (a residual in two slices of 128 × 256 sat at 252 registers, in four at 174)."""
    return _tma_rule(LINEAR_TMA_CANDIDATES, 1, key)


def _tma_rule(candidates: list[triton.Config], weight_tiles: int, key: GemmKey) -> triton.Config:
    fits = _tma_fits(key, candidates, weight_tiles) or candidates[-1:]
    tiles = [c for c in fits if c.kwargs["EPILOGUE_SLICES"] == _fewest_slices(c, fits)]
    tile = _gemm_rule(tiles[0], tiles, weight_tiles, key)
    same = [c for c in fits if _tile_shape(c) == _tile_shape(tile)]
    heavy = key.activation != "none" or key.dropout or key.residual
    return max(same, key=lambda c: c.kwargs["EPILOGUE_SLICES"]) if heavy else tile


def _tile_shape(c: triton.Config) -> tuple:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps


def _fewest_slices(c: triton.Config, configs: list[triton.Config]) -> int:
    return min(o.kwargs["EPILOGUE_SLICES"] for o in configs if _tile_shape(o) == _tile_shape(c))


def gemm_tma_interpreter(key: GemmKey) -> triton.Config:
    """The descriptor kernel's tile under the interpreter: 64 × 64 as the pointer kernel's, the epilogue
    in two slices so that the interpreter walks the slicing too."""
    return _INTERPRETER_TMA


# ---------------------------------------------------------------------------------------------------
# A GEMM site's tactic (kernels/gemm_tactic.py), chosen like a config, per fused kernel: TACTIC is 1 for
# vitfast's fused kernel, 2 for cuBLAS and the epilogue in a kernel of its own (the tuned-picks file
# takes integers).

TACTIC_FUSED, TACTIC_CUBLAS = 1, 2
_TACTICS = [triton.Config({"TACTIC": t}, num_warps=1, num_stages=1) for t in (TACTIC_FUSED, TACTIC_CUBLAS)]


def gemm_tactic_candidates(key: GemmKey) -> list[triton.Config]:
    """What tuning measures for a GEMM site: both tactics."""
    return list(_TACTICS)


def gemm_tactic_rule(arch: int | str, key: GemmKey) -> triton.Config:
    """A site's tactic without measuring: the fused kernel. On sm_90 it is the descriptor kernel, which
    is meant to match cuBLAS on the bare product and then saves the epilogue's pass over the output;
    no GPU has measured it yet (``benchmarks/gemm_sites.py`` does), so the rule cannot know better,
    and a tuning session measures both tactics per site."""
    return _TACTICS[0]


def gemm_tactic_interpreter(key: GemmKey) -> triton.Config:
    """Under the interpreter the fused kernels, which are what the tests prove (they ask for cuBLAS
    explicitly to prove that tactic)."""
    return _TACTICS[0]


# ---------------------------------------------------------------------------------------------------
# Attention: forward, backward dK/dV, backward dQ.

# Queries that fit this many rows take 16-row query tiles (tl.dot's smallest M) and nothing else:
# attention pooling's 1..4 learned queries would otherwise fill a 64- or 128-row tile with padding.
SHORT_QUERIES = 16


class _AttentionShape(NamedTuple):
    """How an attention kernel holds its tiles: ``operands`` [rows, d] tiles of ``resident`` rows
    (BLOCK_M or BLOCK_N) and ``accumulators`` fp32 [rows, d] sums for its whole life, at most
    ``max_acc`` accumulator registers per thread; two [rows, d] tiles of the other size stream
    through a ``num_stages`` pipeline. With ROPE the partner columns and the table rows are pipelined
    too; the estimate covers that for head sizes up to 64."""
    resident: str
    operands: int
    accumulators: int
    max_acc: int


def _attention_configs(tiles) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]


class _AttentionKernel(NamedTuple):
    shape: _AttentionShape
    candidates: list[triton.Config]  # longer queries, then short ones (BLOCK_M = SHORT_QUERIES)
    preferred: list[triton.Config]  # the rule's order for longer queries, largest tiles first
    preferred_short: list[triton.Config]
    safe: triton.Config  # other architectures
    safe_short: triton.Config


def _attention_tiles(configs: list[triton.Config], *tiles) -> list[triton.Config]:
    """The configs of ``configs`` with these (BLOCK_M, BLOCK_N, num_warps, num_stages), in this order."""
    index = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c for c in configs}
    return [index[t] for t in tiles]


def _attention_kernel(shape, tiles, short_tiles, preferred, preferred_short) -> _AttentionKernel:
    assert all(t[0] > SHORT_QUERIES for t in tiles) and all(t[0] == SHORT_QUERIES for t in short_tiles)
    configs = _attention_configs(tiles + short_tiles)
    safe, safe_short = _attention_configs([(32, 32, 4, 1), (SHORT_QUERIES, 32, 4, 1)])
    return _AttentionKernel(shape, configs, _attention_tiles(configs, *preferred),
                            _attention_tiles(configs, *preferred_short), safe, safe_short)


# Tiles are (BLOCK_M, BLOCK_N, num_warps, num_stages). No H100 pick was recorded for attention
# (NOTES.md lists the loaded candidates only), so the preferred tiles follow FlashAttention-2's
# Triton layout: the forward keeps 128 query rows in two warpgroups and streams 64-key tiles; dK/dV
# keep 128 keys and stream 32 queries, dQ the other way round. Each falls back to half its resident
# rows when the batch × heads × tiles product is under a wave (ViT-B at batch 1: 12 heads × 2 tiles).
_ATTENTION_FWD = _attention_kernel(
    _AttentionShape("BLOCK_M", 1, 1, 64),
    [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 4),
     (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 2), (64, 128, 8, 3)],
    [(16, 128, 4, 3), (16, 64, 4, 3), (16, 64, 4, 4), (16, 128, 4, 4), (16, 256, 4, 2)],
    [(128, 64, 8, 3), (64, 64, 4, 3)], [(16, 128, 4, 3)])
_ATTENTION_DKDV = _attention_kernel(
    _AttentionShape("BLOCK_N", 2, 2, 128),
    [(32, 64, 4, 2), (32, 64, 4, 3), (32, 128, 4, 3), (32, 128, 8, 2),
     (64, 64, 4, 3), (64, 128, 8, 2), (64, 128, 8, 3)],
    [(16, 64, 4, 3), (16, 128, 4, 3), (16, 128, 8, 2)],
    [(32, 128, 4, 3), (32, 64, 4, 3)], [(16, 128, 4, 3), (16, 64, 4, 3)])
_ATTENTION_DQ = _attention_kernel(
    _AttentionShape("BLOCK_M", 2, 1, 128),
    [(64, 32, 4, 2), (64, 32, 4, 3), (128, 32, 4, 3), (128, 32, 8, 2),
     (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3)],
    [(16, 64, 4, 3), (16, 128, 4, 3), (16, 128, 4, 2), (16, 256, 4, 2)],
    [(128, 32, 4, 3), (64, 32, 4, 3)], [(16, 128, 4, 3)])
ATTENTION_KERNELS = {"fwd": _ATTENTION_FWD, "dkdv": _ATTENTION_DKDV, "dq": _ATTENTION_DQ}
_INTERPRETER_ATTENTION, _INTERPRETER_SHORT_ATTENTION = _attention_configs([(32, 32, 4, 1), (SHORT_QUERIES, 32, 4, 1)])


def _attention_fit(shape: _AttentionShape, configs: list[triton.Config], key: AttentionKey) -> list[triton.Config]:
    """The configs (in order) whose tiles fit shared memory and registers at the key's head size and
    dtype; never empty (the smallest stands in)."""
    streamed = "BLOCK_N" if shape.resident == "BLOCK_M" else "BLOCK_M"
    block_d = triton.next_power_of_2(key.head_dim)
    elem = key.dtype.itemsize
    fit = [c for c in configs
           if (shape.operands * c.kwargs[shape.resident] + 2 * c.num_stages * c.kwargs[streamed]) * block_d * elem
           <= SMEM_BYTES
           and shape.accumulators * c.kwargs[shape.resident] * block_d // (32 * c.num_warps) <= shape.max_acc]
    return fit or [min(configs, key=lambda c: _tiles(c) * c.num_stages)]


def _short(key: AttentionKey) -> bool:
    return key.n_q <= SHORT_QUERIES


def attention_candidates(kernel: str) -> Callable[[AttentionKey], list[triton.Config]]:
    """What tuning measures for attention ``kernel`` ("fwd", "dkdv", "dq"): the 16-row query tiles
    exactly when N_Q fits one, then what fits. The few larger configs this estimate lets through that
    overflow (4 stages with RoPE at BLOCK_D = 128) fail to compile, and tuning skips them."""
    spec = ATTENTION_KERNELS[kernel]

    def candidates(key: AttentionKey) -> list[triton.Config]:
        short = _short(key)
        pool = [c for c in spec.candidates if (c.kwargs["BLOCK_M"] == SHORT_QUERIES) == short]
        return _attention_fit(spec.shape, pool, key)
    return candidates


def attention_rule(kernel: str) -> Callable[[int | str, AttentionKey], triton.Config]:
    """The rule of attention ``kernel`` ("fwd", "dkdv", "dq"): on sm_90 its preferred tiles that fit
    the head size, by waves of (tiles of the resident dimension) × batch × heads; 32-row (16 for short
    queries) tiles, 4 warps, no pipelining elsewhere."""
    spec = ATTENTION_KERNELS[kernel]
    tokens = "n_kv" if spec.shape.resident == "BLOCK_N" else "n_q"

    def rule(arch: int | str, key: AttentionKey) -> triton.Config:
        short = _short(key)
        if arch != 90:
            return spec.safe_short if short else spec.safe
        fitting = _attention_fit(spec.shape, spec.preferred_short if short else spec.preferred, key)
        n = getattr(key, tokens)
        return by_waves(fitting, lambda c: triton.cdiv(n, c.kwargs[spec.shape.resident]) * key.bh, SM90_WAVE)
    return rule


def attention_interpreter(key: AttentionKey) -> triton.Config:
    """Attention's fixed tile under the interpreter (N = 65 still spans three tiles in both directions);
    short queries take the 16-row tile, as on the GPU."""
    return _INTERPRETER_SHORT_ATTENTION if _short(key) else _INTERPRETER_ATTENTION



# ---------------------------------------------------------------------------------------------------
# Patch embedding: forward, image gradient and weight gradient, each one GEMM with gathered operands.

PATCH_CANDIDATES = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w)
                    for bm, bn, bk, s, w in [(128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (64, 128, 64, 4, 4),
                                             (128, 64, 64, 4, 4), (128, 128, 32, 4, 4), (64, 256, 32, 4, 8)]]
# NOTES.md's H100 counts: 128×256×64 in 8 warps and 128×128×32 in 4 warps spill, the others do not.
# The gathered (im2col) loads favour the first, which the weight gradient's token slices are sized
# for (two waves of 128 × 128 tiles); the 64-wide tiles double the programs of a small batch.
_PATCH_PREFERRED = [PATCH_CANDIDATES[i] for i in (0, 2, 3)]
_SAFE_PATCH = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, num_stages=2, num_warps=4)
INTERPRETER_PATCH = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_stages=1, num_warps=4)


def _patch_fit(configs: list[triton.Config], key: PatchKey) -> list[triton.Config]:
    """The configs (in order) no wider than the key's columns and reduction whose operand tiles fit
    shared memory; never empty (the first stands in)."""
    elem = key.dtype.itemsize
    kept = [c for c in configs
            if c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(key.cols))
            and c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(key.reduction))
            and (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * elem * c.num_stages <= SMEM_BYTES]
    return kept or configs[:1]


def patch_candidates(key: PatchKey) -> list[triton.Config]:
    """What tuning measures for a patch-embedding GEMM: the Hopper list, pruned to the key."""
    return _patch_fit(PATCH_CANDIDATES, key)


def patch_rule(arch: int | str, key: PatchKey) -> triton.Config:
    """A patch-embedding GEMM's config without measuring: on sm_90 the preferred tiles that fit, by
    waves of output tiles × slices; elsewhere 32 × 64 × 32 in 2 stages."""
    if arch != 90:
        return _SAFE_PATCH
    fitting = _patch_fit(_PATCH_PREFERRED, key)
    return by_waves(fitting, lambda c: triton.cdiv(key.rows, c.kwargs["BLOCK_M"])
                    * triton.cdiv(key.cols, c.kwargs["BLOCK_N"]) * key.splits, SM90_WAVE)


def patch_interpreter(key: PatchKey) -> triton.Config:
    """The patch embedding's fixed tile under the interpreter."""
    return INTERPRETER_PATCH


# ---------------------------------------------------------------------------------------------------
# LayerNorm: memory-bound, one config per width, no candidates to measure.

def layer_norm_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N ≥ n columns, num_warps) for rows of width ``n``: about 4K elements per
    program keeps registers in check and rows of 192..1280 bandwidth-bound."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, 4096 // block_n))
    elems = block_m * block_n
    num_warps = 4 if elems <= 2048 else 8 if elems <= 8192 else 16
    return block_m, block_n, num_warps
