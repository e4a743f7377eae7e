"""``linear`` and ``mlp``: GEMMs with the bias, the activation, dropout, LayerScale, stochastic depth's
row factor and the residual add fused into the kernel's epilogue.

Dropout draws one int64 seed per dropping launch from PyTorch's generator (in the public op, outside
the custom ops); the kernels key a Philox keep mask on it and the element's coordinates, and the
backward regenerates the mask from the saved seed: nothing of size M·N is stored or read for it.
With ``dropout_p == 0`` no seed is drawn (the generator is left untouched) and the kernels compile
without the dropout code."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import runtime
from . import _autocast as autocast
from ._dispatch import call, custom_op
from ._layout import as_result, as_rows
from ._linear_args import (
    activation_name, check_input, check_layer, check_residual, check_row_scale, check_scale, fallback,
    kernel_path_for, row_vector,
)
from ._random import check_dropout_p, draw_seed, keep_scale
from ._trace import fx_traceable
from ._validate import check_same_device


@custom_op("vitfast::linear_fwd", mutates_args=())
def _linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], activation: str,
    store_preact: bool = False, scale: Optional[Tensor] = None, dropout_p: float = 0.0, seed: Optional[Tensor] = None,
    row_scale: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    """Y = row_scale ⊙ scale ⊙ dropout(act(x · weightᵀ + bias)) + residual, and the pre-activation
    x · weightᵀ + bias that the backward needs when ``store_preact`` (else an empty tensor). Dropout
    (probability ``dropout_p``) runs when ``seed`` (int64 [1], drawn by the caller) is given;
    row_scale is contiguous fp32 [M]. Y has ``out_dtype``, by default x's promoted with the residual's
    (as ``gemm_result + residual``; the public op passes eager's dtype under autocast)."""
    from ..kernels.linear import linear_fwd

    M, N = x.shape[0], weight.shape[0]
    y = runtime.empty(M, N, dtype=out_dtype or _out_dtype(x, residual), device=x.device)
    z = runtime.empty(M, N, dtype=x.dtype, device=x.device) if store_preact else None
    with runtime.launching(x.device, x.dtype):
        linear_fwd(x, weight, bias, residual, activation, y, z, scale, seed, dropout_p, keep_scale(dropout_p),
                   row_scale)
    return y, x.new_empty(0) if z is None else z


@_linear_fwd.register_fake
def _(x, weight, bias, residual, activation, store_preact=False, scale=None, dropout_p=0.0, seed=None,
      row_scale=None, out_dtype=None):
    M, N = x.shape[0], weight.shape[0]
    return (x.new_empty(M, N, dtype=out_dtype or _out_dtype(x, residual)),
            x.new_empty((M, N) if store_preact else (0,)))


def _out_dtype(x: Tensor, residual: Tensor | None) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


autocast.register("linear_fwd", cast_args=(0, 1, 2), result=(10, (3, 6)))


def _needs_scale_grad(ctx) -> bool:
    # torch leaves arguments that keep their defaults (scale=None) out of needs_input_grad.
    return len(ctx.needs_input_grad) > 6 and ctx.needs_input_grad[6]


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, _, activation, store_preact, scale, dropout_p, seed, row_scale, *_ = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    need_x, need_w = ctx.needs_input_grad[:2]
    need_s = _needs_scale_grad(ctx)
    # Keep alive only what the backward reads: x for dW, the weight for dX, Z for act'(Z) and for
    # the scale's gradient, the scale, the seed (the mask is regenerated) and the row factor for the
    # gradient through the branch.
    ctx.save_for_backward(x if need_w else None, weight if need_x else None,
                          z if activation != "none" or need_s else None, scale, seed, row_scale)
    ctx.activation, ctx.store_preact, ctx.dropout_p = activation, store_preact, dropout_p
    ctx.scale_dtype = None if scale is None else scale.dtype
    ctx.operand_dtype = x.dtype


def _backward(ctx, dy: Tensor, _dz):
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    need_s = _needs_scale_grad(ctx)
    grads = [None, None, None]
    dscale = None
    if need_x or need_w or need_b or need_s:
        if (ctx.activation != "none" or need_s) and not ctx.store_preact:
            raise RuntimeError("vitfast::linear_fwd ran with store_preact=False, so its activation and scale "
                               "cannot be differentiated; vitfast.ops.linear asks for the pre-activation itself")
        x, weight, z, scale, seed, row_scale = ctx.saved_tensors
        dx, dw, db, ds = torch.ops.vitfast.linear_bwd(dy, x, weight, z, ctx.activation, need_x, need_w, need_b,
                                                      scale, need_s, ctx.dropout_p, seed, row_scale,
                                                      ctx.operand_dtype)
        grads = [dx if need_x else None, dw if need_w else None, db if need_b else None]
        dscale = ds.to(ctx.scale_dtype) if need_s else None
    # dR = dY: the residual is added after everything else. No gradient for the seed or the row factor.
    return (*grads, dy if need_r else None, None, None, dscale, None, None, None, None)


torch.library.register_autograd("vitfast::linear_fwd", _backward, setup_context=_setup_context)


@torch.library.custom_op("vitfast::linear_bwd", mutates_args=())
def _linear_bwd(
    dy: Tensor, x: Optional[Tensor], weight: Optional[Tensor], z: Optional[Tensor], activation: str,
    compute_dx: bool, compute_dw: bool, compute_db: bool, scale: Optional[Tensor] = None,
    compute_dscale: bool = False, dropout_p: float = 0.0, seed: Optional[Tensor] = None,
    row_scale: Optional[Tensor] = None, operand_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x [M, K] (needs weight), weight [N, K] (needs x) and bias [N] in the forward
    operands' dtype (``operand_dtype``, default dy's), and of the scale [N] in fp32 (needs z), from
    dy [M, N] and the stored pre-activation z; empty where not asked for. ``dropout_p``, ``seed`` and
    ``row_scale`` are the forward's. dy may be wider than the operands (the forward added a wider
    residual): dZ is rounded to the operands' dtype once, as eager rounds the gradient of its
    half-precision GEMM result.

    dZ = dy ⊙ row_scale ⊙ scale ⊙ mask/(1 - p) ⊙ act'(z) is one elementwise kernel (regenerating the
    mask from the seed), which also sums dy ⊙ row_scale ⊙ mask/(1 - p) ⊙ act(z) over the rows for the
    scale (dZ is dy itself when the epilogue has none of these); dX and dW are the forward GEMM kernel
    reading its operands transposed; dB is a fp32 torch sum of dZ's rows."""
    from ..kernels.linear import epilogue_bwd, linear_bwd

    dtype = operand_dtype or dy.dtype
    M, N = dy.shape
    need_dz = compute_dx or compute_dw or compute_db
    dz = dy
    elementwise = (activation != "none" or scale is not None or compute_dscale or seed is not None
                   or row_scale is not None)
    with runtime.launching(dy.device, dtype):
        if elementwise:
            dz = runtime.empty(M, N, dtype=dtype, device=dy.device) if need_dz else None
            dscale = epilogue_bwd(dy, z, scale, activation, dz, compute_dscale, seed, dropout_p,
                                  keep_scale(dropout_p), row_scale)
        else:
            dscale = None
            dz = dy.to(dtype)
        runtime.record_launch("linear_bwd", dz, x, weight)
        dx = runtime.empty(M, weight.shape[1], dtype=dtype, device=dy.device) if compute_dx else None
        dw = runtime.empty(N, x.shape[1], dtype=dtype, device=dy.device) if compute_dw else None
        linear_bwd(dz, x, weight, dx, dw)
    empty = dy.new_empty(0, dtype=dtype)
    return (empty if dx is None else dx, empty.clone() if dw is None else dw,
            dz.sum(0, dtype=torch.float32).to(dtype) if compute_db else empty.clone(),
            empty.new_empty(0, dtype=torch.float32) if dscale is None else dscale)


