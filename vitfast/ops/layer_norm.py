"""``layer_norm``: LayerNorm over the last dimension, optionally fused with the residual add."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import runtime
from . import _autocast as autocast
from ._dispatch import call, custom_op, kernel_path
from ._layout import as_result, as_rows
from ._trace import fx_traceable
from ._validate import check_float, check_same_device, check_same_dtype, check_shape, check_tensor


@custom_op("vitfast::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
    residual: Optional[Tensor], store_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.layer_norm import layer_norm_fwd

    M, N = x.shape
    y = runtime.empty(M, N, dtype=x.dtype, device=x.device)
    s = runtime.empty(M, N, dtype=x.dtype, device=x.device) if residual is not None else x.new_empty(0)
    stats = store_stats
    mean = torch.empty(M if stats else 0, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M if stats else 0, dtype=torch.float32, device=x.device)
    with runtime.launching(x.device):
        layer_norm_fwd(x, weight, bias, eps, residual, y, s if residual is not None else None,
                       mean if stats else None, rstd if stats else None)
    return y, s, mean, rstd


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps, residual, store_stats):
    M, N = x.shape
    return (x.new_empty(M, N), x.new_empty(M, N) if residual is not None else x.new_empty(0),
            x.new_empty(M if store_stats else 0, dtype=torch.float32),
            x.new_empty(M if store_stats else 0, dtype=torch.float32))


# layer_norm is on CUDA autocast's float32 list, on no CPU list.
autocast.register("layer_norm_fwd", cast_args=(0, 1, 2, 4), policy="layer_norm")


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _, residual, store_stats = inputs
    _, s, mean, rstd = output
    # s = x + r carries a gradient only from x or r, as PyTorch's own add would.
    sum_differentiable = residual is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[4])
    ctx.mark_non_differentiable(mean, rstd, *(() if sum_differentiable else (s,)))
    ctx.set_materialize_grads(False)  # a sum s that nothing downstream reads sends no gradient
    ctx.save_for_backward(x if residual is None else s, weight, mean, rstd)
    ctx.has_stats = store_stats
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy: Tensor | None, ds: Tensor | None, _dmean, _drstd):
    xin, weight, mean, rstd = ctx.saved_tensors
    if not ctx.has_stats:
        raise RuntimeError("vitfast::layer_norm_fwd ran with store_stats=False, so it cannot be "
                           "differentiated; vitfast.ops.layer_norm asks for the statistics itself")
    need_x, need_w, need_b, _, need_r, _ = ctx.needs_input_grad
    if dy is None:  # only the sum s is used downstream
        dy = torch.zeros_like(xin)
    width = xin.shape[-1]
    dx, dw, db = torch.ops.vitfast.layer_norm_bwd(
        as_rows(dy, width), None if ds is None else as_rows(ds, width), xin, weight, mean, rstd,
        need_x or need_r, need_w, need_b)
    return (dx if need_x else None, dw.to(weight.dtype) if need_w else None,
            db.to(ctx.bias_dtype) if need_b else None, None, dx if need_r else None, None)


torch.library.register_autograd("vitfast::layer_norm_fwd", _backward, setup_context=_setup_context)


@torch.library.custom_op("vitfast::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(
    dy: Tensor, ds: Optional[Tensor], xin: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
    compute_dx: bool, compute_dw: bool, compute_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of xin (plus ds; dtype of xin), weight and bias (fp32 [N]); empty where not asked."""
    from ..kernels.layer_norm import layer_norm_bwd

    runtime.record_launch("layer_norm_bwd", xin)
    M, N = xin.shape
    dx = runtime.empty(M, N, dtype=xin.dtype, device=xin.device) if compute_dx else None
    with runtime.launching(xin.device):
        dw, db = layer_norm_bwd(dy, ds, xin, weight, mean, rstd, dx, compute_dw, compute_db)
    empty = xin.new_empty(0, dtype=torch.float32)
    return (xin.new_empty(0) if dx is None else dx, empty if dw is None else dw,
            empty.clone() if db is None else db)


