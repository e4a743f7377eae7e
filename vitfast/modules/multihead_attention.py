"""``MultiheadAttention``: ``nn.MultiheadAttention`` self-attention on vitfast's fused ops."""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ..ops.attention import attention
from ..ops.linear import linear
from ._block import linear_params, param
from ._block_checks import dtype_fits
from ._drops import live
from ._fused import Fused, Unfusable
from ._share import share_as

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OUT_PROJ = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def unsupported_reason(mha: nn.MultiheadAttention) -> str | None:
    """Why vitfast cannot run this ``nn.MultiheadAttention``'s configuration, or None when it can
    (the head size aside: an untiled one runs the op's PyTorch fallback, with one warning)."""
    if type(mha.out_proj) not in _OUT_PROJ:
        return f"out_proj is a {type(mha.out_proj).__name__}, not nn.Linear"
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        return "separate kdim/vdim projections (q_proj_weight, k_proj_weight, v_proj_weight)"
    if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
        return "add_bias_kv or add_zero_attn"
    return None


def _takes_native_path(mha: nn.MultiheadAttention, query: Tensor) -> bool:
    """Whether ``nn.MultiheadAttention.forward`` runs ``torch._native_multi_head_attention`` for a
    batched self-attention call with bool (or no) masks: its conditions, less those the fused path
    requires anyway. That path applies ``attn_mask`` and ignores ``is_causal``."""
    from torch.nn.modules import activation as torch_mha  # its private checks, as it calls them

    tensors = (query, query, query, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias)
    return (torch.backends.mha.get_fastpath_enabled() and not mha.training and mha.num_heads % 2 == 0
            and mha.batch_first and mha.in_proj_bias is not None and not torch.is_autocast_enabled()
            and not torch.overrides.has_torch_function(tensors) and all(map(torch_mha._check_arg_device, tensors))
            and not (torch.is_grad_enabled() and any(map(torch_mha._arg_requires_grad, tensors)))
            and not torch_mha._is_make_fx_tracing())


def _masks_reason(x: Tensor, heads: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None) -> str | None:
    """Why the masks of a [B, N, D] self-attention call are not ones PyTorch takes and the kernel reads
    as PyTorch does, or None. Float masks are added to the scores, bool ones are True where masked;
    PyTorch merges them (bools becoming the query's dtype) and its attention takes the merged mask
    only in fp32 or the query's dtype."""
    B, N = x.shape[:2]
    for name, m, shapes in (("key_padding_mask", key_padding_mask, ((B, N),)),
                            ("attn_mask", attn_mask, ((N, N), (B * heads, N, N)))):
        if m is not None and (tuple(m.shape) not in shapes or m.device != x.device):
            return f"{name} of shape {tuple(m.shape)} on {m.device} does not fit the input"
    dtypes = [x.dtype if m.dtype == torch.bool else m.dtype for m in (key_padding_mask, attn_mask) if m is not None]
    merged = functools.reduce(torch.promote_types, dtypes) if dtypes else x.dtype
    if merged not in (torch.float32, x.dtype):
        return f"the masks merge to {merged}, which PyTorch's attention does not take with {x.dtype} queries"
    return None


def _input_reason(mha: nn.MultiheadAttention, x: Tensor) -> str | None:
    if x.dtype not in _KERNEL_DTYPES:
        return f"{x.dtype} input"
    if x.shape[-1] != mha.embed_dim:
        return f"input width {x.shape[-1]} is not embed_dim {mha.embed_dim}"
    for name, t in (("in_proj_weight", param(mha, "in_proj_weight")), ("in_proj_bias", param(mha, "in_proj_bias")),
                    *zip(("out_proj.weight", "out_proj.bias"), linear_params(mha.out_proj))):
        if t is not None and (not dtype_fits(t, x) or t.device != x.device):
            return f"{name} is {t.dtype} on {t.device}; the input is {x.dtype} on {x.device}"
    return None


class MultiheadAttention(Fused, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose self-attention runs on vitfast's fused ops: the packed
    in-projection, the attention kernel (masks read in place), the out-projection.

    Same constructor, parameters and ``state_dict``; PyTorch's meaning for ``batch_first`` (the
    output is contiguous: [N, B, D] sequence-first as PyTorch returns it, [B, N, D] batch-first as its
    native path returns it; its other path returns a transposed view), ``key_padding_mask``
    [B, N] and ``attn_mask`` [N, N] or [B·heads, N, N] (bool: True = masked; float: added), and
    ``is_causal`` (a hint that needs ``attn_mask``: where PyTorch's own code then drops the mask for
    its causal path, so does vitfast). Returns ``(output, None)``. It runs PyTorch's own forward, as
    it is, for what it does not compute: attention weights (``need_weights=True``, the default),
    cross-attention (query, key and value not one tensor), unbatched or nested inputs. In
    training, ``dropout`` drops attention probabilities inside the attention kernel. A query row
    whose keys are all masked yields zeros.

    >>> mha = MultiheadAttention(768, 12, batch_first=True)
    >>> y, _ = mha(x, x, x, need_weights=False)
    >>> fast = MultiheadAttention.from_torch(torch_mha)  # shares torch_mha's weights
    """

    _vitfast_original = nn.MultiheadAttention

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiheadAttention:
        """A vitfast MultiheadAttention sharing ``mha``'s parameters (no copy)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        return share_as(mha, cls)

    def _vitfast_unsupported(self) -> str | None:
        return unsupported_reason(self)

    def _vitfast_switches(self) -> tuple:
        return torch.backends.mha.get_fastpath_enabled(), torch.is_autocast_enabled()  # _takes_native_path's

    def _vitfast_declines(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                          need_weights: bool = True, attn_mask: Tensor | None = None,
                          average_attn_weights: bool = True, is_causal: bool = False) -> bool:
        # A causal hint without a mask: PyTorch raises, or ignores it on its native path.
        return (bool(need_weights) or query is not key or key is not value or not isinstance(query, Tensor)
                or query.is_nested or query.dim() != 3 or (bool(is_causal) and attn_mask is None))

    def _fused_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                       need_weights: bool = True, attn_mask: Tensor | None = None,
                       average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, None]:
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and m.dtype != torch.bool and not m.is_floating_point():
                raise Unfusable(f"{name} is {m.dtype}")  # PyTorch raises its own error
        causal = False
        if is_causal and key_padding_mask is None and attn_mask.dim() in (2, 3) and not (
                attn_mask.dtype == torch.bool and _takes_native_path(self, query)):
            # F.multi_head_attention_forward drops the mask (checking only its rank) and runs SDPA's causal
            # path: the hint stands for the mask.
            attn_mask, causal = None, True
        x = query if self.batch_first else query.transpose(0, 1)  # [B, N, D]
        reason = _input_reason(self, x) or _masks_reason(x, self.num_heads, key_padding_mask, attn_mask)
        if reason is not None:
            raise Unfusable(reason)
        qkv = linear(query, param(self, "in_proj_weight"), param(self, "in_proj_bias"))
        a = attention(qkv if self.batch_first else qkv.transpose(0, 1), self.num_heads,
                      key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=causal,
                      dropout_p=live(self, self.dropout))  # [B, N, D]
        out = linear(a if self.batch_first else a.transpose(0, 1), *linear_params(self._modules["out_proj"]))
        return out, None
