"""``gated_linear``: the gated first layer of a GLU MLP (SwiGLU, GeGLU), act(x·Wgᵀ + bg) ⊙ (x·Wvᵀ + bv),
as one GEMM kernel with two accumulators and the gating (and dropout) in its epilogue.

Dropout draws one int64 seed per call from PyTorch's generator (in the public op, outside the custom
ops); the backward regenerates the keep mask from the saved seed, so it is never stored."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import runtime
from . import _autocast as autocast
from ._dispatch import call, custom_op
from ._layout import as_result, as_rows
from ._linear_args import TORCH_ACTIVATIONS, activation_name, check_input, check_layer, kernel_path_for
from ._random import check_dropout_p, draw_seed, keep_scale
from ._trace import fx_traceable
from ._validate import check_same_device


@custom_op("vitfast::gated_linear_fwd", mutates_args=())
def _gated_linear_fwd(
    x: Tensor, gate_weight: Tensor, gate_bias: Optional[Tensor], value_weight: Tensor, value_bias: Optional[Tensor],
    activation: str, store_preact: bool = False, dropout_p: float = 0.0, seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Y [M, H] = dropout(act(x · gate_weightᵀ + gate_bias) ⊙ (x · value_weightᵀ + value_bias)), and the
    pre-activations [gate | value] [M, 2H] that the backward needs when ``store_preact`` (else an
    empty tensor). Dropout (probability ``dropout_p``) runs when ``seed`` (int64 [1]) is given."""
    from ..kernels.gated_linear import gated_linear_fwd

    M, H = x.shape[0], gate_weight.shape[0]
    y = runtime.empty(M, H, dtype=x.dtype, device=x.device)
    z = runtime.empty(M, 2 * H, dtype=x.dtype, device=x.device) if store_preact else None
    with runtime.launching(x.device, x.dtype):
        gated_linear_fwd(x, gate_weight, gate_bias, value_weight, value_bias, activation, y, z, seed, dropout_p,
                         keep_scale(dropout_p))
    return y, x.new_empty(0) if z is None else z


@_gated_linear_fwd.register_fake
def _(x, gate_weight, gate_bias, value_weight, value_bias, activation, store_preact=False, dropout_p=0.0,
      seed=None):
    M, H = x.shape[0], gate_weight.shape[0]
    return x.new_empty(M, H), x.new_empty((M, 2 * H) if store_preact else (0,))


autocast.register("gated_linear_fwd", cast_args=(0, 1, 2, 3, 4))


def _setup_context(ctx, inputs, output) -> None:
    x, gate_weight, _, value_weight, _, activation, store_preact, dropout_p, seed = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    need_x, need_wg, _, need_wv = ctx.needs_input_grad[:4]
    # Keep alive only what the backward reads: x for the weights' gradients, the weights for dX, Z and
    # the seed (the mask is regenerated) for dZ.
    need_w = need_wg or need_wv
    ctx.save_for_backward(x if need_w else None, gate_weight if need_x else None,
                          value_weight if need_x else None, z, seed)
    ctx.activation, ctx.store_preact, ctx.dropout_p = activation, store_preact, dropout_p


def _backward(ctx, dy: Tensor, _dz):
    need_x, need_wg, need_bg, need_wv, need_bv = ctx.needs_input_grad[:5]
    grads = [None] * 5
    if any(ctx.needs_input_grad[:5]):
        if not ctx.store_preact:
            raise RuntimeError("vitfast::gated_linear_fwd ran with store_preact=False, so it cannot be "
                               "differentiated; vitfast.ops.gated_linear asks for the pre-activations itself")
        x, gate_weight, value_weight, z, seed = ctx.saved_tensors
        dx, dw, db = torch.ops.vitfast.gated_linear_bwd(dy, x, gate_weight, value_weight, z, ctx.activation,
                                                        need_x, need_wg, need_wv, need_bg or need_bv,
                                                        ctx.dropout_p, seed)
        H = dy.shape[1]
        # dw holds the rows asked for, gate's before value's; db both halves.
        grads = [dx if need_x else None, dw[:H] if need_wg else None, db[:H] if need_bg else None,
                 dw[-H:] if need_wv else None, db[H:] if need_bv else None]
    return (*grads, None, None, None, None)