@_layer_norm_bwd.register_fake
def _(dy, ds, xin, weight, mean, rstd, compute_dx, compute_dw, compute_db):
    M, N = xin.shape
    return (xin.new_empty((M, N) if compute_dx else (0,)),
            xin.new_empty(N if compute_dw else 0, dtype=torch.float32),
            xin.new_empty(N if compute_db else 0, dtype=torch.float32))


def _fallback(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    params = [p for p in (weight, bias) if p is not None]
    if any(p.dtype != x.dtype for p in params):
        # Mixed precision (e.g. fp32 parameters under autocast): normalise in fp32, as the kernel does,
        # or in float64 when anything is float64.
        dt = torch.float64 if torch.float64 in (x.dtype, *(p.dtype for p in params)) else torch.float32
        return F.layer_norm(x.to(dt), x.shape[-1:], None if weight is None else weight.to(dt),
                            None if bias is None else bias.to(dt), eps).to(x.dtype)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


@fx_traceable
def layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm of ``x`` (or of ``x + residual``) over its last dimension.

    Returns ``y`` when ``residual`` is None and ``(y, x + residual)`` otherwise; the sum is what the
    next residual connection needs, so a pre-norm block reads the residual stream once.
    Statistics are fp32 whatever the input dtype; outputs have the dtype of ``x``. ``eps`` may be 0
    (a constant row then gives NaN, as in ``F.layer_norm``); float64 inputs take PyTorch (warned once).
    ``weight`` and ``bias`` may have any stride (a slice, or one value broadcast with ``expand``).
    Under ``torch.autocast`` it follows PyTorch's policy for ``layer_norm``: on CUDA the inputs are
    cast to float32 (and so is ``y``), on CPU they keep their dtypes; the residual may then have
    another float dtype than ``x``, the sum taking the promoted one, as eager's ``x + residual``.
    Differentiable: when an input requires grad the forward keeps its fp32 statistics and the
    backward runs a Triton kernel too (dx, and dweight/dbias from per-program fp32 partial sums).

    >>> x = torch.randn(2, 197, 768)
    >>> w, b = torch.ones(768), torch.zeros(768)
    >>> y = layer_norm(x, w, b)
    >>> y, s = layer_norm(x, w, b, residual=torch.randn_like(x))
    """
    check_float("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    width = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_float(name, p)
            check_shape(name, p, (width,))
    under_autocast = autocast.lower_dtype(x.device.type) is not None
    if residual is not None:
        check_tensor("residual", residual)
        check_shape("residual", residual, tuple(x.shape))
        if under_autocast:
            check_float("residual", residual)
        else:
            check_same_dtype("residual", residual, "x", x)
    check_same_device(x=x, weight=weight, bias=bias, residual=residual)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if under_autocast:
        if residual is not None and (residual.dtype != x.dtype
                                     or (x.device.type == "cuda" and x.dtype != torch.float32)):
            # The sum is eager's own add (its promoted dtype), normalised as autocast normalises it.
            s = x + residual
            return layer_norm(s, weight, bias, eps), s
        x, weight, bias = autocast.layer_norm_inputs(x.device, x, weight, bias)

    if kernel_path("layer_norm", x, weight, bias, dot=False):
        from ..kernels.layer_norm import MAX_WIDTH

        if width > MAX_WIDTH:
            runtime.warn_once(f"layer_norm:width={width}",
                              f"vitfast.layer_norm: width {width} > {MAX_WIDTH}; using PyTorch")
        else:
            runtime.record_launch("layer_norm", x, residual)
            # Training keeps the fp32 statistics for the backward kernel.
            y, s, _, _ = call(
                _layer_norm_fwd,                 as_rows(x, width), weight, bias, float(eps),
                None if residual is None else as_rows(residual, width),
                runtime.needs_autograd(x, weight, bias, residual))
            y = as_result(y, x.shape)
            return y if residual is None else (y, as_result(s, x.shape))

    if residual is None:
        return _fallback(x, weight, bias, eps)
    s = x + residual
    return _fallback(s, weight, bias, eps), s
