"""What ``linear``, ``mlp`` and ``gated_linear`` share around their kernels: the activation names, the
argument checks (each raises before any launch, naming the argument), the dispatch test and the
PyTorch composite that float64, bf16 on CPU and plain CPU run instead."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _autocast as autocast
from ._dispatch import kernel_path
from ._validate import check_float, check_same_dtype, check_shape, check_tensor

# Accepted spellings -> the kernel's name for the epilogue activation.
_ACTIVATIONS = {None: "none", "none": "none", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu",
                "relu": "relu", "silu": "silu"}

TORCH_ACTIVATIONS = {
    "none": lambda t: t,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),  # as CLIP, timm, open_clip and transformers
    "relu": F.relu,
    "silu": F.silu,
}


def activation_name(activation: str | None) -> str:
    """The kernel's name for an accepted spelling, or a ValueError listing them."""
    if not (activation is None or isinstance(activation, str)) or activation not in _ACTIVATIONS:
        raise ValueError(
            "activation must be one of None, 'none', 'gelu', 'gelu_tanh', 'quick_gelu', 'relu', 'silu', "
            f"got {activation!r}"
        )
    return _ACTIVATIONS[activation]


def check_input(x: Tensor) -> None:
    check_float("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")


def check_layer(prefix: str, x: Tensor, in_width: int, source: str, weight: Tensor, bias: Tensor | None) -> int:
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


def check_residual(x: Tensor, residual: Tensor | None, out_width: int) -> None:
    """The residual has the output's shape, and x's dtype — any float dtype under autocast, where eager's
    half-precision GEMM result meets the model's fp32 residual stream."""
    if residual is not None:
        check_tensor("residual", residual)
        check_shape("residual", residual, (*x.shape[:-1], out_width))
        if autocast.lower_dtype(x.device.type) is None:
            check_same_dtype("residual", residual, "x", x)
        else:
            check_float("residual", residual)


def check_scale(scale: Tensor | None, out_width: int) -> None:
    if scale is not None:
        check_float("scale", scale)
        check_shape("scale", scale, (out_width,))


def check_row_scale(x: Tensor, row_scale: Tensor | None) -> None:
    """A per-row factor must be a float tensor that broadcasts to x's leading dimensions (one factor per
    output row: [B, 1] for x [B, N, D], [1, B] for sequence-first x [N, B, D])."""
    if row_scale is None:
        return
    check_float("row_scale", row_scale)
    rows = tuple(x.shape[:-1])
    try:
        fits = torch.broadcast_shapes(tuple(row_scale.shape), rows) == rows
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"row_scale must broadcast to x's leading dimensions {rows} (e.g. [B, 1] for x [B, N, D]), "
                         f"got shape {tuple(row_scale.shape)}")


def row_vector(row_scale: Tensor | None, x: Tensor) -> Tensor | None:
    """The per-row factor as the kernels read it: contiguous fp32 [M], one entry per row of
    ``x.reshape(-1, x.shape[-1])``."""
    if row_scale is None:
        return None
    return row_scale.detach().to(torch.float32).expand(x.shape[:-1]).reshape(-1).contiguous()


def kernel_path_for(op: str, x: Tensor, out_width: int, *others: Tensor | None) -> bool:
    """Whether the Triton kernels take this call, forward and backward (else the PyTorch fallback);
    weights and biases share ``x``'s dtype, the other tensors the kernel reads (scale, residual, row
    factor) may differ — a float64 one among them takes PyTorch too."""
    return out_width > 0 and kernel_path(op, x, *others)


def fallback(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, residual: Tensor | None,
             scale: Tensor | None = None, dropout_p: float = 0.0, row_scale: Tensor | None = None) -> Tensor:
    """PyTorch's composite, in the kernels' order: residual + row_scale ⊙ scale ⊙ dropout(act(linear))."""
    y = TORCH_ACTIVATIONS[activation](F.linear(x, weight, bias))
    if dropout_p > 0.0:
        y = F.dropout(y, dropout_p, training=True)
    # Factors of another float dtype do not change the output's, except under autocast, where the
    # result takes eager's promoted dtype (as the kernel path's).
    promote = autocast.lower_dtype(x.device.type) is not None
    for factor in (scale, None if row_scale is None else row_scale.unsqueeze(-1)):
        if factor is not None:
            y = y * factor if promote else (y * factor).to(y.dtype)
    return y if residual is None else y + residual
