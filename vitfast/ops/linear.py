"""``linear`` and ``mlp``: GEMMs with the bias, the activation and the residual add fused into the
kernel's epilogue."""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import runtime
from ._validate import check_float, check_same_device, check_same_dtype, check_shape, check_tensor
from .layer_norm import _rows

# Accepted spellings -> the kernel's name for the epilogue activation.
_ACTIVATIONS = {None: "none", "none": "none", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "relu": "relu"}

_TORCH_ACTIVATIONS = {
    "none": lambda t: t,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


@torch.library.custom_op("vitfast::linear_fwd", mutates_args=())
def _linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], activation: str,
) -> Tensor:
    from ..kernels.linear import linear_fwd

    y = runtime.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    linear_fwd(x, weight, bias, residual, activation, y)
    return y


@_linear_fwd.register_fake
def _(x, weight, bias, residual, activation):
    return x.new_empty(x.shape[0], weight.shape[0])


def _activation(activation: str | None) -> str:
    if not (activation is None or isinstance(activation, str)) or activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation must be one of None, 'none', 'gelu', 'gelu_tanh', 'relu', got {activation!r}"
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


def _kernel_path(x: Tensor, out_width: int, *others: Tensor | None) -> bool:
    """Whether the Triton kernel takes this call (else the PyTorch fallback, which has autograd)."""
    if out_width == 0 or not runtime.use_triton(x) or runtime.needs_autograd(x, *others):
        return False
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        # Triton's interpreter computes bf16 tl.dot wrongly (ENVIRONMENT.md): never a wrong answer.
        runtime.warn_once("linear:cpu-bf16", "vitfast.linear: bfloat16 under Triton's interpreter; using PyTorch")
        return False
    return True


def _fallback(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str,
              residual: Tensor | None) -> Tensor:
    y = _TORCH_ACTIVATIONS[activation](F.linear(x, weight, bias))
    return y if residual is None else y + residual


def _launch(x2: Tensor, weight: Tensor, bias: Tensor | None, activation: str,
            residual: Tensor | None) -> Tensor:
    """One kernel over rows x2 [M, K]; the residual, shaped like the output, is viewed as rows."""
    r2 = None if residual is None else residual.reshape(x2.shape[0], weight.shape[0])
    return torch.ops.vitfast.linear_fwd(x2, weight, bias, r2, activation)


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """``act(x @ weight.T + bias) + residual`` in one kernel, ``weight`` in ``nn.Linear`` layout.

    ``x`` is any [..., in] tensor; ``activation`` is None/"none", "gelu" (exact, erf), "gelu_tanh"
    or "relu"; ``residual`` has the output's shape [..., out]. The product accumulates in fp32
    (TF32 for fp32 inputs only where ``torch.backends.cuda.matmul.allow_tf32`` allows it) and is
    rounded to ``x``'s dtype once.

    >>> x = torch.randn(2, 197, 768)
    >>> w, b = torch.randn(3072, 768), torch.randn(3072)
    >>> h = linear(x, w, b, activation="gelu")                     # fc1 + bias + GELU
    >>> y = linear(h, torch.randn(768, 3072), None, residual=x)    # fc2 + residual
    """
    act = _activation(activation)
    _check_input(x)
    out_width = _check_layer("", x, x.shape[-1], "x's last dimension", weight, bias)
    _check_residual(x, residual, out_width)
    check_same_device(x=x, weight=weight, bias=bias, residual=residual)

    if _kernel_path(x, out_width, weight, bias, residual):
        runtime.record_launch("linear")
        y = _launch(_rows(x, x.shape[-1]), weight, bias, act, residual)
        return y.view(*x.shape[:-1], out_width)
    return _fallback(x, weight, bias, act, residual)


def mlp(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    activation: str | None = "gelu",
    residual: Tensor | None = None,
) -> Tensor:
    """The transformer MLP ``fc2(act(fc1(x))) + residual`` as two fused launches.

    fc1 + bias + activation run in one kernel's epilogue, fc2 + bias + residual in the next; the
    hidden activations make one round trip through memory in ``x``'s dtype, as in PyTorch.

    >>> x = torch.randn(2, 197, 768)
    >>> w1, b1, w2, b2 = torch.randn(3072, 768), torch.randn(3072), torch.randn(768, 3072), torch.randn(768)
    >>> y = mlp(x, w1, b1, w2, b2, "gelu", residual=x)
    """
    act = _activation(activation)
    _check_input(x)
    hidden = _check_layer("fc1_", x, x.shape[-1], "x's last dimension", fc1_weight, fc1_bias)
    out_width = _check_layer("fc2_", x, hidden, "fc1's output (fc1_weight.shape[0])", fc2_weight, fc2_bias)
    _check_residual(x, residual, out_width)
    check_same_device(x=x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight,
                      fc2_bias=fc2_bias, residual=residual)

    if hidden > 0 and _kernel_path(x, out_width, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual):
        runtime.record_launch("mlp")
        h = _launch(_rows(x, x.shape[-1]), fc1_weight, fc1_bias, act, None)
        y = _launch(h, fc2_weight, fc2_bias, "none", residual)
        return y.view(*x.shape[:-1], out_width)
    h = _fallback(x, fc1_weight, fc1_bias, act, None)
    return _fallback(h, fc2_weight, fc2_bias, "none", residual)
