"""``linear`` and ``mlp``: GEMMs with the bias, the activation and the residual add fused into the
kernel's epilogue."""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import runtime
from ._dispatch import kernel_path
from ._layout import as_rows
from ._trace import fx_traceable
from ._validate import check_float, check_same_device, check_same_dtype, check_shape, check_tensor

# Accepted spellings -> the kernel's name for the epilogue activation.
_ACTIVATIONS = {None: "none", "none": "none", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu",
                "relu": "relu", "silu": "silu"}

_TORCH_ACTIVATIONS = {
    "none": lambda t: t,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),  # as CLIP, timm, open_clip and transformers
    "relu": F.relu,
    "silu": F.silu,
}


@torch.library.custom_op("vitfast::linear_fwd", mutates_args=())
def _linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], activation: str,
    store_preact: bool = False, scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Y = scale ⊙ act(x · weightᵀ + bias) + residual, and the pre-activation x · weightᵀ + bias that
    the backward needs when ``store_preact`` (else an empty tensor)."""
    from ..kernels.linear import linear_fwd

    M, N = x.shape[0], weight.shape[0]
    y = runtime.empty(M, N, dtype=x.dtype, device=x.device)
    z = runtime.empty(M, N, dtype=x.dtype, device=x.device) if store_preact else None
    with runtime.launching(x.device):
        linear_fwd(x, weight, bias, residual, activation, y, z, scale)
    return y, x.new_empty(0) if z is None else z


@_linear_fwd.register_fake
def _(x, weight, bias, residual, activation, store_preact=False, scale=None):
    M, N = x.shape[0], weight.shape[0]
    return x.new_empty(M, N), x.new_empty((M, N) if store_preact else (0,))


def _needs_scale_grad(ctx) -> bool:
    # torch leaves arguments that keep their defaults (scale=None) out of needs_input_grad.
    return len(ctx.needs_input_grad) > 6 and ctx.needs_input_grad[6]


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, _, activation, store_preact, scale = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    need_x, need_w = ctx.needs_input_grad[:2]
    need_s = _needs_scale_grad(ctx)
    # Keep alive only what the backward reads: x for dW, the weight for dX, Z for act'(Z) and for
    # the scale's gradient, the scale for the gradient through the scaled branch.
    ctx.save_for_backward(x if need_w else None, weight if need_x else None,
                          z if activation != "none" or need_s else None, scale)
    ctx.activation, ctx.store_preact = activation, store_preact
    ctx.scale_dtype = None if scale is None else scale.dtype


def _backward(ctx, dy: Tensor, _dz):
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    need_s = _needs_scale_grad(ctx)
    grads = [None, None, None]
    dscale = None
    if need_x or need_w or need_b or need_s:
        if (ctx.activation != "none" or need_s) and not ctx.store_preact:
            raise RuntimeError("vitfast::linear_fwd ran with store_preact=False, so its activation and scale "
                               "cannot be differentiated; vitfast.ops.linear asks for the pre-activation itself")
        x, weight, z, scale = ctx.saved_tensors
        dx, dw, db, ds = torch.ops.vitfast.linear_bwd(dy, x, weight, z, ctx.activation, need_x, need_w, need_b,
                                                      scale, need_s)
        grads = [dx if need_x else None, dw if need_w else None, db if need_b else None]
        dscale = ds.to(ctx.scale_dtype) if need_s else None
    # dR = dY: the residual is added after the activation and the scale.
    return (*grads, dy if need_r else None, None, None, dscale)


torch.library.register_autograd("vitfast::linear_fwd", _backward, setup_context=_setup_context)


@torch.library.custom_op("vitfast::linear_bwd", mutates_args=())
def _linear_bwd(
    dy: Tensor, x: Optional[Tensor], weight: Optional[Tensor], z: Optional[Tensor], activation: str,
    compute_dx: bool, compute_dw: bool, compute_db: bool, scale: Optional[Tensor] = None,
    compute_dscale: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x [M, K] (needs weight), weight [N, K] (needs x) and bias [N] in dy's dtype, and of
    the scale [N] in fp32 (needs z), from dy [M, N] and the stored pre-activation z; empty where not
    asked for.

    dZ = dy ⊙ scale ⊙ act'(z) is one elementwise kernel, which also sums dy ⊙ act(z) over the rows for
    the scale (dZ is dy itself when there is neither activation nor scale); dX and dW are the forward
    GEMM kernel reading its operands transposed; dB is a fp32 torch sum of dZ's rows."""
    from ..kernels.linear import epilogue_bwd, linear_bwd

    runtime.record_launch("linear_bwd")
    M, N = dy.shape
    need_dz = compute_dx or compute_dw or compute_db
    dz = dy
    with runtime.launching(dy.device):
        if activation != "none" or scale is not None or compute_dscale:
            dz = runtime.empty(M, N, dtype=dy.dtype, device=dy.device) if need_dz else None
            dscale = epilogue_bwd(dy, z, scale, activation, dz, compute_dscale)
        else:
            dscale = None
        dx = runtime.empty(M, weight.shape[1], dtype=dy.dtype, device=dy.device) if compute_dx else None
        dw = runtime.empty(N, x.shape[1], dtype=dy.dtype, device=dy.device) if compute_dw else None
        linear_bwd(dz, x, weight, dx, dw)
    empty = dy.new_empty(0)
    return (empty if dx is None else dx, empty.clone() if dw is None else dw,
            dz.sum(0, dtype=torch.float32).to(dy.dtype) if compute_db else empty.clone(),
            empty.new_empty(0, dtype=torch.float32) if dscale is None else dscale)


