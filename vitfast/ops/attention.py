"""``attention`` and ``attention_qkv``: softmax(scale · Q Kᵀ + masks) V in one fused kernel.

``attention`` is self-attention over the packed in-projection output; ``attention_qkv`` takes q, k
and v apart and lets the number of queries N_Q differ from the number of keys N_KV
(cross-attention; attention pooling, SigLIP's MAP head: 1..4 learned queries over every token,
the query broadcast over the batch with ``expand`` and read in place).

Mask convention (both entries): nn.MultiheadAttention's, not SDPA's.

* ``key_padding_mask`` [B, N_KV]: bool, True = ignore that key; or float, added to the scores.
* ``attn_mask`` [N_Q, N_KV], [B·heads, N_Q, N_KV] (batch-major, as nn.MultiheadAttention stacks it)
  or 4-D, broadcastable to [B, heads, N_Q, N_KV] (as Hugging Face passes it, [B, 1, N, N]): bool,
  True = NOT allowed (``F.scaled_dot_product_attention``'s bool mask means the opposite); or
  float, added to the scaled scores.
* ``is_causal``: query i attends to keys 0..i (SDPA's top-left alignment when N_Q != N_KV);
  combines with the masks.

A query row with no allowed key (every key masked) gives zeros, never NaN (recent SDPA agrees; older
PyTorch gave NaN), and its log-sum-exp is +inf. Masks are read in place through their strides, so
a mask broadcast with ``expand`` costs no memory.

Rotary position embedding (keyword-only, both entries, N_Q = N_KV), as timm's EVA02 and RoPE ViTs
apply it before attention: ``q = cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half)])``
and the same for k, with p = ``rope_prefix`` leading tokens (CLS, registers) left unrotated.

* ``rope``: timm's table, last dimension 2·d = [sin | cos], shape [N - p, 2d]
  (RotaryEmbeddingCat), [heads or 1, N - p, 2d] or [B or 1, heads or 1, N - p, 2d]
  (RotaryEmbeddingMixed, per head); any float dtype; read in place when its last stride is 1.
* ``rope_half``: pair column j with j ± d/2 (``rope_rotate_half``) rather than 2i with 2i + 1 (``rot``).

The kernels rotate q and k as they load them (no rotated copy is written), in fp32, rounded to q's
dtype as timm rounds it; the backward kernels return gradients with respect to q and k as stored.

Training: inputs that need gradients run FlashAttention-2 backward kernels from the saved fp32
log-sum-exp (``kernels/attention.py``), through ``torch.library`` custom ops, so autograd and
``torch.compile`` see them; ``attention`` returns the gradient of ``qkv`` as one packed buffer. The
kernels compute no gradient for a float mask or for the rotary table: one that needs a gradient
(timm's RotaryEmbeddingMixed learns its frequencies) takes the PyTorch path (warned once).

Dropout (keyword-only ``dropout_p``, both entries), as SDPA's ``dropout_p``: applied whenever > 0,
so modules pass 0 in eval. Each attention probability is dropped with probability p and the kept
ones scaled by 1/(1 − p); the log-sum-exp stays the undropped one. The kernels draw the mask from
Philox, keyed by one int64 seed the op draws from PyTorch's generator per call (``torch.manual_seed``
makes it reproducible) and counted by the element's (batch·head, query, key), so the backward
regenerates it and no mask is stored. p = 0 draws no seed (the generator does not advance) and
runs the kernels without dropout. The PyTorch path drops with SDPA's own dropout.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import runtime
from . import _autocast as autocast
from ._attention_ops import _attention_fwd as attention_fwd
from ._attention_ops import _attention_packed_fwd as attention_packed_fwd
from ._attention_ops import _split_packed, _unit_last
from ._dispatch import call, kernel_path
from ._random import check_dropout_p, draw_seed
from ._trace import fx_traceable
from ._validate import FLOAT_DTYPES, check_float, check_same_device, check_tensor

MAX_HEAD_DIM = 256


def _bias(q: Tensor, n_kv: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
          is_causal: bool) -> Tensor:
    """The masks as one additive bias broadcastable to [B, H, N_Q, N_KV], fp32 (float64 for float64
    q); -inf = not allowed. Causal is top-left, as SDPA's: query i sees keys 0..i."""
    B, H, N, _ = q.shape
    bias = torch.zeros(1, 1, N, n_kv, dtype=_stats_dtype(q), device=q.device)
    if is_causal:
        bias = torch.where(torch.ones(N, n_kv, dtype=torch.bool, device=q.device).triu(1), -math.inf, bias)
    masks = [] if attn_mask is None else [attn_mask.reshape(B, H, N, n_kv) if attn_mask.dim() == 3 else attn_mask]
    # 2-D and 4-D masks broadcast against [B, H, N_Q, N_KV] as they are.
    if key_padding_mask is not None:
        masks.append(key_padding_mask[:, None, None, :])
    for m in masks:
        bias = torch.where(m, -math.inf, bias) if m.dtype == torch.bool else bias + m.to(bias.dtype)
    return bias


