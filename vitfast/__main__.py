"""Command line: ``python -m vitfast check``, ``bench``, ``tune`` and ``train-check``."""
from __future__ import annotations

import argparse
import os
import sys


def _prepare_device() -> str:
    """Pick the device; without CUDA, run the kernels in Triton's interpreter (set before import)."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"
    return "cpu"


def _check(args: argparse.Namespace) -> int:
    device = _prepare_device()
    import torch

    from . import runtime
    from .checks import collect, format_table

    torch.manual_seed(args.seed)
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    small = device != "cuda" or args.quick
    print(f"vitfast check on {device} ({runtime.backend_name(device)}), "
          f"torch {torch.__version__}" + (", interpreter sizes" if small else ""), flush=True)
    rows = []
    for row in collect(torch.device(device), dtypes, small):
        rows.append(row)
        if args.verbose:
            print(f"  {row.op} {row.shape} {row.dtype}: {'ok' if row.ok else 'FAIL'}", flush=True)
    print(format_table(rows))
    failed = sum(not r.ok for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 0 if rows and not failed else 1


def _bench(args: argparse.Namespace) -> int:
    # Unlike check, bench never turns Triton's interpreter on: its timings would mean nothing.
    from . import bench

    return bench.run_from_args(args, args.parser)


def _tune(args: argparse.Namespace) -> int:
    from . import tune_cli

    return tune_cli.main(args)


def _train_check(args: argparse.Namespace) -> int:
    _prepare_device()
    from . import train_check

    return train_check.main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="run every kernel against its PyTorch reference and print a table")
    check.add_argument("--quick", action="store_true", help="small shapes even on a GPU")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("-v", "--verbose", action="store_true", help="print each case as it finishes")
    check.set_defaults(func=_check)
    from .bench import add_arguments

    bench = sub.add_parser("bench", help="whole-model speed of vitfast against its baselines; JSON, CSV and PNG")
    add_arguments(bench)
    bench.set_defaults(func=_bench, parser=bench)
    from .tune_cli import add_arguments as tune_arguments

    tune = sub.add_parser("tune", help="time each kernel's candidate configs at a model's shapes (needs a GPU); "
                                       "later processes take the fastest instead of the rules")
    tune_arguments(tune)
    tune.set_defaults(func=_tune)
    from .train_check import add_arguments as train_check_arguments

    tc = sub.add_parser("train-check", help="fine-tune a small ViT with PyTorch and with vitfast; compare the losses")
    train_check_arguments(tc)
    tc.set_defaults(func=_train_check)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
