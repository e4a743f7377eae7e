from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.attention import attention
from . import Row, compare, guarded


def _case(B: int, heads: int, N: int, d: int, dtype: torch.dtype, device: torch.device, padded: bool) -> Row:
    qkv = torch.randn(B, N, 3 * heads * d, device=device, dtype=dtype)
    kpm = None
    if padded:  # nn.MultiheadAttention's key_padding_mask: True = ignore that key
        kpm = torch.zeros(B, N, dtype=torch.bool, device=device)
        kpm[1:, N // 2 + 1:] = True
    out = attention(qkv, heads, key_padding_mask=kpm)

    def sdpa(t: torch.Tensor) -> torch.Tensor:
        q, k, v = t.reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
        allowed = None if kpm is None else ~kpm[:, None, None, :]  # SDPA's bool: True = allowed
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2).flatten(2)

    op = "attention+key_padding" if padded else "attention"
    return compare(op, f"B={B} h={heads} N={N} d={d}", out, sdpa(qkv), sdpa(qkv.double()))


def cases(device: torch.device, dtypes, small: bool):
    shapes = [(2, 3, 65, 64), (2, 3, 17, 80)] if small else [(64, 12, 197, 64), (64, 16, 257, 80)]
    for dtype in dtypes:
        for B, heads, N, d in shapes:
            for padded in (False, True):
                yield guarded("attention", f"B={B} h={heads} N={N} d={d}", dtype,
                              lambda: _case(B, heads, N, d, dtype, device, padded))
