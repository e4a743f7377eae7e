"""vitfast: Vision Transformers on hand-written Triton kernels.

>>> import vitfast
>>> model = vitfast.optimize(model)          # the model you have, on fused kernels
>>> print(model.vitfast_report)              # what was swapped, and what was left alone and why
>>> vitfast.compile_ahead(model, x)          # optional: compile its kernels on every core first
"""
import importlib

from . import modules, ops, reference, runtime
from .compile_ahead import compile_ahead
from .convert import Report, optimize
from .modules import FastTransformerEncoder, FastTransformerEncoderLayer

__version__ = "0.1.0"


def __getattr__(name: str):
    # vitfast.tuning needs Triton; a machine without it still converts and runs models (on PyTorch).
    if name == "tuning":
        return importlib.import_module(".tuning", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FastTransformerEncoder", "FastTransformerEncoderLayer", "Report", "compile_ahead", "modules", "ops",
           "optimize", "reference", "runtime", "tuning", "__version__"]
