"""A GEMM site's tactic: vitfast's fused kernel, or cuBLAS for the product and one elementwise kernel for
the rest of the epilogue.

The fused kernels save the epilogue's pass over the M × N output (a read of Z and of the residual, a
write of Y), but only pay off while their product runs near cuBLAS's speed; where it does not, cuBLAS
(``torch.addmm``/``torch.mm``, which honours ``torch.backends.cuda.matmul.allow_tf32`` as the fused
kernels' input precision does) followed by ``_epilogue_fwd_kernel`` is the faster way to the same
result. ``linear_fwd`` asks ``_select`` for the tactic of each launch key like for a config, one
choice per fused kernel (``declare``): a tuning session measures both tactics (the fused one in its
own tuned config) and keeps the faster, saved in the tuned-picks file as ``gemm_tactic_<kernel>``;
otherwise the rule (``_configs.gemm_tactic_rule``).
``chosen()`` lists what each key in this process runs, for ``Report.gemm_sites`` and the bench.

The cuBLAS tactic computes what the fused kernel does with one more rounding: Z = X · Wᵀ + b is
rounded to X's dtype before the activation, as PyTorch eager does it. A bias of another dtype than X
is added by the epilogue kernel, in fp32. Traffic beyond the product: read M·N·e of Z (and of the
residual), write M·N·e of Y; none when the site is a bare product (+ bias) in X's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs, _precompile, _select
from ._gemm_epilogue import branch
from ._launch import launch
from ._layout import vector_stride

FUSED, CUBLAS = _configs.TACTIC_FUSED, _configs.TACTIC_CUBLAS
NAMES = {FUSED: "fused", CUBLAS: "cublas"}
# (device, launch key) -> (tactic config, fused kernel, its config) of the key's latest launch.
ran: dict[tuple[int, tuple], tuple[triton.Config, "_select.Kernel", triton.Config]] = {}


@triton.jit
def _epilogue_fwd_kernel(
    Z, B, S, R, Y, SEED, ROW_SCALE, M, N,
    stride_zm, stride_b, stride_s, stride_rm, stride_rn, stride_ym,
    dropout_p, keep_scale,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Y = r ⊙ s ⊙ dropout(act(Z + b)) + R on one BLOCK_M × BLOCK_N tile, in fp32, rounded once on the
    store: ``linear._linear_kernel``'s epilogue on a product cuBLAS wrote to Z (row stride
    ``stride_zm``, unit column stride; Y likewise with ``stride_ym``; R any strides)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    cols64 = cols.to(tl.int64)
    acc = tl.load(Z + rows[:, None] * stride_zm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(B + cols64 * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = branch(acc, rows, cols, M, N, S, stride_s, SEED, ROW_SCALE, dropout_p, keep_scale, ACTIVATION, DROPOUT,
                 HAS_SCALE, HAS_ROW_SCALE)
    if HAS_RESIDUAL:
        acc += tl.load(R + rows[:, None] * stride_rm + cols64[None, :] * stride_rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=mask)


# The tactic choices, one per fused kernel (its name -> the ``_select`` kernel that chooses for it).
TACTICS: dict[str, _select.Kernel] = {}


def declare(fused: _select.Kernel) -> _select.Kernel:
    """The tactic choice of the sites ``fused`` serves: saved in the tuned-picks file as
    ``gemm_tactic_<kernel>`` and tied to that kernel's source, so that a pick measured against one
    fused kernel is neither applied to a launch that runs the other (alignment decides which) nor kept
    once the kernel changes."""
    k = TACTICS[fused.name] = _select.kernel(f"gemm_tactic_{fused.name}", fused.fn, _configs.gemm_tactic_rule,
                                             _configs.gemm_tactic_candidates, _configs.gemm_tactic_interpreter)
    return k


def cublas_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
               activation: str, y: torch.Tensor, z: torch.Tensor | None, scale: torch.Tensor | None,
               seed: torch.Tensor | None, dropout_p: float, keep_scale: float, row_scale: torch.Tensor | None
               ) -> None:
    """``linear.linear_fwd``'s result by the cuBLAS tactic: the product (and a bias of X's dtype) by
    ``torch.addmm`` into Z (or straight into Y for a bare product of Y's dtype), then the epilogue."""
    M, N = y.shape
    fused_bias = bias is not None and bias.dtype == x.dtype
    bare = (activation == "none" and residual is None and scale is None and seed is None and row_scale is None
            and (bias is None or fused_bias))
    if bare and z is None and y.dtype == x.dtype:
        product = y
    else:
        product = z if z is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    if _precompile.active():
        pass  # compiling ahead: no kernel runs, cuBLAS's neither; the epilogue's kernel compiles below
    elif fused_bias:
        torch.addmm(bias, x, weight.t(), out=product)
    else:
        torch.mm(x, weight.t(), out=product)
    if product is y:
        return
    epilogue_bias = None if fused_bias else bias
    if z is not None and epilogue_bias is not None:
        # Z holds the pre-activation, bias included: add it there, in fp32, once.
        _epilogue(z, epilogue_bias, None, None, "none", z, None, 0.0, 1.0, None)
        epilogue_bias = None
    _epilogue(product, epilogue_bias, scale, residual, activation, y, seed, dropout_p, keep_scale, row_scale)


def _epilogue(z: torch.Tensor, bias, scale, residual, activation: str, y: torch.Tensor, seed, dropout_p: float,
              keep_scale: float, row_scale) -> None:
    M, N = y.shape
    if M == 0 or N == 0:
        return
    block_m, block_n = 32, 128
    dummy = y  # stands in for absent pointers, never dereferenced
    launch(_epilogue_fwd_kernel, (triton.cdiv(M, block_m), triton.cdiv(N, block_n)), (
        z, dummy if bias is None else bias, dummy if scale is None else scale, dummy if residual is None else residual,
        y, dummy if seed is None else seed, dummy if row_scale is None else row_scale, M, N,
        z.stride(0), vector_stride(bias), vector_stride(scale),
        0 if residual is None else residual.stride(0), 0 if residual is None else residual.stride(1), y.stride(0),
        float(dropout_p), float(keep_scale),
    ), dict(ACTIVATION=activation, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
            HAS_RESIDUAL=residual is not None, DROPOUT=seed is not None, HAS_ROW_SCALE=row_scale is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4))


def chosen() -> list[dict]:
    """What each ``linear`` launch key met in this process ran last: the device, the key
    (``_configs.key_text``), the tactic's name and, for the fused tactic, its kernel and config."""
    out = []
    for (device, key), (tactic, kernel, fused) in list(ran.items()):  # another thread may be launching
        row = {"device": device, "key": _configs.key_text(key), "tactic": NAMES[tactic.kwargs["TACTIC"]]}
        if tactic.kwargs["TACTIC"] == FUSED:
            row.update(kernel=kernel.name, config=_select.tile_meta(fused))
        out.append(row)
    return out
