"""``attention`` and ``attention_qkv``: softmax(scale · Q Kᵀ + masks) V in one fused kernel.

Mask convention (both entries): nn.MultiheadAttention's, not SDPA's.

* ``key_padding_mask`` [B, N]: bool, True = ignore that key; or float, added to the scores.
* ``attn_mask`` [N, N], [B·heads, N, N] (batch-major, as nn.MultiheadAttention stacks it) or 4-D,
  broadcastable to [B, heads, N, N] (as Hugging Face passes it, [B, 1, N, N]): bool, True = NOT
  allowed (``F.scaled_dot_product_attention``'s bool mask means the opposite); or float, added to
  the scaled scores.
* ``is_causal``: query i attends to keys 0..i; combines with the masks.

A query row with no allowed key (every key masked) gives zeros, never NaN (recent SDPA agrees; older
PyTorch gave NaN), and its log-sum-exp is +inf. Masks are read in place through their strides, so
a mask broadcast with ``expand`` costs no memory.

Training: inputs that need gradients run FlashAttention-2 backward kernels from the saved fp32
log-sum-exp (``kernels/attention.py``), through ``torch.library`` custom ops, so autograd and
``torch.compile`` see them; ``attention`` returns the gradient of ``qkv`` as one packed buffer. The
kernels compute no gradient for a float mask: a mask that needs one takes the PyTorch path (warned once).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import runtime
from ._dispatch import kernel_path
from ._trace import fx_traceable
from ._validate import FLOAT_DTYPES, check_float, check_same_device, check_tensor

MAX_HEAD_DIM = 256


def _heads(t: Tensor, heads: int) -> Tensor:
    """[B, H, N, d] view of a tokens-major [B, N, H·d] tensor (a [B, H, N, d] one passes through)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2) if t.dim() == 3 else t


def _split_packed(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, N, 3·H·d] -> three [B, H, N, d] views of the same storage; no data moves."""
    return qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


def _unit_last(t: Tensor) -> Tensor:
    """The kernels read rows through strides but need unit stride along the last dimension."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
             scale: float, is_causal: bool, tokens_major: bool) -> tuple[Tensor, Tensor]:
    from ..kernels.attention import attention_fwd

    B, H, N, d = q.shape
    shape = (B, N, H * d) if tokens_major else (B, H, N, d)  # tokens-major is ready for the out-projection
    out = runtime.empty(*shape, dtype=q.dtype, device=q.device)
    lse = runtime.empty(B, H, N, dtype=torch.float32, device=q.device)
    with runtime.launching(q.device):
        attention_fwd(q, k, v, _heads(out, H), lse, key_padding_mask, attn_mask, scale, is_causal)
    return out, lse


def _backward_into(dq: Tensor, dk: Tensor, dv: Tensor, dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
                   out: Tensor, lse: Tensor, dlse: Tensor | None, key_padding_mask: Tensor | None,
                   attn_mask: Tensor | None, scale: float, is_causal: bool) -> None:
    """Run the backward kernels, writing the [B, H, N, d] views dq, dk, dv."""
    from ..kernels.attention import attention_bwd

    runtime.record_launch("attention_bwd")
    H = q.shape[1]
    dlse = None if dlse is None else dlse.float().contiguous()
    with runtime.launching(q.device):
        attention_bwd(q, k, v, _heads(out, H), _unit_last(_heads(dout, H)), lse, dlse, dq, dk, dv,
                      key_padding_mask, attn_mask, scale, is_causal)


@torch.library.custom_op("vitfast::attention_fwd", mutates_args=())
def _attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
    scale: float, is_causal: bool, tokens_major: bool,
) -> tuple[Tensor, Tensor]:
    """Attention over [B, H, N, d] q, k, v: out [B, N, H·d] if tokens_major else [B, H, N, d], and the
    fp32 log-sum-exp [B, H, N]."""
    return _forward(q, k, v, key_padding_mask, attn_mask, scale, is_causal, tokens_major)


