"""The attention kernels as ``torch.library`` custom ops, with their fake (meta) functions and autograd.

``vitfast::attention_fwd`` / ``attention_bwd`` take q, k, v apart ([B, H, N, d] views);
``vitfast::attention_packed_fwd`` / ``attention_packed_bwd`` take the packed [B, N, 3·H·d] in-projection
output whole, so the backward writes one packed gradient. ``ops/attention.py`` validates the arguments,
chooses between these ops and the PyTorch fallback, and draws the dropout seed: a custom op is a pure
function of its inputs, so the seed arrives as an input, is saved for the backward, and the backward
regenerates the forward's mask from it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import runtime
from . import _autocast as autocast
from ._dispatch import custom_op


def _heads(t: Tensor, heads: int) -> Tensor:
    """[B, H, N, d] view of a tokens-major [B, N, H·d] tensor (a [B, H, N, d] one passes through)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2) if t.dim() == 3 else t


def _split_packed(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, N, 3·H·d] -> three [B, H, N, d] views of the same storage; no data moves."""
    return qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


def _unit_last(t: Tensor) -> Tensor:
    """The kernels read rows through strides but need unit stride along the last dimension."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _kernel_rope(rope: Tensor | None, rope_prefix: int, rope_half: bool):
    """The rotary arguments as the kernels take them (``kernels.attention.Rope``), or None."""
    from ..kernels.attention import Rope

    return None if rope is None else Rope(rope, rope_prefix, rope_half)


def _forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
             scale: float, is_causal: bool, tokens_major: bool, rope: Tensor | None, rope_prefix: int,
             rope_half: bool, dropout_p: float, seed: Tensor | None) -> tuple[Tensor, Tensor]:
    from ..kernels.attention import attention_fwd

    B, H, N, d = q.shape
    shape = (B, N, H * d) if tokens_major else (B, H, N, d)  # tokens-major is ready for the out-projection
    out = runtime.empty(*shape, dtype=q.dtype, device=q.device)
    lse = runtime.empty(B, H, N, dtype=torch.float32, device=q.device)
    with runtime.launching(q.device, q.dtype):
        attention_fwd(q, k, v, _heads(out, H), lse, key_padding_mask, attn_mask, scale, is_causal,
                      _kernel_rope(rope, rope_prefix, rope_half), dropout_p=dropout_p, seed=seed)
    return out, lse


def _backward_into(dq: Tensor, dk: Tensor, dv: Tensor, dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
                   out: Tensor, lse: Tensor, dlse: Tensor | None, key_padding_mask: Tensor | None,
                   attn_mask: Tensor | None, scale: float, is_causal: bool, rope: Tensor | None,
                   rope_prefix: int, rope_half: bool, dropout_p: float, seed: Tensor | None) -> None:
    """Run the backward kernels, writing the [B, H, N_Q, d] view dq and the [B, H, N_KV, d] views dk, dv."""
    from ..kernels.attention import attention_bwd

    runtime.record_launch("attention_bwd", dout, q, k, v)
    H = q.shape[1]
    dlse = None if dlse is None else dlse.float().contiguous()
    with runtime.launching(q.device, q.dtype):
        attention_bwd(q, k, v, _heads(out, H), _unit_last(_heads(dout, H)), lse, dlse, dq, dk, dv,
                      key_padding_mask, attn_mask, scale, is_causal, _kernel_rope(rope, rope_prefix, rope_half),
                      dropout_p=dropout_p, seed=seed)


# Every op's schema ends in ``dropout_p`` and ``seed`` (the int64 Philox key of one element the public op
# drew; None when dropout_p = 0), defaults kept so that calls written before dropout still work.
@custom_op("vitfast::attention_fwd", mutates_args=())
def _attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
    scale: float, is_causal: bool, tokens_major: bool, rope: Optional[Tensor] = None, rope_prefix: int = 0,
    rope_half: bool = False, dropout_p: float = 0.0, seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Attention of [B, H, N_Q, d] q over [B, H, N_KV, d] k, v: out [B, N_Q, H·d] if tokens_major else
    [B, H, N_Q, d], and the fp32 log-sum-exp [B, H, N_Q] (undropped); q and k rotated by ``rope`` when
    given, probabilities dropped with ``dropout_p`` under the mask keyed by ``seed``."""
    return _forward(q, k, v, key_padding_mask, attn_mask, scale, is_causal, tokens_major, rope, rope_prefix,
                    rope_half, dropout_p, seed)


@_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, attn_mask, scale, is_causal, tokens_major, rope=None, rope_prefix=0,
      rope_half=False, dropout_p=0.0, seed=None):
    B, H, N, d = q.shape
    out = q.new_empty(B, N, H * d) if tokens_major else q.new_empty(B, H, N, d)
    return out, q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("vitfast::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor], scale: float, is_causal: bool,
    rope: Optional[Tensor] = None, rope_prefix: int = 0, rope_half: bool = False, dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``vitfast::attention_fwd`` wrt q, k, v: contiguous tensors of their shapes (a q
    broadcast over the batch gets its full-batch gradient; autograd sums it)."""
    dq, dk, dv = (runtime.empty(*t.shape, dtype=q.dtype, device=q.device) for t in (q, k, v))
    _backward_into(dq, dk, dv, dout, q, k, v, out, lse, dlse, key_padding_mask, attn_mask, scale, is_causal,
                   rope, rope_prefix, rope_half, dropout_p, seed)
    return dq, dk, dv


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, key_padding_mask, attn_mask, scale, is_causal, rope=None, rope_prefix=0,
      rope_half=False, dropout_p=0.0, seed=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@custom_op("vitfast::attention_packed_fwd", mutates_args=())
