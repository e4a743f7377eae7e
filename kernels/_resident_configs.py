"""Which attention forwards take the resident-K/V kernel (``attention_resident.py``), and its configs.

A launch comes here by ``reason(key)`` returning None: 16-bit operands, no attention or padding mask,
no dropout, more than ``SHORT_QUERIES`` queries, and K and V of one head fitting shared memory in the
rule's chunks. The rest stays on the general kernel, each for a reason the report prints:

* fp32: wgmma takes 16-bit operands (an exact fp32 product runs on FMAs, where the general kernel's
  smaller tiles are the ones that fit);
* masks and dropout: a mask tile per chunk and a Philox draw per score are independent of the softmax
  chain, so across the unrolled chunks the compiler keeps many of them live; a version of this kernel
  that took them spilled 0.1-4.3 KB per thread on sm_90 (benchmarks/NOTES.md), where the streaming
  kernel handles 64 keys at a time;
* short queries (attention pooling's 1..4): the general kernel's 16-row tiles already read K and V
  once per head;
* K and V over shared memory: beyond ``max_keys`` (832 keys at head size 64, 384 at 65-128 in 16-bit
  elements, whose tiles pad to 128 columns, and at most 16 chunks: 1,024 keys at head size 16 or 32).

The sm_90 rule, per key:

* chunks (BLOCK_KV keys each): one chunk of next_pow2(N_KV) keys up to ``one_pass_keys`` (256 at head
  size ≤ 64, so ViT's 197 tokens take one pass with the exact softmax; 128 at 65-128, whose output
  accumulator is twice as wide), else chunks of 64 (the chunk loop is unrolled, and 64-key chunks keep
  one score tile of 32 registers per thread live; 128- and 256-key chunks spill 8-144 B per thread
  past 2-4 of them).
  With RoPE, chunks of 64 always: K is rotated in registers chunk by chunk as it loads, and a 256-key
  chunk's rotation (K, its partner columns, sin and cos) spills 0.8-1 KB per thread;
* query rows (BLOCK_M): 64 in one warpgroup (4 warps) while a program's shared memory leaves room for
  two programs per SM, else 128 in two warpgroups (8 warps) sharing the one copy of K and V;
* GROUPS, the programs that share a head's query tiles: the count that minimizes the estimated time
  (rounds of programs over the SMs) × (query tiles per program + one for loading K and V), the fewest
  on a tie, from the key's batch × heads (rounded up to a power of two): at ViT-B's 197 tokens 4 at
  batch 1, 2 at batch 8, 1 from batch 32 on (each head's K and V loaded once).

None of this is measured yet on a GPU: ``benchmarks/attention_shapes.py`` times it against the general
kernel and SDPA's backends, and tuning (``candidates``) measures the other chunk sizes and row counts.
"""
from __future__ import annotations

import functools

import torch
import triton

from ._configs import SHORT_QUERIES, SM90_WAVE, SMEM_BYTES, AttentionKey

# The most keys one chunk takes (a descriptor's box spans at most 256 rows).
ONE_PASS_KEYS = 256
# Registers per thread for one 64-query slice's scores and output accumulator (fp32, a warpgroup of 128
# threads: BLOCK_KV / 2 + BLOCK_D / 2) in a one-pass chunk: 256 keys at head size 64 compile to 255
# registers without spilling, 256 keys at 128 padded columns spill.
_ONE_PASS_REGS = 160
_CHUNK = 64
# The most chunks a program holds: the chunk loop is unrolled, one copy of its body per chunk.
_MAX_CHUNKS = 16
_WARPS = {64: 4, 128: 8}  # query rows -> warps: one warpgroup per 64 rows
# Under the interpreter: 32 query rows, and two programs per head so that each walks a stride of tiles.
_INTERPRETER_ROWS, _INTERPRETER_GROUPS = 32, 2


def smem_bytes(key: AttentionKey, block_m: int, block_kv: int, chunks: int) -> int:
    """Shared memory of a config: K and V in ``chunks`` tiles of [block_kv, BLOCK_D], one [block_m,
    BLOCK_D] query tile (reused to stage the output), and 1 KiB for barriers and the compiler's
    scratch (what Triton 3.6 allocates for these tiles, checked by ``hopper_compile.py``)."""
    block_d = triton.next_power_of_2(key.head_dim)
    return (2 * chunks * block_kv + block_m) * block_d * key.dtype.itemsize + 1024