@_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, attn_mask, scale, is_causal, tokens_major):
    B, H, N, d = q.shape
    out = q.new_empty(B, N, H * d) if tokens_major else q.new_empty(B, H, N, d)
    return out, q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("vitfast::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor], scale: float, is_causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``vitfast::attention_fwd`` wrt q, k, v: contiguous [B, H, N, d] each."""
    dq, dk, dv = (runtime.empty(*q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    _backward_into(dq, dk, dv, dout, q, k, v, out, lse, dlse, key_padding_mask, attn_mask, scale, is_causal)
    return dq, dk, dv


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, key_padding_mask, attn_mask, scale, is_causal):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


@torch.library.custom_op("vitfast::attention_packed_fwd", mutates_args=())
def _attention_packed_fwd(
    qkv: Tensor, num_heads: int, key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
    scale: float, is_causal: bool,
) -> tuple[Tensor, Tensor]:
    """Attention over the packed [B, N, 3·H·d] qkv (read in place): out [B, N, H·d] and the fp32
    log-sum-exp [B, H, N]. Taking qkv whole lets the backward write one packed gradient."""
    return _forward(*_split_packed(qkv, num_heads), key_padding_mask, attn_mask, scale, is_causal, True)


@_attention_packed_fwd.register_fake
def _(qkv, num_heads, key_padding_mask, attn_mask, scale, is_causal):
    B, N, width = qkv.shape
    return qkv.new_empty(B, N, width // 3), qkv.new_empty(B, num_heads, N, dtype=torch.float32)


@torch.library.custom_op("vitfast::attention_packed_bwd", mutates_args=())
def _attention_packed_bwd(
    dout: Tensor, qkv: Tensor, num_heads: int, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor], scale: float, is_causal: bool,
) -> Tensor:
    """Gradient of ``vitfast::attention_packed_fwd`` wrt qkv: one contiguous [B, N, 3·H·d] buffer
    that the kernels write through three strided views, so no stack or copy follows."""
    dqkv = runtime.empty(*qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _backward_into(*_split_packed(dqkv, num_heads), dout, *_split_packed(qkv, num_heads), out, lse, dlse,
                   key_padding_mask, attn_mask, scale, is_causal)
    return dqkv


@_attention_packed_bwd.register_fake
def _(dout, qkv, num_heads, out, lse, dlse, key_padding_mask, attn_mask, scale, is_causal):
    return qkv.new_empty(qkv.shape)


def _save(ctx, tensors: tuple[Tensor, ...], output: tuple[Tensor, Tensor], key_padding_mask: Tensor | None,
          attn_mask: Tensor | None, scale: float, is_causal: bool) -> None:
    ctx.save_for_backward(*tensors, *output, key_padding_mask, attn_mask)
    ctx.scale, ctx.is_causal = scale, is_causal
    # Usually only out reaches the loss: then no zero-filled lse gradient is made, nor read.
    ctx.set_materialize_grads(False)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, attn_mask, scale, is_causal, _ = inputs
    _save(ctx, (q, k, v), output, key_padding_mask, attn_mask, scale, is_causal)


def _setup_packed_context(ctx, inputs, output) -> None:
    qkv, ctx.num_heads, key_padding_mask, attn_mask, scale, is_causal = inputs
    _save(ctx, (qkv,), output, key_padding_mask, attn_mask, scale, is_causal)


def _grad_of_output(dout: Tensor | None, out: Tensor) -> Tensor:
    return torch.zeros_like(out) if dout is None else dout


def _attention_backward(ctx, dout: Tensor | None, dlse: Tensor | None):
    q, k, v, out, lse, kpm, mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.vitfast.attention_bwd(_grad_of_output(dout, out), q, k, v, out, lse, dlse, kpm, mask,
                                                 ctx.scale, ctx.is_causal)
    return dq, dk, dv, None, None, None, None, None


def _packed_backward(ctx, dout: Tensor | None, dlse: Tensor | None):
    qkv, out, lse, kpm, mask = ctx.saved_tensors
    dqkv = torch.ops.vitfast.attention_packed_bwd(_grad_of_output(dout, out), qkv, ctx.num_heads, out, lse, dlse,
                                                  kpm, mask, ctx.scale, ctx.is_causal)
    return dqkv, None, None, None, None, None


# Gradients wrt the masks are not computed: ``_kernel_path`` sends a mask that needs one to PyTorch.
torch.library.register_autograd("vitfast::attention_fwd", _attention_backward, setup_context=_setup_context)
torch.library.register_autograd("vitfast::attention_packed_fwd", _packed_backward,
                                setup_context=_setup_packed_context)


def _bias(q: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
    """The masks as one additive bias broadcastable to [B, H, N, N], fp32 (float64 for float64 q);
    -inf = not allowed."""
    B, H, N, _ = q.shape
    bias = torch.zeros(1, 1, N, N, dtype=_stats_dtype(q), device=q.device)
    if is_causal:
        bias = torch.where(torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1), -math.inf, bias)
    masks = [] if attn_mask is None else [attn_mask.reshape(B, H, N, N) if attn_mask.dim() == 3 else attn_mask]
    # 2-D and 4-D masks broadcast against [B, H, N, N] as they are.
    if key_padding_mask is not None:
        masks.append(key_padding_mask[:, None, None, :])
    for m in masks:
        bias = torch.where(m, -math.inf, bias) if m.dtype == torch.bool else bias + m.to(bias.dtype)
    return bias


def _stats_dtype(q: Tensor) -> torch.dtype:
    """Scores, masks and log-sum-exp on the PyTorch path: fp32, or float64 for float64 inputs."""
    return torch.promote_types(q.dtype, torch.float32)


def _fallback(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
              scale: float, is_causal: bool, return_lse: bool) -> tuple[Tensor, Tensor | None]:
    """SDPA on [B, H, N, d] tensors with the masks converted to its convention; rows with no allowed
    key are zeroed (and unmasked before SDPA, so neither the output nor its gradient holds NaN)."""
    if key_padding_mask is None and attn_mask is None and not return_lse:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale), None
    bias = _bias(q, key_padding_mask, attn_mask, is_causal)
    dead = torch.isneginf(bias).all(-1, keepdim=True)
    bias = bias.masked_fill(dead, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)
    out = out.masked_fill(dead, 0.0)
    if not return_lse:
        return out, None
    dt = _stats_dtype(q)
    scores = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale + bias
    lse = torch.logsumexp(scores, dim=-1).masked_fill(dead.squeeze(-1), math.inf)
    return out, lse


def _broadcast_shapes(B: int, heads: int, N: int) -> tuple[tuple[int, ...], ...]:
    """The 4-D attention-mask shapes that broadcast to [B, heads, N, N]."""
    return tuple((b, h, N, N) for b in dict.fromkeys((B, 1)) for h in dict.fromkeys((heads, 1)))


def _check_mask(name: str, mask: object, shapes: tuple[tuple[int, ...], ...], expected: str | None = None) -> None:
    check_tensor(name, mask)
    if mask.dtype != torch.bool and mask.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be bool or float32, float16, bfloat16 or float64, got {mask.dtype}")
    if tuple(mask.shape) not in shapes:
        expected = expected or " or ".join(str(s) for s in shapes)
        raise ValueError(f"{name} must have shape {expected}, got {tuple(mask.shape)}")


def _check_scale(scale: object) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")


def _kernel_path(q: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None) -> bool:
    """Whether the Triton kernels take this call; a valid configuration they do not cover falls back
    to PyTorch with one warning."""
    if not kernel_path("attention", q, key_padding_mask, attn_mask):
        return False
    from ..kernels.attention import HEAD_DIMS

    d = q.shape[-1]
    if d not in HEAD_DIMS:
        runtime.warn_once(f"attention:head_dim={d}:{q.dtype}",
                          f"vitfast.attention: head size {d} is not one of {HEAD_DIMS}; using PyTorch SDPA")
        return False
    if runtime.needs_autograd(key_padding_mask, attn_mask):
        runtime.warn_once("attention:mask_grad", "vitfast.attention: the kernels do not compute gradients "
                          "with respect to a float mask; using PyTorch SDPA")
        return False
    return True


def _run(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
         scale: float | None, is_causal: bool, return_lse: bool, tokens_major: bool,
         kernel: Callable[[float, bool], tuple[Tensor, Tensor]]):
    """Shared by both entries: q, k, v are [B, H, N, d] views; ``kernel(scale, is_causal)`` runs the
    entry's custom op, else the fallback runs."""
    B, H, N, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    is_causal = bool(is_causal)
    if _kernel_path(q, key_padding_mask, attn_mask):
        runtime.record_launch("attention")
        out, lse = kernel(scale, is_causal)
    else:
        out, lse = _fallback(q, k, v, key_padding_mask, attn_mask, scale, is_causal, return_lse)
        if tokens_major:
            out = out.transpose(1, 2).reshape(B, N, H * d)
    return (out, lse) if return_lse else out


@fx_traceable
def attention(qkv: Tensor, num_heads: int, key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
              scale: float | None = None, is_causal: bool = False,
              return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Multi-head attention over the packed in-projection output ``qkv`` [B, N, 3·D].

    The last dimension holds q | k | v, each D = num_heads · d wide (nn.MultiheadAttention's
    ``in_proj`` and timm's ``qkv`` layout). ``qkv`` may have any strides (e.g. ``buf.transpose(0, 1)``
    of a sequence-first [N, B, 3D] buffer): the kernel reads it in place; only a last dimension
    without unit stride is copied. Returns a contiguous [B, N, D], heads side by side, ready for the
    out-projection; with ``return_lse`` also the fp32 natural-log log-sum-exp [B, heads, N] of each
    row's scaled, masked scores (+inf where a row has no allowed key; float64 for float64 inputs,
    which take PyTorch with one warning, as bfloat16 does on CPU tensors). ``scale`` defaults to 1/√d.
    Masks follow nn.MultiheadAttention (bool True = not allowed), see the module docstring.

    >>> qkv = torch.randn(2, 197, 3 * 768)
    >>> y = attention(qkv, num_heads=12)  # [2, 197, 768]
    >>> pad = torch.zeros(2, 197, dtype=torch.bool); pad[1, 150:] = True
    >>> y = attention(qkv, 12, key_padding_mask=pad)
    """
    check_float("qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be 3-D [batch, tokens, 3 * embed_dim], got shape {tuple(qkv.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    num_heads = int(num_heads)  # a NumPy integer from a config file, say: the custom op takes int
    B, N, width = qkv.shape
    if width % (3 * num_heads) != 0:
        raise ValueError(f"qkv last dimension ({width}) must be divisible by 3 * num_heads "
                         f"(3 * {num_heads} = {3 * num_heads})")
    _check_common("qkv", qkv, B, N, num_heads, width // (3 * num_heads), key_padding_mask, attn_mask, scale)
    q, k, v = _split_packed(qkv, num_heads)
    return _run(q, k, v, key_padding_mask, attn_mask, scale, is_causal, return_lse, True,
                lambda s, c: torch.ops.vitfast.attention_packed_fwd(_unit_last(qkv), num_heads, key_padding_mask,
                                                                    attn_mask, s, c))


@fx_traceable
def attention_qkv(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
                  attn_mask: Tensor | None = None, scale: float | None = None, is_causal: bool = False,
                  return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over q, k, v in SDPA's layout [B, heads, N, d] (any strides); returns [B, heads, N, d].

    Same kernel, masks and conventions as :func:`attention` (nn.MultiheadAttention's: a bool
    ``attn_mask`` is True where attention is NOT allowed, the opposite of SDPA's).

    >>> q, k, v = torch.randn(3, 2, 12, 197, 64).unbind(0)
    >>> y = attention_qkv(q, k, v, is_causal=True)  # [2, 12, 197, 64]
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, tokens, head_dim], got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but q has shape {tuple(q.shape)}; they must match")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has dtype {q.dtype}; they must match")
    check_same_device(q=q, k=k, v=v)
    B, H, N, d = q.shape
    _check_common("q", q, B, N, H, d, key_padding_mask, attn_mask, scale)
    return _run(q, k, v, key_padding_mask, attn_mask, scale, is_causal, return_lse, False,
                lambda s, c: torch.ops.vitfast.attention_fwd(*(_unit_last(t) for t in (q, k, v)), key_padding_mask,
                                                             attn_mask, s, c, False))


def _check_common(name: str, x: Tensor, B: int, N: int, heads: int, d: int, key_padding_mask: Tensor | None,
                  attn_mask: Tensor | None, scale: float | None) -> None:
    """Checks both entries share: head size, masks against (B, N, heads), devices, scale."""
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head size of {name} must be between 1 and {MAX_HEAD_DIM}, got {d}")
    if key_padding_mask is not None:
        _check_mask("key_padding_mask", key_padding_mask, ((B, N),))
    if attn_mask is not None:
        _check_mask("attn_mask", attn_mask, ((N, N), (B * heads, N, N), *_broadcast_shapes(B, heads, N)),
                    f"{(N, N)}, {(B * heads, N, N)} or one broadcasting to {(B, heads, N, N)}")
    check_same_device(**{name: x}, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
    _check_scale(scale)