@_linear_bwd.register_fake
def _(dy, x, weight, z, activation, compute_dx, compute_dw, compute_db, scale=None, compute_dscale=False):
    M, N = dy.shape
    return (dy.new_empty((M, weight.shape[1]) if compute_dx else (0,)),
            dy.new_empty((N, x.shape[1]) if compute_dw else (0,)),
            dy.new_empty(N if compute_db else 0),
            dy.new_empty(N if compute_dscale else 0, dtype=torch.float32))


def _activation(activation: str | None) -> str:
    if not (activation is None or isinstance(activation, str)) or activation not in _ACTIVATIONS:
        raise ValueError(
            "activation must be one of None, 'none', 'gelu', 'gelu_tanh', 'quick_gelu', 'relu', 'silu', "
            f"got {activation!r}"
        )
    return _ACTIVATIONS[activation]


def _check_input(x: Tensor) -> None:
    check_float("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")


def _check_layer(prefix: str, x: Tensor, in_width: int, source: str,
                 weight: Tensor, bias: Tensor | None) -> int:
    """Check one layer's weight [out, in] and bias [out] against the width feeding it; returns out."""
    name = f"{prefix}weight"
    check_float(name, weight)
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if weight.shape[1] != in_width:
        raise ValueError(f"{name} has in_features {weight.shape[1]} (shape {tuple(weight.shape)}) "
                         f"but {source} has width {in_width}")
    check_same_dtype(name, weight, "x", x)
    if bias is not None:
        check_float(f"{prefix}bias", bias)
        check_shape(f"{prefix}bias", bias, (weight.shape[0],))
        check_same_dtype(f"{prefix}bias", bias, "x", x)
    return weight.shape[0]


def _check_residual(x: Tensor, residual: Tensor | None, out_width: int) -> None:
    if residual is not None:
        check_tensor("residual", residual)
        check_shape("residual", residual, (*x.shape[:-1], out_width))
        check_same_dtype("residual", residual, "x", x)


def _check_scale(scale: Tensor | None, out_width: int) -> None:
    if scale is not None:
        check_float("scale", scale)
        check_shape("scale", scale, (out_width,))


def _kernel_path(op: str, x: Tensor, out_width: int, scale: Tensor | None) -> bool:
    """Whether the Triton kernels take this call, forward and backward (else the PyTorch fallback);
    weights, biases and the residual share ``x``'s dtype, the scale may differ."""
    return out_width > 0 and kernel_path(op, x, scale)


def _fallback(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str,
              residual: Tensor | None, scale: Tensor | None = None) -> Tensor:
    y = _TORCH_ACTIVATIONS[activation](F.linear(x, weight, bias))
    if scale is not None:
        y = (y * scale).to(y.dtype)  # a scale of another float dtype does not change the output's
    return y if residual is None else y + residual


