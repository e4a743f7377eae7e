"""``python -m vitfast check``: every available kernel against its PyTorch reference.

Each module in this package defines ``cases(device, dtypes, small)``, yielding ``Row``s. A new op
adds its own module here; the runner finds it.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from ..testing import parity


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    max_err: float
    bound: float
    ok: bool
    note: str = ""


def compare(op: str, shape: str, out, pt, ref) -> Row:
    """One table row from the three-way rule (tuples compare element by element, worst kept)."""
    outs, pts, refs = (x if isinstance(x, (tuple, list)) else (x,) for x in (out, pt, ref))
    results = [parity(o, p, r) for o, p, r in zip(outs, pts, refs)]
    worst = max(results, key=lambda r: (not r.ok, r.max_err - r.bound))
    return Row(op, shape, str(pts[0].dtype).replace("torch.", ""), worst.max_err, worst.bound, worst.ok,
               "NaN" if worst.has_nan else "")


def guarded(op: str, shape: str, dtype: torch.dtype, fn: Callable[[], Row]) -> Row:
    """Run one case; an exception becomes a failing row instead of ending the whole check."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the table must show every failure
        return Row(op, shape, str(dtype).replace("torch.", ""), float("nan"), float("nan"), False,
                   f"{type(e).__name__}: {e}"[:120])


def collect(device: torch.device, dtypes: Iterable[torch.dtype], small: bool) -> Iterator[Row]:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        yield from module.cases(device, tuple(dtypes), small)


def format_table(rows: list[Row]) -> str:
    headers = ("op", "shape", "dtype", "max error", "bound", "ok")
    body = [(r.op, r.shape, r.dtype, f"{r.max_err:.2e}", f"{r.bound:.2e}",
             ("ok" if r.ok else "FAIL") + (f"  {r.note}" if r.note else "")) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(tuple("-" * w for w in widths)), *map(line, body)])