def _stats_dtype(q: Tensor) -> torch.dtype:
    """Scores, masks and log-sum-exp on the PyTorch path: fp32, or float64 for float64 inputs."""
    return torch.promote_types(q.dtype, torch.float32)


def _fallback(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
              scale: float, is_causal: bool, return_lse: bool, dropout_p: float) -> tuple[Tensor, Tensor | None]:
    """SDPA of [B, H, N_Q, d] q over [B, H, N_KV, d] k, v with the masks converted to its convention
    and its own dropout; rows with no allowed key are zeroed (and unmasked before SDPA, so neither
    the output nor its gradient holds NaN); the log-sum-exp is the undropped one."""
    if key_padding_mask is None and attn_mask is None and not return_lse:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, dropout_p=dropout_p), None
    bias = _bias(q, k.shape[2], key_padding_mask, attn_mask, is_causal)
    dead = torch.isneginf(bias).all(-1, keepdim=True)
    bias = bias.masked_fill(dead, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale, dropout_p=dropout_p)
    out = out.masked_fill(dead, 0.0)
    if not return_lse:
        return out, None
    dt = _stats_dtype(q)
    scores = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale + bias
    lse = torch.logsumexp(scores, dim=-1).masked_fill(dead.squeeze(-1), math.inf)
    return out, lse


def _rotate(x: Tensor, rope: Tensor, rope_prefix: int, rope_half: bool) -> Tensor:
    """[B, H, N, d] ``x`` with the tokens after the first ``rope_prefix`` rotated by the [sin | cos]
    table, computed in the promoted dtype of x and the table and rounded to x's dtype (timm's
    ``apply_rot_embed_cat``); the PyTorch path's rotation, differentiable in x and the table."""
    sin, cos = rope.chunk(2, -1)
    body = x[:, :, rope_prefix:]
    if rope_half:  # column j pairs with j ± d/2
        first, second = body.chunk(2, -1)
        partner = torch.cat([-second, first], -1)
    else:  # column 2i pairs with 2i + 1
        partner = torch.stack([-body[..., 1::2], body[..., ::2]], -1).reshape(body.shape)
    rotated = (body * cos + partner * sin).to(x.dtype)
    return torch.cat([x[:, :, :rope_prefix], rotated], dim=2)


def _broadcast_shapes(B: int, heads: int, *tail: int) -> tuple[tuple[int, ...], ...]:
    """The 4-D shapes that broadcast to [B, heads, *tail] with ``tail`` in full."""
    return tuple((b, h, *tail) for b in dict.fromkeys((B, 1)) for h in dict.fromkeys((heads, 1)))


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


def _check_rope(x: Tensor, rope: Tensor | None, rope_prefix: object, rope_half: object, B: int, heads: int,
                n_q: int, n_kv: int, d: int) -> None:
    """The rotary arguments against q [B, heads, n_q, d] and keys [.., n_kv, d] (``x`` names the device)."""
    if isinstance(rope_prefix, bool) or not isinstance(rope_prefix, numbers.Integral):
        raise TypeError(f"rope_prefix must be an integer, got {rope_prefix!r}")
    if not isinstance(rope_half, (bool, np.bool_)):
        raise TypeError(f"rope_half must be a bool, got {rope_half!r}")
    if rope is None:
        return
    check_float("rope", rope)
    check_same_device(q=x, rope=rope)
    if n_q != n_kv:
        raise ValueError(f"rope needs as many queries as keys (self-attention), got {n_q} queries and {n_kv} keys")
    if d % 2:
        raise ValueError(f"rope needs an even head size (it rotates pairs of columns), got head size {d}")
    if not 0 <= rope_prefix <= n_q:
        raise ValueError(f"rope_prefix must be between 0 and the number of tokens ({n_q}), got {rope_prefix}")
    rows = n_q - int(rope_prefix)
    shapes = ((rows, 2 * d), *((h, rows, 2 * d) for h in dict.fromkeys((heads, 1))),
              *_broadcast_shapes(B, heads, rows, 2 * d))
    if tuple(rope.shape) not in shapes:
        raise ValueError(
            f"rope must have shape {(rows, 2 * d)} (tokens after rope_prefix = {n_q} - {rope_prefix}, "
            f"2 * head size for sin | cos), optionally led by {heads} heads or 1 and then {B} images or 1, "
            f"got {tuple(rope.shape)}")