@_linear_bwd.register_fake
def _(dy, x, weight, z, activation, compute_dx, compute_dw, compute_db, scale=None, compute_dscale=False,
      dropout_p=0.0, seed=None, row_scale=None, operand_dtype=None):
    M, N = dy.shape
    dtype = operand_dtype or dy.dtype
    return (dy.new_empty((M, weight.shape[1]) if compute_dx else (0,), dtype=dtype),
            dy.new_empty((N, x.shape[1]) if compute_dw else (0,), dtype=dtype),
            dy.new_empty(N if compute_db else 0, dtype=dtype),
            dy.new_empty(N if compute_dscale else 0, dtype=torch.float32))


def _launch(x2: Tensor, weight: Tensor, bias: Tensor | None, activation: str, residual: Tensor | None,
            scale: Tensor | None = None, dropout_p: float = 0.0, row_scale: Tensor | None = None,
            out_dtype: torch.dtype | None = None) -> Tensor:
    """One kernel over rows x2 [M, K]; the residual, shaped like the output, is viewed as rows, and
    row_scale is the contiguous fp32 [M] factor. Draws the dropout seed (one per dropping launch,
    from PyTorch's generator) here, outside the custom op, so that compiled graphs draw it too.
    Training stores the pre-activation for the backward rather than recomputing a GEMM there: act'(Z)
    needs it, and so does the scale's gradient Σ dY ⊙ act(Z)."""
    r2 = None if residual is None else residual.reshape(x2.shape[0], weight.shape[0])
    scale_grad = scale is not None and runtime.needs_autograd(scale)
    store_preact = (activation != "none" and runtime.needs_autograd(x2, weight, bias)) or scale_grad
    seed = draw_seed(x2.device) if dropout_p > 0.0 else None
    return call(_linear_fwd, x2, weight, bias, r2, activation, store_preact, scale, dropout_p, seed, row_scale,
                out_dtype)[0]


