"""``torch.autocast`` for the ops: each follows PyTorch's policy for the functions it replaces.

* GEMMs, attention and the patch embedding (``linear``, ``scaled_dot_product_attention``,
  ``conv2d``: autocast's lower-precision list on CPU and CUDA) take their operands — the input and
  the weights and biases it meets — in the autocast dtype. What eager adds to the result afterwards
  (a residual, LayerScale's gamma, the CLS token and position embedding) keeps its dtype: the
  kernel adds it in fp32 and stores the promoted dtype, as ``half_result + fp32_stream`` gives fp32.
* LayerNorm: CUDA autocast runs ``layer_norm`` in float32 (its fp32 list), CPU autocast leaves it
  alone (its inputs keep their dtypes; mixed ones normalise in fp32).

Like autocast's own casts, float64 tensors are never cast. The public ops cast before their checks
(so mixed dtypes that eager accepts under autocast pass), and the same policy is registered for the
custom ops with ``torch.library`` at their Autocast dispatch keys, so a direct call of
``torch.ops.vitfast.*`` and every graph ``torch.compile`` traces see it too.
"""
from __future__ import annotations

import torch
from torch import Tensor

DEVICE_TYPES = ("cpu", "cuda")


def lower_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype when autocast is on for ``device_type``, else None."""
    if device_type in DEVICE_TYPES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t: object, dtype: torch.dtype) -> object:
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype not in (torch.float64, dtype):
        return t.to(dtype)
    return t


def operands(device: torch.device, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``tensors`` as a lower-precision op under autocast on ``device`` receives them (unchanged
    without autocast)."""
    return _as_policy(device, "lower", tensors)


def result_dtype(x: Tensor, *added: Tensor | None) -> torch.dtype | None:
    """Under autocast, the dtype of eager's ``op(x) ⊙/+ added...``: ``x``'s (the autocast dtype after
    ``operands``) promoted with each tensor the op combines with its result (a residual, a scale, the
    class token); None without autocast or when that is ``x``'s own dtype."""
    return None if lower_dtype(x.device.type) is None else _promoted(x.dtype, *added)


def layer_norm_inputs(device: torch.device, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``tensors`` as ``layer_norm`` receives them under autocast: float32 on CUDA, unchanged on CPU."""
    return _as_policy(device, "layer_norm", tensors)


def _as_policy(device: torch.device, policy: str, tensors: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    dtype = None if lower_dtype(device.type) is None else _policy_dtype(device.type, policy)
    return tensors if dtype is None else tuple(_cast(t, dtype) for t in tensors)


def _policy_dtype(device_type: str, policy: str) -> torch.dtype | None:
    if policy == "lower":
        return torch.get_autocast_dtype(device_type)
    return torch.float32 if device_type == "cuda" else None  # "layer_norm"


def register(op: str, cast_args: tuple[int, ...], policy: str = "lower",
             result: tuple[int, tuple[int, ...]] | None = None) -> None:
    """Register ``vitfast::<op>``'s autocast rule on CPU and CUDA: the positional arguments
    ``cast_args`` are cast (``policy`` "lower": to the autocast dtype; "layer_norm": to float32 on
    CUDA only), then the op runs with autocast off, as PyTorch's own autocast kernels do.
    ``result`` = (index of the op's ``out_dtype`` argument, indices of the tensors its result is
    combined with): when the caller leaves ``out_dtype`` None, it is set to eager's promoted dtype
    (see ``result_dtype``), as the public ops pass it."""
    schema = getattr(torch.ops.vitfast, op).default._schema
    defaults = [a.default_value if a.has_default_value() else None for a in schema.arguments]
    for device_type in DEVICE_TYPES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

        def kernel(_keyset, *args, _device_type=device_type, _excluded=excluded):
            dtype = _policy_dtype(_device_type, policy)
            if dtype is not None:
                args = [_cast(a, dtype) if i in cast_args else a for i, a in enumerate(args)]
                if result is not None:
                    args += defaults[len(args):]
                    out, added = result
                    if args[out] is None:
                        args[out] = _promoted(args[0].dtype, *(args[i] for i in added))
            with torch._C._ExcludeDispatchKeyGuard(_excluded):
                return getattr(torch.ops.vitfast, op)(*args)

        _LIBRARY.impl(op, kernel, key_name, with_keyset=True)


def _promoted(dtype: torch.dtype, *added: Tensor | None) -> torch.dtype | None:
    """``dtype`` promoted with each tensor's; None when that is ``dtype`` itself."""
    out = dtype
    for t in added:
        if t is not None:
            out = torch.promote_types(out, t.dtype)
    return None if out == dtype else out


_LIBRARY = torch.library.Library("vitfast", "IMPL")
