"""``python -m vitfast tune``: measure the kernels' configs at the shapes of the bench's models and save
the fastest to this GPU's tuned-picks file.

Each model is built as ``python -m vitfast bench`` builds it (the reference ViTs by name, or a timm
model with random weights), optimized by vitfast, and run at each batch size inside
``vitfast.tuning.tune()``: inference in ``--dtype`` under ``torch.inference_mode``, or with
``--train`` the bench's training step (fp32 parameters, forward under autocast in ``--dtype``, a
loss, backward). Every launch key met is measured once, and later processes on this GPU take the
picks instead of the rules.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from . import reference, tuning
from .bench.implementations import BUILDERS
from .bench.options import DTYPES, Config
from .bench.subjects import build_subject
from .bench.train import training_step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", default=["vit_base"], metavar="NAME",
                        help=f"{', '.join(reference.CONFIGS)} or a timm model name (default vit_base)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32, 256], metavar="N",
                        help="batch sizes (default 1 32 256)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="the model's dtype, or with --train the autocast dtype (default bf16)")
    parser.add_argument("--train", action="store_true",
                        help="tune the training step's kernels (forward and backward) instead of inference")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--depth", type=int, help="override the number of layers (the keys do not depend on it)")


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("python -m vitfast tune: timing kernels needs a CUDA device and this machine has none")
    if any(b < 1 for b in args.batch):
        raise SystemExit(f"python -m vitfast tune: --batch takes positive integers, got {args.batch}")
    device = torch.device("cuda")
    cfg = Config(device=device, models=args.model, batches=args.batch, dtype=args.dtype, img_size=args.img_size,
                 depth=args.depth, baselines=[], compile_mode="default", quick=False, budget_s=None,
                 out=Path("."), seed=0, compile_on_cpu=False)
    print(f"vitfast tune on {torch.cuda.get_device_name()}: {', '.join(args.model)}, batch {args.batch}, "
          f"{args.dtype}{', training step' if args.train else ''}", flush=True)
    with tuning.tune() as session:
        for name in args.model:
            impl = BUILDERS["vitfast"](build_subject(name, cfg, training=args.train))
            if args.train:
                impl = training_step(impl, device, args.dtype)
            for batch in args.batch:
                start, keys = time.perf_counter(), len(session.measured)
                x = torch.randn(batch, 3, args.img_size, args.img_size, device=device,
                                dtype=torch.float32 if args.train else DTYPES[args.dtype])
                with torch.enable_grad() if args.train else torch.inference_mode():
                    impl.prepare(x)()
                torch.cuda.synchronize()
                print(f"  {name} batch {batch}: {len(session.measured) - keys} launch keys measured in "
                      f"{time.perf_counter() - start:.1f} s", flush=True)
    print(f"saved {len(session.measured)} picks to {', '.join(map(str, session.written)) or 'no file'}")
    return 0
