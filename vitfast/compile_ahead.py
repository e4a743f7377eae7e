"""Compile a model's kernels before its first call, on every core: ``vitfast.compile_ahead(model, x)``.

Triton compiles each kernel when a launch first needs it, one after the other. ``compile_ahead`` runs
the model once with every launch turned into a compile on a thread pool (no kernel runs; the pass's
results are meaningless and dropped) and waits for the compiles, so the model's next call with
inputs like these only launches. Opt-in: the first call compiles serially without it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .kernels import _precompile


def _first_float_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ()
    return next((t for t in map(_first_float_tensor, items) if t is not None), None)


def compile_ahead(model: nn.Module, *args: Any, backward: bool = False, workers: int | None = None,
                  **kwargs: Any) -> None:
    """Compile, on ``workers`` threads (default one per CPU), the kernels that ``model(*args, **kwargs)``
    launches, and with ``backward`` those of its backward too, without running any.

    The pass runs without touching the model: gradients are taken with ``torch.autograd.grad`` (no
    ``.grad`` changes), buffers are restored and the random number generators forked. It launches
    what a call in the same mode launches: call it in ``model.train()`` or ``eval()``, and under the
    ``torch.autocast`` the real calls use. Kernels are specialized on shapes, dtypes and alignment,
    so a call at another batch size may still compile a few.

    >>> model = vitfast.optimize(timm.create_model("vit_base_patch16_224")).cuda().eval()  # doctest: +SKIP
    >>> vitfast.compile_ahead(model, torch.randn(8, 3, 224, 224, device="cuda"))          # doctest: +SKIP
    >>> model(images)                        # launches, compiles nothing                   # doctest: +SKIP
    """
    buffers = [(b, b.clone()) for b in model.buffers()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), _precompile.compiling(workers):
        with torch.enable_grad() if backward else torch.no_grad():
            out = model(*args, **kwargs)
            loss = _first_float_tensor(out)
            params = [p for p in model.parameters() if p.requires_grad]
            if backward and loss is not None and loss.requires_grad and params:
                torch.autograd.grad(loss.float().sum(), params, allow_unused=True)
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
