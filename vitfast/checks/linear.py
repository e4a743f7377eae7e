from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.linear import linear, mlp
from . import Row, compare, guarded

_TORCH_ACT = {
    None: lambda t: t,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),  # OpenAI CLIP's QuickGELU
}


def _layer(x, w, b, act, r):
    """PyTorch's composite: nn.Linear, then the activation, then the residual add."""
    y = _TORCH_ACT[act](F.linear(x, w, b))
    return y if r is None else y + r


def _double(*ts):
    return [None if t is None else t.double() for t in ts]


def _label(act, fused: bool) -> str:
    return "linear" + (f"+{act}" if act else "") + ("+residual" if fused else "")


def _linear_case(m: int, k: int, n: int, act, fused: bool, dtype, device) -> Row:
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    b = torch.randn(n, device=device, dtype=dtype)
    r = torch.randn(m, n, device=device, dtype=dtype) if fused else None
    out = linear(x, w, b, activation=act, residual=r)
    return compare(_label(act, fused), f"[{m}, {k}]->{n}",
                   out, _layer(x, w, b, act, r), _layer(*_double(x, w, b), act, *_double(r)))


def _mlp_case(m: int, k: int, hidden: int, dtype, device) -> Row:
    x = torch.randn(m, k, device=device, dtype=dtype)
    w1 = torch.randn(hidden, k, device=device, dtype=dtype) / k**0.5
    b1 = torch.randn(hidden, device=device, dtype=dtype)
    w2 = torch.randn(k, hidden, device=device, dtype=dtype) / hidden**0.5
    b2 = torch.randn(k, device=device, dtype=dtype)
    r = torch.randn(m, k, device=device, dtype=dtype)

    def composite(x, w1, b1, w2, b2, r):
        return _layer(_layer(x, w1, b1, "gelu", None), w2, b2, None, r)

    out = mlp(x, w1, b1, w2, b2, "gelu", residual=r)
    return compare("mlp+gelu+residual", f"[{m}, {k}]->{hidden}->{k}", out,
                   composite(x, w1, b1, w2, b2, r), composite(*_double(x, w1, b1, w2, b2, r)))


def cases(device: torch.device, dtypes, small: bool):
    if small:
        linears = [(51, 100, 96, "gelu", True), (51, 100, 96, "gelu_tanh", False),
                   (51, 100, 96, "relu", True), (51, 100, 96, "quick_gelu", True), (51, 100, 96, None, False)]
        mlps = [(51, 64, 256)]
    else:
        m = 256 * 197
        linears = [(m, 768, 3072, "gelu", False), (m, 3072, 768, None, True), (m, 768, 2304, None, False)]
        mlps = [(m, 768, 3072), (m, 1024, 4096)]
    for dtype in dtypes:
        for m, k, n, act, fused in linears:
            yield guarded(_label(act, fused), f"[{m}, {k}]->{n}", dtype,
                          lambda: _linear_case(m, k, n, act, fused, dtype, device))
        for m, k, hidden in mlps:
            yield guarded("mlp", f"[{m}, {k}]->{hidden}->{k}", dtype, lambda: _mlp_case(m, k, hidden, dtype, device))
