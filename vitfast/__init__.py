"""vitfast: Vision Transformers on hand-written Triton kernels.

>>> import vitfast
>>> model = vitfast.optimize(model)          # the model you have, on fused kernels
>>> print(model.vitfast_report)              # what was swapped, and what was left alone and why
>>> vitfast.compile_ahead(model, x)          # optional: compile its kernels on every core first
"""
from . import modules, ops, reference, runtime, tuning
from .compile_ahead import compile_ahead
from .convert import Report, optimize
from .modules import FastTransformerEncoder, FastTransformerEncoderLayer

__version__ = "0.1.0"
__all__ = ["FastTransformerEncoder", "FastTransformerEncoderLayer", "Report", "compile_ahead", "modules", "ops",
           "optimize", "reference", "runtime", "tuning", "__version__"]
