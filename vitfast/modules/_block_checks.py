"""Whether a call can run as one fused block: the input, every weight's shape, dtype and device, the
masks and the rotary table, checked before the first launch so that a block runs whole on the kernels
or not at all (never an error after some of its kernels have run)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..ops._autocast import lower_dtype
from ._fused import Unfusable

if TYPE_CHECKING:
    from ._block import BlockWeights

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_fits(t: Tensor, x: Tensor) -> bool:
    """Whether the ops compute with weight ``t`` on input ``x`` as PyTorch would: the same dtype, or
    any kernel dtype under autocast, which casts both to its own (a half residual stream, as open_clip
    makes under autocast, meeting fp32 weights)."""
    return t.dtype == x.dtype or (t.dtype in KERNEL_DTYPES and lower_dtype(x.device.type) is not None)


def _shape_reason(name: str, t: Tensor | None, shape: tuple[int, ...], x: Tensor, same_dtype: bool) -> str | None:
    if t is None:
        return None
    if t.shape != shape:
        return f"{name} has shape {tuple(t.shape)}, expected {shape}"
    if t.device != x.device:
        return f"{name} is on {t.device} but the input is on {x.device}"
    if not dtype_fits(t, x) if same_dtype else not t.is_floating_point():
        return f"{name} is {t.dtype}; the input is {x.dtype}"
    return None


def _masks_reason(x: Tensor, heads: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None) -> str | None:
    B, N = x.shape[:2]
    broadcast = tuple((b, h, N, N) for b in (B, 1) for h in (heads, 1))
    for name, m, shapes in (("attention mask", attn_mask, ((N, N), (B * heads, N, N), *broadcast)),
                            ("key padding mask", key_padding_mask, ((B, N),))):
        if m is None:
            continue
        if m.dtype != torch.bool and m.dtype not in KERNEL_DTYPES:
            return f"the {name} is {m.dtype}"
        if tuple(m.shape) not in shapes or m.device != x.device:
            return f"the {name} of shape {tuple(m.shape)} on {m.device} does not fit the input"
    return None


def rope_reason(x: Tensor, heads: int, head_dim: int, rope: Tensor | None, prefix: int) -> str | None:
    """Why a rotary table (timm's [sin | cos] layout) does not fit ``x`` [B, N, D], or None."""
    if rope is None:
        return None
    B, N = x.shape[:2]
    if not isinstance(rope, Tensor) or not rope.is_floating_point() or rope.device != x.device:
        return "the rotary embedding is not a float tensor on the input's device"
    if not 0 <= prefix <= N or head_dim % 2:
        return f"{prefix} prefix tokens of {N}, head size {head_dim}: no rotary embedding fits"
    lead = tuple(rope.shape[:-2])
    if (rope.dim() not in (2, 3, 4) or tuple(rope.shape[-2:]) != (N - prefix, 2 * head_dim)
            or (lead and lead[-1] not in (1, heads)) or (len(lead) == 2 and lead[0] not in (1, B))):
        return (f"a rotary embedding of shape {tuple(rope.shape)} does not fit {N - prefix} tokens "
                f"of {heads} heads of size {head_dim}")
    return None


def _pair(t) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def _expected(w: BlockWeights, width: int, inner: int, hidden: int) -> list[tuple]:
    """(name, tensor, shape, same dtype as the input) for every weight of the block."""
    if isinstance(w.qkv_weight, tuple):  # q, k and v apart, each [inner, width]
        qkv = [(f"{n} weight", t, (inner, width), True) for n, t in zip("qkv", w.qkv_weight)]
        qkv += [(f"{n} bias", t, (inner,), True) for n, t in zip("qkv", w.qkv_bias or (None,) * 3)]
    else:
        qkv = [("qkv weight", w.qkv_weight, (3 * inner, width), True), ("qkv bias", w.qkv_bias, (3 * inner,), True)]
    gated = isinstance(w.fc1_weight, tuple)  # (gate, value), each [hidden, width]
    fc1 = [(f"fc1 {n} weight", t, (hidden, width), True) for n, t in zip(("gate", "value"), _pair(w.fc1_weight))]
    fc1 += [(f"fc1 {n} bias", t, (hidden,), True)
            for n, t in zip(("gate", "value"), (w.fc1_bias or (None, None)) if gated else (w.fc1_bias,))]
    norms = [(f"{n} {p}", t, (size,), False)
             for n, norm, size in (("norm1", w.norm1, width), ("norm2", w.norm2, width),
                                   ("attention norm", w.attn_norm, inner), ("mlp norm", w.mlp_norm, hidden))
             if norm is not None for p, t in zip(("weight", "bias"), norm[:2])]
    return qkv + fc1 + norms + [
        ("proj weight", w.proj_weight, (width, inner), True), ("proj bias", w.proj_bias, (width,), True),
        ("fc2 weight", w.fc2_weight, (width, hidden), True), ("fc2 bias", w.fc2_bias, (width,), True),
        ("proj scale", w.proj_scale, (width,), False), ("fc2 scale", w.fc2_scale, (width,), False),
    ]


def block_input_reason(x: object, w: BlockWeights, key_padding_mask: Tensor | None = None,
                       attn_mask: Tensor | None = None, rope: Tensor | None = None,
                       rope_prefix: int = 0) -> str | None:
    """Why ``x``, ``w``, the masks and the rotary table cannot run as one fused block, or None."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        return f"the input is not a [batch, tokens, width] tensor (shape {tuple(getattr(x, 'shape', ()))})"
    if x.dtype not in KERNEL_DTYPES:
        return f"{x.dtype} input"
    if w.activation is None:
        return "the MLP's activation is not one the kernels fuse"
    fc1 = _pair(w.fc1_weight)[0]
    width, inner, hidden = x.shape[-1], w.proj_weight.shape[-1], fc1.shape[0]
    if w.proj_weight.dim() != 2 or fc1.dim() != 2:
        return "proj or fc1 weight is not 2-D"
    if w.num_heads < 1 or inner % w.num_heads:
        return f"attention width {inner} does not split into {w.num_heads} heads"
    for name, t, shape, same_dtype in _expected(w, width, inner, hidden):
        reason = _shape_reason(name, t, shape, x, same_dtype)
        if reason is not None:
            return reason
    if not all(norm[2] >= 0 for norm in (w.norm1, w.norm2, w.attn_norm, w.mlp_norm) if norm is not None):
        return "a LayerNorm has a negative eps"
    return (_masks_reason(x, w.num_heads, key_padding_mask, attn_mask)
            or rope_reason(x, w.num_heads, inner // w.num_heads, rope, rope_prefix))


def check_block(x: Tensor, w: BlockWeights, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
                rope: Tensor | None = None, rope_prefix: int = 0) -> None:
    """Raise ``Unfusable`` (the stand-ins then run the original forward) when the block cannot run fused."""
    reason = block_input_reason(x, w, key_padding_mask, attn_mask, rope, rope_prefix)
    if reason is not None:
        raise Unfusable(reason)
