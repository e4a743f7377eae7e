from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from . import Row, compare, guarded


def _case(rows: int, width: int, dtype: torch.dtype, device: torch.device, fused: bool) -> Row:
    x = torch.randn(rows, width, device=device, dtype=dtype)
    r = torch.randn(rows, width, device=device, dtype=dtype) if fused else None
    w = torch.randn(width, device=device, dtype=dtype)
    b = torch.randn(width, device=device, dtype=dtype)
    xin = x + r if fused else x  # PyTorch's own sum in the test dtype
    pt = F.layer_norm(xin, (width,), w, b)
    xd = x.double() + r.double() if fused else x.double()
    ref = F.layer_norm(xd, (width,), w.double(), b.double())
    out = ops.layer_norm(x, w, b, residual=r)
    if fused:
        out, s = out
        return compare("layer_norm+residual", f"[{rows}, {width}]", (out, s), (pt, xin), (ref, xd))
    return compare("layer_norm", f"[{rows}, {width}]", out, pt, ref)


def cases(device: torch.device, dtypes, small: bool):
    shapes = [(17, 100), (65, 768)] if small else [(17, 100), (256 * 197, 768), (4096, 1024), (1000, 1280)]
    for dtype in dtypes:
        for rows, width in shapes:
            for fused in (False, True):
                yield guarded("layer_norm", f"[{rows}, {width}]", dtype,
                              lambda: _case(rows, width, dtype, device, fused))