def _launch(x2: Tensor, weight: Tensor, bias: Tensor | None, activation: str,
            residual: Tensor | None, scale: Tensor | None = None) -> Tensor:
    """One kernel over rows x2 [M, K]; the residual, shaped like the output, is viewed as rows.
    Training stores the pre-activation for the backward rather than recomputing a GEMM there: act'(Z)
    needs it, and so does the scale's gradient Σ dY ⊙ act(Z)."""
    r2 = None if residual is None else residual.reshape(x2.shape[0], weight.shape[0])
    scale_grad = scale is not None and runtime.needs_autograd(scale)
    store_preact = (activation != "none" and runtime.needs_autograd(x2, weight, bias)) or scale_grad
    return torch.ops.vitfast.linear_fwd(x2, weight, bias, r2, activation, store_preact, scale)[0]


@fx_traceable
def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    residual: Tensor | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    """``scale * act(x @ weight.T + bias) + residual`` in one kernel, ``weight`` in ``nn.Linear`` layout.

    ``x`` is any [..., in] tensor; ``activation`` is None/"none", "gelu" (exact, erf), "gelu_tanh",
    "quick_gelu" (``x * sigmoid(1.702 * x)``, OpenAI CLIP's), "relu" or "silu" (``x * sigmoid(x)``);
    ``residual`` has the output's shape [..., out]; ``scale`` [out] multiplies each output column
    (timm's LayerScale), any float dtype and stride, applied in fp32 like the bias. The product
    accumulates in fp32 (TF32 for fp32 inputs only where ``torch.backends.cuda.matmul.allow_tf32``
    allows it) and is rounded to ``x``'s dtype once.
    Differentiable: the backward runs on Triton kernels too, the scale's gradient included.
    float64 inputs take PyTorch (warned once).

    >>> x = torch.randn(2, 197, 768)
    >>> w, b = torch.randn(3072, 768), torch.randn(3072)
    >>> h = linear(x, w, b, activation="gelu")                     # fc1 + bias + GELU
    >>> y = linear(h, torch.randn(768, 3072), None, residual=x)    # fc2 + residual
    >>> y = linear(h, torch.randn(768, 3072), None, residual=x, scale=torch.full((768,), 1e-5))
    """
    act = _activation(activation)
    _check_input(x)
    out_width = _check_layer("", x, x.shape[-1], "x's last dimension", weight, bias)
    _check_residual(x, residual, out_width)
    _check_scale(scale, out_width)
    check_same_device(x=x, weight=weight, bias=bias, residual=residual, scale=scale)

    if _kernel_path("linear", x, out_width, scale):
        runtime.record_launch("linear")
        y = _launch(as_rows(x, x.shape[-1]), weight, bias, act, residual, scale)
        return y.view(*x.shape[:-1], out_width)
    return _fallback(x, weight, bias, act, residual, scale)


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
) -> Tensor:
    """The transformer MLP ``scale * fc2(act(fc1(x))) + residual`` as two fused launches.

    fc1 + bias + activation run in one kernel's epilogue, fc2 + bias (+ ``scale`` [out], timm's
    LayerScale, applied after fc2's bias) + residual in the next; the hidden activations make one
    round trip through memory in ``x``'s dtype, as in PyTorch. Gradients flow through both
    launches' backward kernels.

    >>> x = torch.randn(2, 197, 768)
    >>> w1, b1, w2, b2 = torch.randn(3072, 768), torch.randn(3072), torch.randn(768, 3072), torch.randn(768)
    >>> y = mlp(x, w1, b1, w2, b2, "gelu", residual=x)
    """
    act = _activation(activation)
    _check_input(x)
    hidden = _check_layer("fc1_", x, x.shape[-1], "x's last dimension", fc1_weight, fc1_bias)
    out_width = _check_layer("fc2_", x, hidden, "fc1's output (fc1_weight.shape[0])", fc2_weight, fc2_bias)
    _check_residual(x, residual, out_width)
    _check_scale(scale, out_width)
    check_same_device(x=x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight,
                      fc2_bias=fc2_bias, residual=residual, scale=scale)

    if hidden > 0 and _kernel_path("mlp", x, out_width, scale):
        runtime.record_launch("mlp")
        h = _launch(as_rows(x, x.shape[-1]), fc1_weight, fc1_bias, act, None)
        y = _launch(h, fc2_weight, fc2_bias, "none", residual, scale)
        return y.view(*x.shape[:-1], out_width)
    h = _fallback(x, fc1_weight, fc1_bias, act, None)
    return _fallback(h, fc2_weight, fc2_bias, "none", residual, scale)
