"""``python -m vitfast bench``: whole-model inference (and training-step) speed of vitfast against its baselines.

Every implementation runs in the same process, on the same input and the same parameter tensors:

* ``reference-eager``: ``vitfast.reference.VisionTransformer`` in eval under ``torch.inference_mode``,
  so ``nn.TransformerEncoder`` takes its own fused fast path;
* ``timm-eager``: timm's ``VisionTransformer`` (SDPA attention) holding the reference's weights, see
  ``timm_from_reference``. timm's ViT is pre-norm and the reference post-norm, so the two compute
  different functions from the same tensors: a speed comparison, not a parity check;
* ``timm-compile``: that timm model under ``torch.compile`` (``--compile-mode``, recorded);
* ``vitfast``: ``vitfast.optimize`` applied to a deep copy of the reference;
* ``vitfast-cudagraph``: that vitfast model replayed from a ``torch.cuda.CUDAGraph`` (CUDA only).

The run first measures the peaks it reports against (a large matmul, a large device-to-device
copy), then, per model and batch, the first call (compile, autotune, capture) apart from the
steady-state median. On CUDA the median comes from ``triton.testing.do_bench``. Without a GPU the
harness still runs, at the smallest size, timed with a host clock around synchronous CPU work; those
figures are labelled CPU figures everywhere and say nothing about kernel speed (the vitfast rows then
run the plain-PyTorch fallback, never Triton's interpreter).

With ``--train`` (training rows only) or ``--train-batch N`` (after the inference rows) the run also
times a training step of the same implementations, vitfast-cudagraph aside: fp32 parameters, forward
under ``torch.autocast`` in ``--dtype``, a loss, backward, no optimizer (``train``). Such a run marks
every row with its ``mode`` and ``autocast_dtype``, records the step in its ``train`` field and the
step's FLOPs (3x the forward's) per model as ``train_gflops_per_image``; speedups compare rows of one
mode only.

Where each part lives: ``flops`` (the FLOP count), ``timm_twin`` (the timm model holding the
reference's weights), ``options`` (names, command-line options, ``Config``), ``subjects`` (the models
under test), ``implementations`` (what is compared), ``measure`` (timer, peaks, one row), ``machine``
(GPU, driver, versions), ``results`` (rows, JSON, CSV, table), ``train`` (the training step), ``plot``
(the PNG), ``cli`` (the run).

>>> from vitfast import bench
>>> bench.main(["--quick", "--out", "/tmp/bq"])   # doctest: +SKIP
"""
from .cli import CPU_NOTE, main, run, run_from_args
from .flops import ViTShape, flops_per_image, shape_of
from .implementations import BUILDERS, Impl, Skip
from .machine import machine_info
from .measure import Timer, measure_peaks, measure_row
from .options import BASELINES, COMPILE_MODES, DTYPES, IMPLEMENTATIONS, Config, add_arguments, resolve
from .plot import write_plot
from .results import (MODE_INFERENCE, MODE_TRAIN, ROW_FIELDS, RUN_FIELDS, TRAIN_FLOPS_FACTOR, TRAIN_ROW_FIELDS,
                      blank_row, fill_derived, format_table, result_stem, row_mode, speedup_field, write_json_csv)
from .subjects import PRENORM_NOTE, TRAIN_NOTE, Subject, build_subject
from .timm_twin import timm_from_reference
from .train import autocast_dtype, train_info, training_step

__all__ = ["BASELINES", "BUILDERS", "COMPILE_MODES", "CPU_NOTE", "Config", "DTYPES", "IMPLEMENTATIONS", "Impl",
           "MODE_INFERENCE", "MODE_TRAIN", "PRENORM_NOTE", "ROW_FIELDS", "RUN_FIELDS", "Skip", "Subject",
           "TRAIN_FLOPS_FACTOR", "TRAIN_NOTE", "TRAIN_ROW_FIELDS", "Timer", "ViTShape", "add_arguments",
           "autocast_dtype", "blank_row", "build_subject", "fill_derived", "flops_per_image", "format_table",
           "machine_info", "main", "measure_peaks", "measure_row", "resolve", "result_stem", "row_mode", "run",
           "run_from_args", "shape_of", "speedup_field", "timm_from_reference", "train_info", "training_step",
           "write_json_csv", "write_plot"]