torch.library.register_autograd("vitfast::gated_linear_fwd", _backward, setup_context=_setup_context)


@torch.library.custom_op("vitfast::gated_linear_bwd", mutates_args=())
def _gated_linear_bwd(
    dy: Tensor, x: Optional[Tensor], gate_weight: Optional[Tensor], value_weight: Optional[Tensor], z: Tensor,
    activation: str, compute_dx: bool, compute_dgate_weight: bool, compute_dvalue_weight: bool, compute_db: bool,
    dropout_p: float = 0.0, seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients from dy [M, H] and the stored pre-activations z = [Zg | Zv] [M, 2H], in dy's dtype:
    of x [M, K] (needs both weights); of the weights, [gate rows if asked; value rows if asked] × K
    (needs x); of both biases [2H], gate's then value's. Empty where not asked for. ``dropout_p`` and
    ``seed`` are the forward's.

    dZ = [g ⊙ Zv ⊙ act'(Zg) | g ⊙ act(Zg)], g = dy ⊙ mask/(1 - p) (the mask regenerated from the seed;
    g = dy without one), is one elementwise kernel into one [M, 2H] buffer; the
    rest is the linear kernel through strides: dX = dZg · Wg, then dX += dZv · Wv in the second GEMM's
    residual epilogue (into a second buffer: a tuning session, ``vitfast.tuning``, reruns a launch, so
    it must not accumulate in place); the weights' gradients are one GEMM dZᵀ · X over the columns
    asked for, which reads X once for both; the biases' are a fp32 torch sum of dZ's rows."""
    from ..kernels.gated_linear import gated_epilogue_bwd
    from ..kernels.linear import linear_fwd

    runtime.record_launch("gated_linear_bwd", dy, x, gate_weight, value_weight)
    M, H = dy.shape
    first = 0 if compute_dgate_weight else H
    last = 2 * H if compute_dvalue_weight else H
    dx = dw = db = None
    with runtime.launching(dy.device, dy.dtype):
        dz = runtime.empty(M, 2 * H, dtype=dy.dtype, device=dy.device)
        gated_epilogue_bwd(dy, z, activation, dz, seed, dropout_p, keep_scale(dropout_p))
        if compute_dx:
            K = gate_weight.shape[1]
            dx_gate = runtime.empty(M, K, dtype=dy.dtype, device=dy.device)
            linear_fwd(dz[:, :H], gate_weight.t(), None, None, "none", dx_gate)
            dx = runtime.empty(M, K, dtype=dy.dtype, device=dy.device)
            linear_fwd(dz[:, H:], value_weight.t(), None, dx_gate, "none", dx)
        if last > first:
            dw = runtime.empty(last - first, x.shape[1], dtype=dy.dtype, device=dy.device)
            linear_fwd(dz[:, first:last].t(), x.t(), None, None, "none", dw)
    if compute_db:
        db = dz.sum(0, dtype=torch.float32).to(dy.dtype)
    empty = dy.new_empty(0)
    return (empty if dx is None else dx, empty.clone() if dw is None else dw, empty.clone() if db is None else db)


@_gated_linear_bwd.register_fake
def _(dy, x, gate_weight, value_weight, z, activation, compute_dx, compute_dgate_weight, compute_dvalue_weight,
      compute_db, dropout_p=0.0, seed=None):
    M, H = dy.shape
    rows = H * (int(compute_dgate_weight) + int(compute_dvalue_weight))
    return (dy.new_empty((M, gate_weight.shape[1]) if compute_dx else (0,)),
            dy.new_empty((rows, x.shape[1]) if rows else (0,)),
            dy.new_empty(2 * H if compute_db else 0))


def _fallback(x: Tensor, gate_weight: Tensor, gate_bias: Tensor | None, value_weight: Tensor,
              value_bias: Tensor | None, activation: str, dropout_p: float) -> Tensor:
    y = TORCH_ACTIVATIONS[activation](F.linear(x, gate_weight, gate_bias)) * F.linear(x, value_weight, value_bias)
    return F.dropout(y, dropout_p, training=True) if dropout_p > 0.0 else y


@fx_traceable
def gated_linear(
    x: Tensor,
    gate_weight: Tensor,
    gate_bias: Tensor | None,
    value_weight: Tensor,
    value_bias: Tensor | None,
    activation: str | None = "silu",
    *,
    dropout_p: float = 0.0,
) -> Tensor:
    """``dropout(act(x @ gate_weight.T + gate_bias) * (x @ value_weight.T + value_bias))`` in one kernel.

    The gated first layer of a GLU MLP: SwiGLU with "silu" (timm's ``SwiGLU``: ``fc1_g`` is the gate,
    ``fc1_x`` the value; timm's ``GluMlp``/``SwiGLUPacked`` with ``gate_last=False``: the gate is
    ``fc1.weight[:H]``, the value ``fc1.weight[H:]``, passed as views and read in place), GeGLU with
    "gelu" or "gelu_tanh", a bilinear layer with None/"none"; "quick_gelu" and "relu" work too.
    ``x`` is any [..., K] tensor; both weights are [H, K] in ``nn.Linear`` layout with any strides, the
    biases [H] (or None) with any stride; the result is [..., H] in ``x``'s dtype. Both products
    accumulate in fp32 (TF32 for fp32 inputs only where ``torch.backends.cuda.matmul.allow_tf32``
    allows it) sharing each tile of ``x`` they read, and the result is rounded once.
    ``dropout_p`` in [0, 1] drops elements of the result (timm ``SwiGLU``'s ``drop1``; always applied
    when > 0, pass 0 in eval), kept ones multiplied by 1 / (1 - p), in the same epilogue. The mask
    comes from a seed drawn from PyTorch's generator (``torch.manual_seed`` makes it reproducible)
    and is regenerated in the backward, never stored.
    Under ``torch.autocast`` the input, weights and biases are cast to the autocast dtype, as
    ``F.linear`` casts them, and the result has that dtype.
    Differentiable: the backward runs on Triton kernels too. float64 inputs take PyTorch (warned once).

    >>> x = torch.randn(2, 257, 768)
    >>> wg, wv = torch.randn(2048, 768) / 28, torch.randn(2048, 768) / 28
    >>> h = gated_linear(x, wg, None, wv, None)                        # SwiGLU's fc1, [2, 257, 2048]
    >>> fc1 = torch.nn.Linear(768, 4096)                               # GluMlp(gate_last=False)'s fc1
    >>> h = gated_linear(x, fc1.weight[:2048], fc1.bias[:2048], fc1.weight[2048:], fc1.bias[2048:])
    >>> h = gated_linear(x, wg, None, wv, None, dropout_p=0.1)        # training, with drop1
    """
    act = activation_name(activation)
    p = check_dropout_p("dropout_p", dropout_p)
    check_input(x)
    x, gate_weight, gate_bias, value_weight, value_bias = autocast.operands(x.device, x, gate_weight, gate_bias,
                                                                            value_weight, value_bias)
    hidden = check_layer("gate_", x, x.shape[-1], "x's last dimension", gate_weight, gate_bias)
    value_hidden = check_layer("value_", x, x.shape[-1], "x's last dimension", value_weight, value_bias)
    if value_hidden != hidden:
        raise ValueError(f"value_weight has out_features {value_hidden} (shape {tuple(value_weight.shape)}) but "
                         f"gate_weight has {hidden} (shape {tuple(gate_weight.shape)}); they must match")
    check_same_device(x=x, gate_weight=gate_weight, gate_bias=gate_bias, value_weight=value_weight,
                      value_bias=value_bias)

    if kernel_path_for("gated_linear", x, hidden, None):
        runtime.record_launch("gated_linear", x, gate_weight, value_weight)
        store_preact = runtime.needs_autograd(x, gate_weight, gate_bias, value_weight, value_bias)
        seed = draw_seed(x.device) if p > 0.0 else None  # outside the custom op: compiled graphs draw it too
        y, _ = call(_gated_linear_fwd, as_rows(x, x.shape[-1]), gate_weight, gate_bias, value_weight, value_bias,
                    act, store_preact, p, seed)
        return as_result(y, (*x.shape[:-1], hidden))
    return _fallback(x, gate_weight, gate_bias, value_weight, value_bias, act, p)