def one_pass_keys(head_dim: int) -> int:
    """The most keys the rule takes in one chunk at ``head_dim``: 256 up to 64 columns, 128 at 65-128."""
    most = 2 * (_ONE_PASS_REGS - triton.next_power_of_2(head_dim) // 2)
    return min(ONE_PASS_KEYS, 1 << (most.bit_length() - 1))


def _chunk(key: AttentionKey) -> int:
    if key.rope or key.n_kv > one_pass_keys(key.head_dim):
        return _CHUNK
    return max(16, triton.next_power_of_2(key.n_kv))


def _groups(key: AttentionKey, block_m: int, per_sm: int) -> int:
    tiles = triton.cdiv(key.n_q, block_m)
    slots = SM90_WAVE * per_sm
    return min(range(1, tiles + 1),
               key=lambda g: (triton.cdiv(key.bh * g, slots) * (triton.cdiv(tiles, g) + 1), g))


def _config(key: AttentionKey, block_m: int, block_kv: int, groups: int | None = None) -> triton.Config | None:
    """The config of these tiles for ``key``, GROUPS by the estimate unless given; None when it does
    not fit shared memory."""
    chunks = triton.cdiv(key.n_kv, block_kv)
    smem = smem_bytes(key, block_m, block_kv, chunks)
    if smem > SMEM_BYTES or chunks > _MAX_CHUNKS:
        return None
    warps = _WARPS.get(block_m, 4)
    if groups is None:
        groups = _groups(key, block_m, 2 if warps == 4 and 2 * smem <= SMEM_BYTES else 1)
    return triton.Config({"BLOCK_M": block_m, "BLOCK_KV": block_kv, "KV_CHUNKS": chunks, "GROUPS": groups},
                         num_warps=warps, num_stages=1)


@functools.cache  # the route asks for every forward launch on the checked path: a lookup, not 30 µs
def _rule_config(key: AttentionKey) -> triton.Config | None:
    block_kv = _chunk(key)
    two_per_sm = 2 * smem_bytes(key, 64, block_kv, triton.cdiv(key.n_kv, block_kv)) <= SMEM_BYTES
    return _config(key, 64 if two_per_sm else 128, block_kv) or _config(key, 64, block_kv)


def max_keys(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """The most keys a head of ``head_dim`` holds on chip in the rule's chunks (no other flag set)."""
    n = one_pass_keys(head_dim)
    key = AttentionKey(1, n + 1, n + 1, head_dim, dtype, 0, 0, False, 0, False)
    while _rule_config(key._replace(n_kv=n + _CHUNK)) is not None:
        n += _CHUNK
    return n


@functools.cache
def reason(key: AttentionKey) -> str | None:
    """Why a forward launch of ``key`` stays on the general kernel, or None when the resident kernel
    takes it (the launcher also needs descriptor-ready views and an sm_90 device)."""
    if key.dtype not in (torch.float16, torch.bfloat16):
        return f"{str(key.dtype).removeprefix('torch.')} operands (wgmma takes 16-bit ones)"
    if key.mask or key.kpm:
        return "an attention or padding mask"
    if key.dropout:
        return "dropout"
    if key.n_q <= SHORT_QUERIES:
        return f"{key.n_q} queries (the general kernel's 16-row tiles read K and V once)"
    if key.n_kv == 0:
        return "no keys"
    if _rule_config(key) is None:
        if triton.cdiv(key.n_kv, _chunk(key)) > _MAX_CHUNKS:
            return f"{key.n_kv} keys (more than {_MAX_CHUNKS} chunks of {_chunk(key)})"
        return f"{key.n_kv} keys of head size {key.head_dim} (a head's K and V exceed shared memory)"
    return None


def rule(arch: int | str, key: AttentionKey) -> triton.Config:
    """The resident kernel's config for ``key`` (one that ``reason`` accepts); the same on every
    architecture, since only sm_90 launches it."""
    config = _rule_config(key)
    assert config is not None, f"the resident kernel does not take {key}: {reason(key)}"
    return config


def candidates(key: AttentionKey) -> list[triton.Config]:
    """What tuning measures: 64 or 128 query rows × chunks of 64, 128 or 256 keys (at most 256 in
    all below that count), each with its estimated GROUPS, where it fits; the rule's pick among them."""
    out = [_rule_config(key)]
    for block_m in (64, 128):
        for block_kv in (64, 128, ONE_PASS_KEYS):
            if block_kv > max(_CHUNK, triton.next_power_of_2(key.n_kv)):
                continue
            c = _config(key, block_m, block_kv)
            if c is not None and all(c.kwargs != o.kwargs or c.num_warps != o.num_warps for o in out):
                out.append(c)
    return out


def interpreter(key: AttentionKey) -> triton.Config:
    """Under the interpreter: the rule's chunks (so ragged chunks are tested as they run), 32 query
    rows and two programs per head."""
    block_kv = _chunk(key)
    groups = min(_INTERPRETER_GROUPS, triton.cdiv(key.n_q, _INTERPRETER_ROWS))
    return triton.Config({"BLOCK_M": _INTERPRETER_ROWS, "BLOCK_KV": block_kv,
                          "KV_CHUNKS": triton.cdiv(key.n_kv, block_kv), "GROUPS": groups},
                         num_warps=4, num_stages=1)