def _attention_packed_fwd(
    qkv: Tensor, num_heads: int, key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
    scale: float, is_causal: bool, rope: Optional[Tensor] = None, rope_prefix: int = 0, rope_half: bool = False,
    dropout_p: float = 0.0, seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Attention over the packed [B, N, 3·H·d] qkv (read in place): out [B, N, H·d] and the fp32
    log-sum-exp [B, H, N]. Taking qkv whole lets the backward write one packed gradient."""
    return _forward(*_split_packed(qkv, num_heads), key_padding_mask, attn_mask, scale, is_causal, True, rope,
                    rope_prefix, rope_half, dropout_p, seed)


@_attention_packed_fwd.register_fake
def _(qkv, num_heads, key_padding_mask, attn_mask, scale, is_causal, rope=None, rope_prefix=0, rope_half=False,
      dropout_p=0.0, seed=None):
    B, N, width = qkv.shape
    return qkv.new_empty(B, N, width // 3), qkv.new_empty(B, num_heads, N, dtype=torch.float32)


# Under autocast the operands take its dtype, as SDPA's; masks and the rotary table keep theirs (the
# kernels read them in fp32).
autocast.register("attention_fwd", cast_args=(0, 1, 2))
autocast.register("attention_packed_fwd", cast_args=(0,))


@torch.library.custom_op("vitfast::attention_packed_bwd", mutates_args=())
def _attention_packed_bwd(
    dout: Tensor, qkv: Tensor, num_heads: int, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor], scale: float, is_causal: bool,
    rope: Optional[Tensor] = None, rope_prefix: int = 0, rope_half: bool = False, dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
) -> Tensor:
    """Gradient of ``vitfast::attention_packed_fwd`` wrt qkv: one contiguous [B, N, 3·H·d] buffer
    that the kernels write through three strided views, so no stack or copy follows."""
    dqkv = runtime.empty(*qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _backward_into(*_split_packed(dqkv, num_heads), dout, *_split_packed(qkv, num_heads), out, lse, dlse,
                   key_padding_mask, attn_mask, scale, is_causal, rope, rope_prefix, rope_half, dropout_p, seed)
    return dqkv


@_attention_packed_bwd.register_fake
def _(dout, qkv, num_heads, out, lse, dlse, key_padding_mask, attn_mask, scale, is_causal, rope=None,
      rope_prefix=0, rope_half=False, dropout_p=0.0, seed=None):
    return qkv.new_empty(qkv.shape)


def _save(ctx, tensors: tuple[Tensor, ...], output: tuple[Tensor, Tensor], key_padding_mask: Tensor | None,
          attn_mask: Tensor | None, scale: float, is_causal: bool, rope: Tensor | None, rope_prefix: int,
          rope_half: bool, dropout_p: float, seed: Tensor | None) -> None:
    # The seed, not the mask, is what the backward needs: it regenerates the forward's mask.
    ctx.save_for_backward(*tensors, *output, key_padding_mask, attn_mask, rope, seed)
    ctx.scale, ctx.is_causal, ctx.rope_prefix, ctx.rope_half = scale, is_causal, rope_prefix, rope_half
    ctx.dropout_p = dropout_p
    # Usually only out reaches the loss: then no zero-filled lse gradient is made, nor read.
    ctx.set_materialize_grads(False)


# ``inputs`` holds every argument of the op's schema, defaults filled in.
def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, attn_mask, scale, is_causal, _, *rope_and_dropout = inputs
    _save(ctx, (q, k, v), output, key_padding_mask, attn_mask, scale, is_causal, *rope_and_dropout)


def _setup_packed_context(ctx, inputs, output) -> None:
    qkv, ctx.num_heads, key_padding_mask, attn_mask, scale, is_causal, *rope_and_dropout = inputs
    _save(ctx, (qkv,), output, key_padding_mask, attn_mask, scale, is_causal, *rope_and_dropout)


def _grad_of_output(dout: Tensor | None, out: Tensor) -> Tensor:
    return torch.zeros_like(out) if dout is None else dout


def _attention_backward(ctx, dout: Tensor | None, dlse: Tensor | None):
    q, k, v, out, lse, kpm, mask, rope, seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.vitfast.attention_bwd(_grad_of_output(dout, out), q, k, v, out, lse, dlse, kpm, mask,
                                                 ctx.scale, ctx.is_causal, rope, ctx.rope_prefix, ctx.rope_half,
                                                 ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


def _packed_backward(ctx, dout: Tensor | None, dlse: Tensor | None):
    qkv, out, lse, kpm, mask, rope, seed = ctx.saved_tensors
    dqkv = torch.ops.vitfast.attention_packed_bwd(_grad_of_output(dout, out), qkv, ctx.num_heads, out, lse, dlse,
                                                  kpm, mask, ctx.scale, ctx.is_causal, rope, ctx.rope_prefix,
                                                  ctx.rope_half, ctx.dropout_p, seed)
    return dqkv, None, None, None, None, None, None, None, None, None, None


# Gradients wrt the masks and the rotary table are not computed: ``_kernel_path`` sends one that
# needs a gradient to PyTorch.
torch.library.register_autograd("vitfast::attention_fwd", _attention_backward, setup_context=_setup_context)
torch.library.register_autograd("vitfast::attention_packed_fwd", _packed_backward,
                                setup_context=_setup_packed_context)