def _kernel_path(q: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None, rope: Tensor | None) -> bool:
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
    if runtime.needs_autograd(rope):
        runtime.warn_once("attention:rope_grad", "vitfast.attention: the kernels do not compute gradients "
                          "with respect to the rotary table (rope); using PyTorch SDPA")
        return False
    return True


def _run(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
         scale: float | None, is_causal: bool, return_lse: bool, tokens_major: bool, rope: Tensor | None,
         rope_prefix: int, rope_half: bool, dropout_p: float, kernel: Callable[..., tuple[Tensor, Tensor]]):
    """Shared by both entries: q [B, H, N_Q, d], k and v [B, H, N_KV, d] views;
    ``kernel(scale, is_causal, rope, rope_prefix, rope_half, dropout_p, seed)`` runs the entry's
    custom op, else the fallback runs. The seed is drawn here, outside the custom op, once per call
    and only when dropping, so p = 0 leaves PyTorch's generator untouched."""
    B, H, N, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    is_causal, rope_prefix, rope_half = bool(is_causal), int(rope_prefix), bool(rope_half)
    if _kernel_path(q, key_padding_mask, attn_mask, rope):
        runtime.record_launch("attention", q, k, v)
        seed = draw_seed(q.device) if dropout_p > 0.0 else None
        out, lse = kernel(scale, is_causal, None if rope is None else _unit_last(rope), rope_prefix, rope_half,
                          dropout_p, seed)
    else:
        if rope is not None:
            q, k = (_rotate(t, rope, rope_prefix, rope_half) for t in (q, k))
        out, lse = _fallback(q, k, v, key_padding_mask, attn_mask, scale, is_causal, return_lse, dropout_p)
        if tokens_major:
            out = out.transpose(1, 2).reshape(B, N, H * d)
    return (out, lse) if return_lse else out


