"""What ``optimize`` swapped and what it left alone, with the reason."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Entry:
    path: str  # dotted module path ("" for the model itself)
    kind: str  # the original class, module.qualname
    result: str  # the vitfast class it became, or the reason it was left alone


@dataclass
class Report:
    """What ``optimize`` swapped and what it left alone, with the reason."""

    swapped: list[Entry] = field(default_factory=list)
    skipped: list[Entry] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"vitfast.optimize: {len(self.swapped)} module(s) swapped, {len(self.skipped)} left alone"]
        lines += [f"  swapped  {e.path or '(model)'}: {e.kind} -> {e.result}" for e in self.swapped]
        lines += [f"  left     {e.path or '(model)'}: {e.kind} ({e.result})" for e in self.skipped]
        return "\n".join(lines)

    def counts(self) -> dict[str, int]:
        """Swapped modules per vitfast class."""
        out: dict[str, int] = {}
        for e in self.swapped:
            out[e.result] = out.get(e.result, 0) + 1
        return out
