"""The training-step rows: forward, loss and backward under ``torch.autocast``, optimizer excluded.

Parameters stay in fp32, as people train; ``--dtype`` is the autocast dtype (fp32: no autocast). Each
implementation's forward (the same call its inference row times) runs under autocast, a loss (the
mean of the logits in fp32, whose cost is nothing beside the model's) is taken, and ``backward``
fills the gradients; the gradients are set to None before each timed step, outside the timed region
(``Impl.zero_grads``). On the CPU the whole step, backward included, stays on the PyTorch fallback.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch

from .. import runtime
from .implementations import Impl
from .options import DTYPES
from .results import TRAIN_FLOPS_FACTOR


def autocast_dtype(dtype: str) -> str | None:
    """The autocast dtype of a training step in this run's dtype; None: fp32, no autocast."""
    return None if DTYPES[dtype] == torch.float32 else dtype


def train_info(dtype: str, batches: list[int], models: list[str]) -> dict:
    """The run-level ``train`` field of a result file that holds training rows."""
    cast = autocast_dtype(dtype)
    return {"models": models, "batch": batches, "param_dtype": "fp32", "autocast_dtype": cast,
            "flops_factor": TRAIN_FLOPS_FACTOR,
            "flops": f"forward + backward = {TRAIN_FLOPS_FACTOR} x the forward's counted FLOPs (the backward "
                     "computes the gradients of the activations and of the weights)",
            "step": (f"forward under torch.autocast({cast})" if cast else "forward in fp32 (no autocast)")
                    + ", the mean of the logits in fp32 as the loss, backward; optimizer excluded; gradients set "
                      "to None before each timed step, outside the timed region"}


def training_step(impl: Impl, device: torch.device, dtype: str) -> Impl:
    """``impl`` (built on a training subject) as a training step: forward under autocast, loss, backward."""
    cast = autocast_dtype(dtype)

    def prepare(x: torch.Tensor) -> Callable[[], object]:
        forward = impl.prepare(x)

        def step() -> None:
            with runtime.fallback_only() if device.type == "cpu" else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=DTYPES[cast]) if cast else contextlib.nullcontext():
                    loss = forward().float().mean()
                loss.backward()
        return step
    return dataclasses.replace(impl, prepare=prepare, zero_grads=True)
