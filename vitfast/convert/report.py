"""What ``optimize`` swapped and what it left alone, with the reason."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from torch import nn

from ..modules._fused import Fused


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
        sites = self.gemm_sites()
        if sites:
            lines.append(f"  GEMM sites launched in this process: {len(sites)}")
            lines += [f"    {row['tactic']:<6} {row['key']}"
                      + (f" ({row['kernel']} {row['config']})" if "kernel" in row else "") for row in sites]
        routes = self.attention_routes()
        if routes:
            lines.append(f"  attention forwards launched in this process: {len(routes)}")
            lines += [f"    {row['kernel']} {row['key']} ({row['config']})"
                      + (f": {row['reason']}" if "reason" in row else "") for row in routes]
        return "\n".join(lines)

    @staticmethod
    def attention_routes() -> list[dict]:
        """The forward each attention launch key met so far in this process runs, one row per key
        (``kernels/attention.py``'s ``routes``): "attention_resident_fwd" (a head's K and V held on
        chip) or the general "attention_fwd" with the reason the resident kernel did not take it,
        each with its config. Empty where no attention was launched (nor Triton installed)."""
        attention = sys.modules.get("vitfast.kernels.attention")  # imported by the first launch
        return [] if attention is None else attention.routes()

    @staticmethod
    def gemm_sites() -> list[dict]:
        """The tactic each GEMM site launched so far in this process runs, one row per launch key
        (shape class and epilogue; ``kernels/gemm_tactic.py``): "fused" with its kernel and config, or
        "cublas" (cuBLAS for the product, the epilogue in a kernel of its own). Sites are shape classes,
        not modules: a ViT's twelve QKV projections share one row. Empty where no GEMM was launched
        (nor Triton installed)."""
        gemm_tactic = sys.modules.get("vitfast.kernels.gemm_tactic")  # imported by the first launch
        return [] if gemm_tactic is None else gemm_tactic.chosen()

    def counts(self) -> dict[str, int]:
        """Swapped modules per vitfast class."""
        out: dict[str, int] = {}
        for e in self.swapped:
            out[e.result] = out.get(e.result, 0) + 1
        return out


# What a module that computes attention or an MLP is called, by its class or where it sits. Only the
# report reads these names; conversion never does.
_ATTENTION = ("attention", "attn")
_MLP = ("mlp", "feedforward", "ffn", "glu")
_ATTENTION_SLOTS = ("attn", "self_attn", "attention", "self_attention", "cross_attn")
_MLP_SLOTS = ("mlp", "ffn", "feed_forward", "mlp_block", "intermediate")  # transformers 4: intermediate + output


def _computes(module: nn.Module, slot: str) -> str | None:
    """"attention" or "mlp" when ``module`` (held by its parent as ``slot``) looks like one: a module
    with parameters and submodules (a bare Linear named ``mlp`` is neither), or nn.MultiheadAttention."""
    if not isinstance(module, nn.MultiheadAttention) and not (module._modules and next(module.parameters(), None) is not None):
        return None
    name = type(module).__name__.lower()
    if isinstance(module, nn.MultiheadAttention) or slot in _ATTENTION_SLOTS or any(w in name for w in _ATTENTION):
        return "attention"
    if slot in _MLP_SLOTS or any(w in name for w in _MLP):
        return "mlp"
    return None


def _qualified(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def add_left_alone(model: nn.Module, report: Report) -> None:
    """List every module that computes attention or an MLP and stays on PyTorch: nothing at or above
    it runs on the kernels. A block holding both (its parent's attention and MLP) is listed once, as
    the block; modules a rule already reported (and those inside them) keep that rule's reason."""
    listed = {e.path for e in report.skipped} | {e.path for e in report.swapped}
    # Below a module a rule left alone (but the model itself), that rule's reason says it already.
    explained = tuple(f"{e.path}." for e in report.skipped if e.path)
    found: dict[str, nn.Module] = {}

    def visit(module: nn.Module, path: str) -> None:
        kinds = {}
        for slot, child in module._modules.items():
            if child is None or isinstance(child, Fused):
                continue
            child_path = f"{path}.{slot}" if path else slot
            kind = _computes(child, slot)
            if kind is None:
                visit(child, child_path)
            else:
                kinds[child_path] = (kind, child)
        if {k for k, _ in kinds.values()} == {"attention", "mlp"} and not isinstance(module, Fused):
            found.setdefault(path, module)
        else:
            for child_path, (_, child) in kinds.items():
                found.setdefault(child_path, child)

    if not isinstance(model, Fused):
        visit(model, "")
    for path, module in found.items():
        if path not in listed and not path.startswith(explained):
            report.skipped.append(Entry(path, _qualified(module), "no vitfast rule converts this class"))
