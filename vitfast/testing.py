"""The three-way parity rule every vitfast test and ``python -m vitfast check`` use.

Compute the reference in float64 (``ref``), PyTorch in the test dtype (``pt``) and vitfast in the
test dtype (``out``). vitfast passes when ``max|out - ref| <= 2 * max|pt - ref| + atol`` and ``out``
holds no NaN: it may be no worse than twice PyTorch's own rounding error, plus a small floor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class Parity:
    max_err: float  # max |out - ref|
    pt_err: float  # max |pt - ref|
    bound: float  # 2 * pt_err + atol
    has_nan: bool

    @property
    def ok(self) -> bool:
        return not self.has_nan and self.max_err <= self.bound

    def __str__(self) -> str:
        return (f"max|out-ref|={self.max_err:.3g} bound={self.bound:.3g} "
                f"(max|pt-ref|={self.pt_err:.3g}){' NaN in output' if self.has_nan else ''}")


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double().to(a.device)).abs().max().item()


def parity(out: torch.Tensor, pt: torch.Tensor, ref: torch.Tensor, atol: float | None = None) -> Parity:
    """Measure ``out`` (vitfast) against ``ref`` (float64), PyTorch's own ``pt`` setting the bound."""
    if out.shape != ref.shape or pt.shape != ref.shape:
        raise ValueError(f"shapes differ: out {tuple(out.shape)}, pt {tuple(pt.shape)}, ref {tuple(ref.shape)}")
    if atol is None:
        atol = ATOL[pt.dtype] if pt.dtype in ATOL else ATOL[torch.float32]
    has_nan = bool(torch.isnan(out).any().item())
    # NaN in ref masks nothing here: a NaN reference is a broken test, so it counts as failure too.
    has_nan = has_nan or bool(torch.isnan(ref).any().item())
    pt_err = _max_abs_diff(pt, ref)
    err = _max_abs_diff(out, ref)
    if err != err:
        err = float("inf")
    return Parity(err, pt_err, 2 * pt_err + atol, has_nan)


def assert_parity(out, pt, ref, atol: float | None = None, what: str = "") -> Parity:
    """Assert the three-way rule on a tensor or on matching sequences of tensors."""
    if isinstance(out, (tuple, list)):
        if not (len(out) == len(pt) == len(ref)):
            raise AssertionError(f"{what}: output counts differ ({len(out)}, {len(pt)}, {len(ref)})")
        results = [assert_parity(o, p, r, atol, f"{what}[{i}]") for i, (o, p, r) in enumerate(zip(out, pt, ref))]
        return max(results, key=lambda r: r.max_err - r.bound)
    result = parity(out, pt, ref, atol)
    assert result.ok, f"{what or 'output'} fails the three-way bound: {result}"
    return result