def _kernel_path(op: str, x: Tensor, out_width: int, scale: Tensor | None, residual: Tensor | None,
                 row_scale: Tensor | None) -> bool:
    """The kernels' test, plus: they do not differentiate the row factor (a constant per sample in
    stochastic depth), so a row_scale that needs a gradient takes PyTorch."""
    if not kernel_path_for(op, x, out_width, scale, residual, row_scale):
        return False
    if runtime.needs_autograd(row_scale):
        runtime.warn_once(f"{op}:row_scale_grad", f"vitfast.{op}: the kernels do not compute gradients with "
                                                  f"respect to row_scale; using PyTorch")
        return False
    return True


@fx_traceable
def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    residual: Tensor | None = None,
    scale: Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    row_scale: Tensor | None = None,
) -> Tensor:
    """``residual + row_scale * scale * dropout(act(x @ weight.T + bias))`` in one kernel, ``weight`` in
    ``nn.Linear`` layout.

    ``x`` is any [..., in] tensor; ``activation`` is None/"none", "gelu" (exact, erf), "gelu_tanh",
    "quick_gelu" (``x * sigmoid(1.702 * x)``, OpenAI CLIP's), "relu" or "silu" (``x * sigmoid(x)``);
    ``residual`` has the output's shape [..., out]; ``scale`` [out] multiplies each output column
    (timm's LayerScale), any float dtype and stride, applied in fp32 like the bias. The product
    accumulates in fp32 (TF32 for fp32 inputs only where ``torch.backends.cuda.matmul.allow_tf32``
    allows it) and is rounded to ``x``'s dtype once.

    Training extras, both applied on the fp32 tile before the one rounding:

    * ``dropout_p`` in [0, 1]: dropout on the activated output (before ``scale``, ``row_scale`` and
      the residual), always applied when > 0 (pass 0 in eval). Kept elements are multiplied by
      1 / (1 - p). The mask comes from a seed drawn from PyTorch's generator (``torch.manual_seed``
      makes it reproducible) and is regenerated in the backward, never stored.
    * ``row_scale``: a float tensor broadcastable to ``x.shape[:-1]`` multiplying each output row
      (stochastic depth's per-sample factor: [B, 1] for x [B, N, D], [1, B] for sequence-first
      [N, B, D]). Not differentiated by the kernels: one that requires grad takes PyTorch (warned once).

    Under ``torch.autocast`` ``x``, ``weight`` and ``bias`` are cast to the autocast dtype, as
    ``F.linear`` casts them; the residual may then have any float dtype, and the result has eager's
    dtype: the GEMM's promoted with the residual's, the scale's and the row factor's (fp32 for an
    fp32 residual stream, as eager's ``half + fp32``), its gradient rounded to the GEMM's dtype once.

    Differentiable: the backward runs on Triton kernels too, the scale's gradient included.
    float64 inputs take PyTorch (warned once).

    >>> x = torch.randn(2, 197, 768)
    >>> w, b = torch.randn(3072, 768), torch.randn(3072)
    >>> h = linear(x, w, b, activation="gelu")                     # fc1 + bias + GELU
    >>> y = linear(h, torch.randn(768, 3072), None, residual=x)    # fc2 + residual
    >>> y = linear(h, torch.randn(768, 3072), None, residual=x, scale=torch.full((768,), 1e-5))
    >>> keep = (torch.rand(2, 1) >= 0.1) / 0.9                     # drop path, p = 0.1
    >>> y = linear(h, torch.randn(768, 3072), None, residual=x, dropout_p=0.1, row_scale=keep)
    """
    act = activation_name(activation)
    p = check_dropout_p("dropout_p", dropout_p)
    check_input(x)
    x, weight, bias = autocast.operands(x.device, x, weight, bias)
    out_width = check_layer("", x, x.shape[-1], "x's last dimension", weight, bias)
    check_residual(x, residual, out_width)
    check_scale(scale, out_width)
    check_row_scale(x, row_scale)
    check_same_device(x=x, weight=weight, bias=bias, residual=residual, scale=scale, row_scale=row_scale)

    if _kernel_path("linear", x, out_width, scale, residual, row_scale):
        runtime.record_launch("linear", x, weight)
        y = _launch(as_rows(x, x.shape[-1]), weight, bias, act, residual, scale, p, row_vector(row_scale, x),
                    autocast.result_dtype(x, residual, scale, row_scale))
        return as_result(y, (*x.shape[:-1], out_width))
    return fallback(x, weight, bias, act, residual, scale, p, row_scale)


