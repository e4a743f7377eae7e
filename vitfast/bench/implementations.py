"""The implementations compared, one builder each: the call that is timed, and why one cannot run here."""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
from torch import nn

from .. import runtime
from .subjects import Subject


class Skip(Exception):
    """An implementation that cannot run here; its rows record the reason."""


@dataclasses.dataclass
class Impl:
    name: str
    label: str
    module: nn.Module  # whose parameters count towards peak memory
    prepare: Callable[[torch.Tensor], Callable[[], object]]  # per batch: the call that is timed
    setup_s: float = 0.0  # one-time build (weight copy, optimize, torch.compile wrapper)
    zero_grads: bool = False  # a training step: the module's gradients go to None before each timed call


def _eager(model: nn.Module) -> Callable[[torch.Tensor], Callable[[], object]]:
    return lambda x: (lambda: model(x))


def _reference_eager(s: Subject) -> Impl:
    if s.ref is None:
        raise Skip(f"{s.name} is a timm model; there is no reference ViT for it")
    return Impl("reference-eager", "reference-eager", s.ref, _eager(s.ref))


def _timm_eager(s: Subject) -> Impl:
    return Impl("timm-eager", "timm-eager", s.timm, _eager(s.timm))


def _timm_compile(s: Subject) -> Impl:
    if s.device.type == "cpu" and not s.compile_on_cpu:
        raise Skip("not run on CPU unless named in --baselines (inductor's CPU compile alone takes ~20 s)")
    torch._dynamo.reset()
    compiled = torch.compile(s.timm, mode=s.compile_mode, dynamic=False)
    return Impl("timm-compile", f"timm-compile ({s.compile_mode})", s.timm, _eager(compiled))


def _vitfast_model(s: Subject) -> nn.Module:
    """``vitfast.optimize`` on a deep copy, built once per subject and shared by both vitfast rows."""
    if s.vitfast_model is None and s.vitfast_skip is None:
        try:
            from ..convert import optimize
        except ImportError as e:  # the converter may not have landed in this checkout
            s.vitfast_skip = f"vitfast.optimize is not available ({type(e).__name__}: {e})"
        else:
            base = s.ref if s.ref is not None else s.timm
            s.vitfast_model = optimize(copy.deepcopy(base), inplace=True).train(s.training)
            report = getattr(s.vitfast_model, "vitfast_report", None)
            if report is not None:
                s.notes.append(f"vitfast.optimize swapped {len(report.swapped)} module(s), "
                               f"left {len(report.skipped)} alone")
    if s.vitfast_skip is not None:
        raise Skip(s.vitfast_skip)
    return s.vitfast_model


def _vitfast(s: Subject) -> Impl:
    model = _vitfast_model(s)
    if s.device.type == "cuda":
        return Impl("vitfast", "vitfast", model, _eager(model))

    def prepare(x: torch.Tensor) -> Callable[[], object]:
        def call() -> object:
            with runtime.fallback_only():  # never Triton's interpreter: its timings mean nothing
                return model(x)
        return call
    return Impl("vitfast", "vitfast (PyTorch fallback on CPU)", model, prepare)


def _vitfast_cudagraph(s: Subject) -> Impl:
    if s.device.type != "cuda":
        raise Skip("CUDA graphs need a GPU")
    if s.training:
        raise Skip("CUDA-graph replay is measured for inference only")
    model = _vitfast_model(s)

    def prepare(x: torch.Tensor) -> Callable[[], object]:
        static_x = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # JIT compile and autotune happen here, never during capture
            for _ in range(3):
                model(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(static_x)
        return graph.replay
    return Impl("vitfast-cudagraph", "vitfast-cudagraph", model, prepare)


BUILDERS: dict[str, Callable[[Subject], Impl]] = {
    "reference-eager": _reference_eager, "timm-eager": _timm_eager, "timm-compile": _timm_compile,
    "vitfast": _vitfast, "vitfast-cudagraph": _vitfast_cudagraph,
}
