"""Opt-in tuning: time each kernel's candidate configs at the shapes a model runs, keep the fastest.

Without tuning, every launch takes its config from a rule per GPU architecture and shape
(``vitfast.kernels._configs``): no time is spent choosing. Tuning measures instead, and saves what it
measured to a per-user file (``tuning_file()``) keyed by GPU name, Triton version and kernel source,
which every later process on that GPU reads on its first launch::

    import vitfast.tuning

    with vitfast.tuning.tune():     # needs a CUDA device
        model(x)                    # each launch key not yet measured: every candidate timed, the fastest kept
    # here the picks are saved; the model keeps them for the rest of the process

The command line does the same for the models of ``python -m vitfast bench``:
``python -m vitfast tune --model vit_base --batch 1 32 256 --dtype bf16 [--train]``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import torch

from .kernels import _select, _tuned

Timer = _select.Timer
Session = _select.Session
TuningFileWarning = _tuned.TuningFileWarning


def _do_bench(launch: Callable[[], None]) -> float:
    import triton.testing

    return triton.testing.do_bench(launch, return_mode="median")


@contextlib.contextmanager
def tune(timer: Timer | None = None) -> Iterator[Session]:
    """Measure every launch key met inside the block, and save the fastest config of each on exit.

    Each kernel launch whose key (kernel, shape class, dtypes, flags) this block has not measured
    runs every candidate config that fits it under ``timer`` (default: ``triton.testing.do_bench``'s
    median, which needs a CUDA device) and keeps the fastest, for the rest of the process and, on exit,
    in the tuned-picks file of each GPU involved (``session.written`` lists them). A candidate that
    does not fit the GPU is skipped. One session at a time per process, from one thread.

    >>> with vitfast.tuning.tune() as session:    # doctest: +SKIP
    ...     model(torch.randn(32, 3, 224, 224, device="cuda", dtype=torch.bfloat16))
    >>> session.written                           # doctest: +SKIP
    [PosixPath('/home/me/.cache/vitfast/tuning-nvidia-h100-80gb-hbm3.json')]
    """
    if timer is None:
        if not torch.cuda.is_available():
            raise RuntimeError("vitfast.tuning.tune: timing kernels needs a CUDA device and this machine has "
                               "none (torch.cuda.is_available() is False); pass timer= to time otherwise")
        timer = _do_bench
    session = _select.open_session(timer)
    try:
        yield session
    finally:
        _select.close_session(session)


def tuning_file(device: torch.device | int | None = None) -> Path:
    """The tuned-picks file that processes on CUDA ``device`` (default: the current one) read and that
    ``tune`` writes: ``$VITFAST_TUNING_FILE`` when set, else one per GPU name under
    ``$XDG_CACHE_HOME/vitfast`` (``~/.cache/vitfast``)."""
    return _tuned.default_path(torch.cuda.get_device_name(device))


def forget() -> None:
    """Forget every config chosen so far in this process and the tuned-picks file as read: the next
    launch of each key chooses again, reading the file anew (after ``VITFAST_TUNING_FILE`` changed,
    say)."""
    _select.reset()