@fx_traceable
def mlp(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    activation: str | None = "gelu",
    residual: Tensor | None = None,
    scale: Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    hidden_dropout_p: float = 0.0,
    row_scale: Tensor | None = None,
) -> Tensor:
    """The transformer MLP ``residual + row_scale * scale * dropout(fc2(dropout(act(fc1(x)))))`` as two
    fused launches.

    fc1 + bias + activation (+ dropout with ``hidden_dropout_p``: ``nn.TransformerEncoderLayer``'s
    ``dropout`` inside the MLP, timm ``Mlp``'s ``drop1``) run in one kernel's epilogue, fc2 + bias
    (+ dropout with ``dropout_p``, + ``scale`` [out], timm's LayerScale, + ``row_scale``, stochastic
    depth's per-sample factor broadcastable to ``x.shape[:-1]``) + residual in the next; see
    ``linear`` for the dropout and row-factor semantics. Each dropping launch draws its own seed,
    the hidden one first. The hidden activations make one round trip through memory in ``x``'s dtype
    (the autocast dtype under ``torch.autocast``, which casts all four weights and biases, as
    ``linear``), as in PyTorch. Gradients flow through both launches' backward kernels.

    >>> x = torch.randn(2, 197, 768)
    >>> w1, b1, w2, b2 = torch.randn(3072, 768), torch.randn(3072), torch.randn(768, 3072), torch.randn(768)
    >>> y = mlp(x, w1, b1, w2, b2, "gelu", residual=x)
    >>> y = mlp(x, w1, b1, w2, b2, "gelu", residual=x, dropout_p=0.1, hidden_dropout_p=0.1)
    """
    act = activation_name(activation)
    p = check_dropout_p("dropout_p", dropout_p)
    hidden_p = check_dropout_p("hidden_dropout_p", hidden_dropout_p)
    check_input(x)
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias = autocast.operands(x.device, x, fc1_weight, fc1_bias,
                                                                      fc2_weight, fc2_bias)
    hidden = check_layer("fc1_", x, x.shape[-1], "x's last dimension", fc1_weight, fc1_bias)
    out_width = check_layer("fc2_", x, hidden, "fc1's output (fc1_weight.shape[0])", fc2_weight, fc2_bias)
    check_residual(x, residual, out_width)
    check_scale(scale, out_width)
    check_row_scale(x, row_scale)
    check_same_device(x=x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight,
                      fc2_bias=fc2_bias, residual=residual, scale=scale, row_scale=row_scale)

    if hidden > 0 and _kernel_path("mlp", x, out_width, scale, residual, row_scale):
        runtime.record_launch("mlp", x, fc1_weight, fc2_weight)
        h = _launch(as_rows(x, x.shape[-1]), fc1_weight, fc1_bias, act, None, None, hidden_p)
        y = _launch(h, fc2_weight, fc2_bias, "none", residual, scale, p, row_vector(row_scale, x),
                    autocast.result_dtype(x, residual, scale, row_scale))
        return as_result(y, (*x.shape[:-1], out_width))
    h = fallback(x, fc1_weight, fc1_bias, act, None, None, hidden_p)
    return fallback(h, fc2_weight, fc2_bias, "none", residual, scale, p, row_scale)
