"""The Hopper GEMM of ``linear``: operands through tensor descriptors (TMA), a persistent grid, and the
epilogue applied in column slices of the accumulator.

Same product and epilogue as ``linear._linear_kernel``, Y = r ⊙ s ⊙ dropout(act(X · Wᵀ + b)) + R, with
the pre-activation Z stored for training, but shaped for sm_90:

* X, W, Y, Z and R are read and written through ``tl.make_tensor_descriptor``: on sm_90 each tile is
  one TMA copy into shared memory that feeds wgmma, with no address arithmetic or masks in the loop
  (the copy engine zero-fills rows, columns and K beyond the tensor and drops the stores beyond it).
  A descriptor needs a 16-byte-aligned base, a unit stride on its last dimension and 16-byte multiples
  for the others; ``eligible`` says whether a launch qualifies, and the launcher keeps the pointer
  kernel for the rest. An operand stored transposed (the backward's dZᵀ and Xᵀ, W read as [K, N] for
  dX) is described as it lies in memory and its tile transposed in shared memory (X_T, W_T).
* ``NUM_PROGRAMS`` programs (at most one per SM) walk the output tiles in ``_tile_position``'s
  grouped order, so the grid costs one launch's worth of block scheduling, and each program makes its
  descriptors once.
* The fp32 accumulator is handed to the epilogue in ``EPILOGUE_SLICES`` column slices: the bias,
  activation, dropout, scale, row factor and residual of one slice are live at a time, which keeps a
  128 × 256 tile's epilogue (GELU's erf, a residual tile) from spilling.

Traffic and FLOPs are those of the pointer kernel (its docstring); what changes is the issue rate.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import triton
import triton.language as tl

from . import _configs, _select, gemm_tactic
from ._gemm_epilogue import _tile_position, branch
from ._launch import launch
from ._layout import vector_stride
from ._tuning import INTERPRETER, device_facts, interpreting

# What a descriptor's base, and each stride but the last, must be a multiple of (bytes).
TMA_ALIGN = 16
# Programs of a persistent launch in the interpreter: few, so that each walks several tiles there.
_INTERPRETER_PROGRAMS = 3


@triton.jit
def _epilogue_slice(acc, off_m, off_n, y_desc, z_desc, r_desc, B, S, SEED, ROW_SCALE, M, N, stride_b, stride_s,
                    dropout_p, keep_scale, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_PREACT: tl.constexpr,
                    DROPOUT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr):
    """The epilogue of one column slice ``acc`` [rows, width] of the output at (``off_m``, ``off_n``):
    what ``linear._linear_kernel`` applies to its whole tile, stored through the descriptors (which
    drop rows and columns beyond M and N)."""
    rows = off_m + tl.arange(0, acc.shape[0])
    cols = off_n + tl.arange(0, acc.shape[1])
    col_ok = cols < N
    cols64 = cols.to(tl.int64)
    if HAS_BIAS:
        acc += tl.load(B + cols64 * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if STORE_PREACT:
        z_desc.store([off_m, off_n], acc.to(z_desc.dtype))
    acc = branch(acc, rows, cols, M, N, S, stride_s, SEED, ROW_SCALE, dropout_p, keep_scale, ACTIVATION, DROPOUT,
                 HAS_SCALE, HAS_ROW_SCALE)
    if HAS_RESIDUAL:
        acc += r_desc.load([off_m, off_n]).to(tl.float32)
    y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


@triton.jit
def operand_desc(P, rows, K, stride, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, T: tl.constexpr):
    """The descriptor of a GEMM operand of ``rows`` × K as it lies in memory: K-major with row stride
    ``stride``, or with T stored transposed ([K, rows], ``stride`` between its K rows)."""
    if T:
        desc = tl.make_tensor_descriptor(P, [K, rows], [stride, 1], [BLOCK_K, BLOCK_R])
    else:
        desc = tl.make_tensor_descriptor(P, [rows, K], [stride, 1], [BLOCK_R, BLOCK_K])
    return desc


@triton.jit
def operand_tile(desc, off, k, T: tl.constexpr):
    """The [BLOCK_R, BLOCK_K] tile at rows ``off`` and reduction index ``k`` of an ``operand_desc``
    operand (a transposed one's tile transposed in shared memory)."""
    if T:
        tile = tl.trans(desc.load([k, off]))
    else:
        tile = desc.load([off, k])
    return tile


@triton.jit
def _column_halves(acc):
    """The left and right column halves of a [rows, cols] register tile."""
    return tl.split(tl.permute(tl.reshape(acc, (acc.shape[0], 2, acc.shape[1] // 2)), (0, 2, 1)))


@triton.jit
def _column_slices(acc, SLICES: tl.constexpr):
    """A register tile's ``SLICES`` (1, 2 or 4) column slices, left to right, as a tuple."""
    if SLICES == 1:
        out = (acc,)
    elif SLICES == 2:
        out = _column_halves(acc)
    else:
        tl.static_assert(SLICES == 4, "EPILOGUE_SLICES is 1, 2 or 4")
        left, right = _column_halves(acc)
        q0, q1 = _column_halves(left)
        q2, q3 = _column_halves(right)
        out = (q0, q1, q2, q3)
    return out


@triton.jit
def _linear_tma_kernel(
    X, W, B, S, R, Y, Z, SEED, ROW_SCALE,
    M, N, K,
    stride_x, stride_w, stride_b, stride_s, stride_r, stride_y, stride_z,
    dropout_p, keep_scale, NUM_PROGRAMS,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    STORE_PREACT: tl.constexpr, DROPOUT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    X_T: tl.constexpr, W_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SLICES: tl.constexpr,
):
    """Output tiles ``program_id(0)``, + NUM_PROGRAMS, ... of the M × N output, in grouped order.

    X: [M, K] with unit stride along K and row stride ``stride_x``; with X_T, stored as [K, M] (unit
       stride along M, ``stride_x`` between rows of K). W: [N, K] in ``nn.Linear`` layout, row stride
       ``stride_w``; with W_T, stored as [K, N]. Y, Z, R: [M, N] with unit column stride and row
       strides ``stride_y``, ``stride_z``, ``stride_r``. Every base is 16-byte aligned and every row
       stride a multiple of 16 bytes (``eligible``). B, S, SEED, ROW_SCALE and the flags as in
       ``linear._linear_kernel``; EPILOGUE_SLICES (1, 2 or 4) column slices of the tile pass through
       the epilogue one after the other.
    """
    SLICE_N: tl.constexpr = BLOCK_N // EPILOGUE_SLICES
    x_desc = operand_desc(X, M, K, stride_x, BLOCK_M, BLOCK_K, X_T)
    w_desc = operand_desc(W, N, K, stride_w, BLOCK_N, BLOCK_K, W_T)
    y_desc = tl.make_tensor_descriptor(Y, [M, N], [stride_y, 1], [BLOCK_M, SLICE_N])
    z_desc = y_desc
    r_desc = y_desc
    if STORE_PREACT:
        z_desc = tl.make_tensor_descriptor(Z, [M, N], [stride_z, 1], [BLOCK_M, SLICE_N])
    if HAS_RESIDUAL:
        r_desc = tl.make_tensor_descriptor(R, [M, N], [stride_r, 1], [BLOCK_M, SLICE_N])

    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), tiles, NUM_PROGRAMS):
        tile_m, tile_n = _tile_position(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = tile_m * BLOCK_M
        off_n = tile_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            x = operand_tile(x_desc, off_m, k, X_T)
            w = tl.trans(operand_tile(w_desc, off_n, k, W_T))  # [BLOCK_K, BLOCK_N]
            acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        slices = _column_slices(acc, EPILOGUE_SLICES)
        for i in tl.static_range(EPILOGUE_SLICES):
            _epilogue_slice(slices[i], off_m, off_n + i * SLICE_N, y_desc, z_desc, r_desc, B, S, SEED, ROW_SCALE,
                            M, N, stride_b, stride_s, dropout_p, keep_scale, ACTIVATION, HAS_BIAS, HAS_SCALE,
                            HAS_RESIDUAL, STORE_PREACT, DROPOUT, HAS_ROW_SCALE)


def _descriptor_ok(t: torch.Tensor, unit_dim: int) -> bool:
    """Whether ``t`` (2-D, not empty) can be described as it lies: unit stride on ``unit_dim``, a
    16-byte-aligned base, and rows along the other dimension that do not overlap (a stride of at least
    the row's length: no broadcast stride 0) and start 16-byte aligned."""
    e = t.element_size()
    other = t.stride(1 - unit_dim)
    return (t.numel() > 0 and t.stride(unit_dim) == 1 and other >= max(1, t.shape[unit_dim])
            and (other * e) % TMA_ALIGN == 0 and t.data_ptr() % TMA_ALIGN == 0)


def operand_layout(t: torch.Tensor) -> bool | None:
    """How a GEMM operand ([rows, K]) lies for a descriptor: False when K is its unit-stride dimension,
    True when rows are (stored transposed), None when neither qualifies."""
    if _descriptor_ok(t, 1):
        return False
    if _descriptor_ok(t, 0):
        return True
    return None


def eligible(precision: str, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
             *others: torch.Tensor | None) -> bool:
    """Whether a ``linear`` launch can take the descriptor kernel: 16-bit operands, or fp32 ones with
    TF32 allowed (``precision``, ``tl.dot``'s input precision: an exact fp32 product runs on FMAs, where
    the descriptor kernel's large tiles spill and the pointer kernel does not), X and W each lying
    K-major or transposed with aligned strides, and Y and the other [M, N] tensors (the
    pre-activation, the residual) row-major with aligned rows; none of them empty or broadcast (the
    copy engine's descriptors take neither a zero size nor overlapping rows)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or weight.dtype != x.dtype:
        return False
    if x.dtype == torch.float32 and precision != "tf32":
        return False
    if operand_layout(x) is None or operand_layout(weight) is None:
        return False
    return all(t is None or _descriptor_ok(t, 1) for t in (y, *others))


@functools.cache
def programs_per_wave(device: int) -> int:
    """How many programs a persistent launch runs on ``device``: one per SM (a few in the
    interpreter, so that each program walks several tiles there too)."""
    if interpreting():
        return _INTERPRETER_PROGRAMS
    if device < 0:  # CPU tensors compiled through a stand-in driver (host-time measurements)
        return _configs.SM90_WAVE
    return torch.cuda.get_device_properties(device).multi_processor_count


class _Scratch:
    """Triton's allocator for the few hundred bytes per launch where the kernel writes its descriptors
    (``tl.make_tensor_descriptor`` on sm_90): one buffer per (device, stream), grown when asked for
    more and reused, since launches on one stream run one after the other. A launch captured into a
    CUDA graph gets a buffer of its own from the graph's pool: the graph may replay on another stream,
    beside launches that use the cached one."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, size: int, alignment: int, stream: int | None) -> torch.Tensor:
        if torch.cuda.is_current_stream_capturing():
            return torch.empty(size, dtype=torch.int8, device="cuda")
        key = (torch.cuda.current_device(), stream or 0)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < size:
            buf = self.buffers[key] = torch.empty(max(size, 4096), dtype=torch.int8, device="cuda")
        return buf


_SCRATCH = _Scratch()


def ensure_allocator() -> None:
    """Give Triton an allocator for descriptor scratch when none is set in this context (one a user
    set is kept)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_SCRATCH)


def arch_takes_descriptors(device: int) -> bool:
    """Whether launches on ``device`` take the descriptor kernel when ``eligible``: sm_90 (H100, H200),
    for which its configs are made, and the interpreter, where the tests prove it."""
    _, arch = device_facts(device)
    return arch == 90 or arch == INTERPRETER


def launcher(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
             residual: torch.Tensor | None, y: torch.Tensor, z: torch.Tensor | None, seed: torch.Tensor | None,
             row_scale: torch.Tensor | None, dropout_p: float, keep_scale: float, meta: dict
             ) -> Callable[[triton.Config], None]:
    """``linear.linear_fwd``'s launch on the descriptor kernel (``eligible`` holds), as a function of
    the config: the same arguments, ``meta`` the flags."""
    M, K = x.shape
    N = weight.shape[0]
    x_t, w_t = operand_layout(x), operand_layout(weight)
    args = (
        x, weight, bias if bias is not None else y, scale if scale is not None else y,
        residual if residual is not None else y, y, z if z is not None else y,
        seed if seed is not None else y, row_scale if row_scale is not None else y,
        M, N, K,
        x.stride(1 if x_t else 0), weight.stride(1 if w_t else 0), vector_stride(bias), vector_stride(scale),
        residual.stride(0) if residual is not None else 0, y.stride(0), z.stride(0) if z is not None else 0,
        float(dropout_p), float(keep_scale),
    )
    wave = programs_per_wave(x.get_device())
    if not interpreting():
        ensure_allocator()

    def run(cfg: triton.Config) -> None:
        tiles = triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(N, cfg.kwargs["BLOCK_N"])
        programs = min(tiles, wave)
        launch(_linear_tma_kernel, (programs,), (*args, programs),
               {**meta, "X_T": x_t, "W_T": w_t, **_select.tile_meta(cfg)})
    return run


LINEAR_TMA = _select.kernel("linear_tma", _linear_tma_kernel, _configs.linear_tma_rule, _configs.linear_tma_candidates,
                            _configs.gemm_tma_interpreter)
gemm_tactic.declare(LINEAR_TMA)
