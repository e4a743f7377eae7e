"""The command line's options, the names they choose from, and the ``Config`` they resolve to."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from .. import reference

BASELINES = ("reference-eager", "timm-eager", "timm-compile")
IMPLEMENTATIONS = ("reference-eager", "timm-eager", "timm-compile", "vitfast", "vitfast-cudagraph")
COMPILE_MODES = ("max-autotune", "max-autotune-no-cudagraphs", "default")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class Config:
    device: torch.device
    models: list[str]
    batches: list[int]
    dtype: str
    img_size: int
    depth: int | None
    baselines: list[str]
    compile_mode: str
    quick: bool
    budget_s: float | None
    out: Path
    seed: int
    compile_on_cpu: bool
    train_batches: list[int] = dataclasses.field(default_factory=list)  # training-step rows, after the inference rows
    train_models: list[str] = dataclasses.field(default_factory=list)  # the models that get them


def _split(values: list[str] | None) -> list[str]:
    return [v for item in values or [] for v in item.split(",") if v]


def resolve(args: argparse.Namespace) -> Config:
    """Fill the defaults that depend on the device; reject bad names with the argument they came from."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: expected a machine with CUDA, got none")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    models = _split(args.model) or (["vit_base"] if cuda else ["vit_tiny"])
    for name in models:
        if name not in reference.CONFIGS:
            import timm

            if not timm.is_model(name):
                raise ValueError(f"--model: expected one of {sorted(reference.CONFIGS)} or a timm model name, "
                                 f"got {name!r}")
    baselines = _split(args.baselines) or list(BASELINES)
    for b in baselines:
        if b not in BASELINES:
            raise ValueError(f"--baselines: expected names from {list(BASELINES)}, got {b!r}")
    batches = _batches("--batch", args.batch) or ([128 if args.train else 256] if cuda else
                                                   [2] if args.quick else [1, 2])
    train_batches = _batches("--train-batch", args.train_batch)
    if args.train:  # training rows only, at --batch
        if train_batches:
            raise ValueError(f"--train-batch: adds training rows to an inference run; with --train give the "
                             f"training batch sizes to --batch, got --train-batch {train_batches}")
        batches, train_batches = [], batches
    train_models = _split(args.train_model) or models
    if not set(train_models) <= set(models):
        raise ValueError(f"--train-model: expected names given to --model ({models}), got {train_models}")
    depth = args.depth if args.depth is not None else (2 if args.quick and not cuda else None)
    return Config(device, models, batches, args.dtype or ("bf16" if cuda else "fp32"),
                  args.img_size or (224 if cuda else 32), depth, baselines,
                  args.compile_mode or ("default" if args.quick else "max-autotune"), args.quick, args.budget,
                  Path(args.out), args.seed, compile_on_cpu=bool(args.baselines) and "timm-compile" in baselines,
                  train_batches=train_batches, train_models=train_models if train_batches else [])


def _batches(flag: str, values: list[str] | None) -> list[int]:
    given = _split(values)
    if not all(b.isdigit() and int(b) > 0 for b in given):
        raise ValueError(f"{flag}: expected positive integers, got {given}")
    return [int(b) for b in given]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m vitfast bench`` (and ``python -m vitfast.bench``)."""
    parser.add_argument("--model", nargs="+", metavar="NAME",
                        help=f"{', '.join(reference.CONFIGS)} or a timm model name (random weights, no "
                             "download); default vit_base on a GPU, vit_tiny on the CPU")
    parser.add_argument("--batch", nargs="+", metavar="N", help="one or several batch sizes (default 256 on a GPU; "
                        "with --train, the training batch sizes, default 128 on a GPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="default bf16 on a GPU, fp32 on the CPU. Inference rows hold the model in this dtype; "
                             "training rows keep the parameters in fp32 and run under torch.autocast with this "
                             "dtype (fp32: no autocast)")
    parser.add_argument("--train", action="store_true",
                        help="time a training step instead of inference: forward, loss and backward under "
                             "torch.autocast, optimizer excluded, gradients set to None outside the timed region")
    parser.add_argument("--train-batch", nargs="+", metavar="N",
                        help="after each model's inference rows, also time its training step (as --train) at "
                             "these batch sizes, in the same result files")
    parser.add_argument("--train-model", nargs="+", metavar="NAME",
                        help="the models of --model that get training rows (default: all)")
    parser.add_argument("--img-size", type=int, help="default 224 on a GPU, 32 on the CPU")
    parser.add_argument("--depth", type=int, help="override the number of layers (default: the model's; 2 with "
                                                  "--quick on the CPU)")
    parser.add_argument("--baselines", nargs="+", metavar="NAME", help=f"any of {', '.join(BASELINES)} (default all; "
                        "on the CPU timm-compile runs only when named here)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES,
                        help="torch.compile mode of timm-compile (default max-autotune; default with --quick)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when there is one")
    parser.add_argument("--quick", action="store_true", help="short timing; on the CPU also 2 layers and batch 2")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="start no new measurement after this many seconds (the rest are recorded as skipped)")
    parser.add_argument("--out", default="bench-results", metavar="DIR", help="where JSON, CSV and PNG go")
    parser.add_argument("--seed", type=int, default=0)