@fx_traceable
def attention(qkv: Tensor, num_heads: int, key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
              scale: float | None = None, is_causal: bool = False, return_lse: bool = False, *,
              rope: Tensor | None = None, rope_prefix: int = 0, rope_half: bool = False,
              dropout_p: float = 0.0) -> Tensor | tuple[Tensor, Tensor]:
    """Multi-head attention over the packed in-projection output ``qkv`` [B, N, 3·D].

    The last dimension holds q | k | v, each D = num_heads · d wide (nn.MultiheadAttention's
    ``in_proj`` and timm's ``qkv`` layout). ``qkv`` may have any strides (e.g. ``buf.transpose(0, 1)``
    of a sequence-first [N, B, 3D] buffer): the kernel reads it in place; only a last dimension
    without unit stride is copied. Returns a contiguous [B, N, D], heads side by side, ready for the
    out-projection; with ``return_lse`` also the fp32 natural-log log-sum-exp [B, heads, N] of each
    row's scaled, masked scores (+inf where a row has no allowed key; float64 for float64 inputs,
    which take PyTorch with one warning, as bfloat16 does on CPU tensors). ``scale`` defaults to 1/√d.
    Masks follow nn.MultiheadAttention (bool True = not allowed), see the module docstring.
    ``rope``, ``rope_prefix``, ``rope_half``: rotary position embedding of q and k, timm's
    (see the module docstring). ``dropout_p``: dropout on the attention probabilities, as SDPA's,
    applied whenever > 0 (pass 0 in eval); a fresh mask per call from PyTorch's generator.
    Under ``torch.autocast`` ``qkv`` is cast to the autocast dtype, as SDPA's inputs are, and so is
    the result; float masks and ``rope`` keep their dtype (read in fp32).

    >>> qkv = torch.randn(2, 197, 3 * 768)
    >>> y = attention(qkv, num_heads=12)  # [2, 197, 768]
    >>> pad = torch.zeros(2, 197, dtype=torch.bool); pad[1, 150:] = True
    >>> y = attention(qkv, 12, key_padding_mask=pad)
    >>> rope = torch.randn(196, 2 * 64)  # timm's RotaryEmbeddingCat.get_embed(): sin | cos per token
    >>> y = attention(qkv, 12, rope=rope, rope_prefix=1)  # the CLS token stays unrotated
    >>> y = attention(qkv, 12, dropout_p=0.1 if model.training else 0.0)
    """
    check_float("qkv", qkv)
    (qkv,) = autocast.operands(qkv.device, qkv)
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be 3-D [batch, tokens, 3 * embed_dim], got shape {tuple(qkv.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    num_heads = int(num_heads)  # a NumPy integer from a config file, say: the custom op takes int
    B, N, width = qkv.shape
    if width % (3 * num_heads) != 0:
        raise ValueError(f"qkv last dimension ({width}) must be divisible by 3 * num_heads "
                         f"(3 * {num_heads} = {3 * num_heads})")
    d = width // (3 * num_heads)
    _check_common("qkv", qkv, B, N, N, num_heads, d, key_padding_mask, attn_mask, scale)
    _check_rope(qkv, rope, rope_prefix, rope_half, B, num_heads, N, N, d)
    dropout_p = check_dropout_p("dropout_p", dropout_p)
    q, k, v = _split_packed(qkv, num_heads)
    return _run(q, k, v, key_padding_mask, attn_mask, scale, is_causal, return_lse, True, rope, rope_prefix,
                rope_half, dropout_p, lambda *a: call(attention_packed_fwd, _unit_last(qkv), num_heads,
                                                              key_padding_mask, attn_mask, *a))


@fx_traceable
def attention_qkv(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
                  attn_mask: Tensor | None = None, scale: float | None = None, is_causal: bool = False,
                  return_lse: bool = False, *, rope: Tensor | None = None, rope_prefix: int = 0,
                  rope_half: bool = False, dropout_p: float = 0.0) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of q [B, heads, N_Q, d] over k, v [B, heads, N_KV, d] in SDPA's layout (any strides;
    a q broadcast over the batch with ``expand`` is read in place); returns [B, heads, N_Q, d]
    (and the log-sum-exp [B, heads, N_Q] with ``return_lse``).

    Same kernel, masks and conventions as :func:`attention` (nn.MultiheadAttention's: a bool
    ``attn_mask`` is True where attention is NOT allowed, the opposite of SDPA's), with N_KV in
    place of N for keys: ``key_padding_mask`` [B, N_KV], ``attn_mask`` [N_Q, N_KV],
    [B·heads, N_Q, N_KV] or 4-D; ``is_causal`` is SDPA's top-left causality (query i sees keys
    0..i). ``rope`` needs N_Q = N_KV. ``dropout_p``: dropout on the attention probabilities, as
    SDPA's, applied whenever > 0 (pass 0 in eval).

    >>> q, k, v = torch.randn(3, 2, 12, 197, 64).unbind(0)
    >>> y = attention_qkv(q, k, v, is_causal=True)  # [2, 12, 197, 64]
    >>> probe = torch.randn(1, 12, 1, 64)  # attention pooling: one learned query per head
    >>> pooled = attention_qkv(probe.expand(2, -1, -1, -1), k, v)  # [2, 12, 1, 64]
    >>> y = attention_qkv(q, k, v, dropout_p=0.1)  # training: a fresh mask each call
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, tokens, head_dim], got shape {tuple(t.shape)}")
    q, k, v = autocast.operands(q.device, q, k, v)
    B, H, N_Q, d = q.shape
    N_KV = k.shape[2]
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, H, d):
        raise ValueError(f"k has shape {tuple(k.shape)} but q has shape {tuple(q.shape)}; they must match "
                         f"in batch, heads and head size (dimensions 0, 1 and 3)")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has shape {tuple(k.shape)}; they must match")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has dtype {q.dtype}; they must match")
    check_same_device(q=q, k=k, v=v)
    _check_common("q", q, B, N_Q, N_KV, H, d, key_padding_mask, attn_mask, scale)
    _check_rope(q, rope, rope_prefix, rope_half, B, H, N_Q, N_KV, d)
    dropout_p = check_dropout_p("dropout_p", dropout_p)
    return _run(q, k, v, key_padding_mask, attn_mask, scale, is_causal, return_lse, False, rope, rope_prefix,
                rope_half, dropout_p, lambda s, c, *r: call(
                    attention_fwd, *(_unit_last(t) for t in (q, k, v)), key_padding_mask, attn_mask, s, c, False, *r))


def _check_common(name: str, x: Tensor, B: int, n_q: int, n_kv: int, heads: int, d: int,
                  key_padding_mask: Tensor | None, attn_mask: Tensor | None, scale: float | None) -> None:
    """Checks both entries share: head size, masks against (B, n_q queries, n_kv keys, heads), devices, scale."""
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head size of {name} must be between 1 and {MAX_HEAD_DIM}, got {d}")
    if key_padding_mask is not None:
        _check_mask("key_padding_mask", key_padding_mask, ((B, n_kv),))
    if attn_mask is not None:
        _check_mask("attn_mask", attn_mask, ((n_q, n_kv), (B * heads, n_q, n_kv),
                                             *_broadcast_shapes(B, heads, n_q, n_kv)),
                    f"{(n_q, n_kv)}, {(B * heads, n_q, n_kv)} or one broadcasting to {(B, heads, n_q, n_kv)}")
    check_same_device(**{name: x}, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
    _check_scale(scale)
