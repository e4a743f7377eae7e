"""Host time of vitfast's GPU path, measured on a CPU: the instrument of issue 30.

    python benchmarks/host_time.py --json out.json                     # ViT-B/16, both models, batch 1, 32, 256
    python benchmarks/host_time.py --models reference --batches 1 --depth 1 --width 64 --heads 2 --img-size 32

The optimized ViT (timm's ``vit_base_patch16_224`` and ``vitfast.reference``'s, ``vitfast.optimize``d,
eval, bf16 parameters and images) runs on CPU tensors that stand in for CUDA tensors, through exactly the
code a GPU runs: vitfast's modules and ops, Triton's JIT (binder, specialization, cache), every kernel
compiled for sm_90 by Triton's NVIDIA backend and the wheel's ptxas, and Triton's launch path, with only
the driver stood in for (``vitfast.bench.host_driver``: its launcher counts and returns). Per model and
batch it reports:

* ``launches_per_forward``: kernel launches counted at the stand-in's launcher;
* ``host_us_per_forward``: median wall time of a compiled forward (``time.perf_counter_ns``, one intra-op
  thread, ``torch.inference_mode``) less the CPU arithmetic of the PyTorch operators left in the model,
  each replayed alone (``vitfast.bench.host_measure``; ``wall_us_per_forward`` and
  ``cpu_arithmetic_us_per_forward`` with its operators are kept), and ``host_us_per_launch``, that over
  the launches; ``host_cpu_us_per_forward``: the same from the thread's CPU time, which a busy machine's
  preemptions do not inflate (compare the two, and the load average recorded, before trusting either);
* ``settled_block_us``: the median host time of one call of the first transformer block alone, on the
  input it gets in the forward (``host_measure.call_us``): the part of a forward that repeats ``depth``
  times, with no PyTorch arithmetic to subtract around it, so the same at every batch when it is;
* ``processes``: those figures from each of ``--processes`` fresh processes (default 3), one after another;
  a row is the process whose host / eager ratio is the median (this shared machine's processes differ by
  up to 30% at the same code, where the medians within one process vary by a few percent);
* ``eager_host_us_per_forward``: PyTorch eager's host time for the same op graph, timed in the same rounds
  as each batch's forwards (``host_measure``: slow spells of this shared machine then move both, and
  ``host_over_eager`` holds): the same model class at the same depth and heads, width = heads, one patch
  per image, fp32, batch 1 (``vitfast.bench.host_models``: why those sizes, and why a batch-1 figure
  serves every batch);
* ``first_call_s_cold`` / ``first_call_s_warm``: the first forward of a fresh process, from just before
  the call to its end, with a private empty Triton cache (and cache home, where a tuning file would go),
  then again with both kept; ``first_call_compiles``: the variants the cold call compiled (new Triton cache
  entries), ``first_call_variants`` those it loaded; ``build_s``: model build, bf16 cast and optimize.

And, per kernel variant the forwards compiled, its static facts from the cubin (``cuobjdump``):
registers, spill stack, shared memory, config, wgmma and TMA. Every process runs the kernels' config
rules, as a GPU's first call does (``VITFAST_TUNING_FILE`` names a file that does not exist, so no tuning
file of this machine's user is read), without ``TRITON_INTERPRET``, and keeps freed CPU memory for reuse
as CUDA's caching allocator does (``host_measure.cache_freed_memory``: otherwise each activation above
32 MiB costs an mmap and a munmap).
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure the checkout this script sits in, not an installed vitfast
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels that this instrument compiles")
# The config rules, never a tuning file's picks (kernels/_tuned.py reads this when a kernel first runs).
os.environ["VITFAST_TUNING_FILE"] = str(Path(tempfile.mkdtemp(prefix="vitfast-host-time-")) / "none.json")

import torch  # noqa: E402

from vitfast.bench import host_driver, host_measure, host_models, kernel_facts  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _ints(text: str) -> list[int]:
    """A comma-separated list of positive integers (argparse names the option in its error)."""
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _models(text: str) -> list[str]:
    names = [v for v in text.split(",") if v]
    bad = [n for n in names if n not in host_models.MODELS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected names from {list(host_models.MODELS)}, got {text!r}")
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument("--models", type=_models, default=list(host_models.MODELS), help="timm,reference (default both)")
    p.add_argument("--batches", type=_ints, default=[1, 32, 256])
    p.add_argument("--first-call-batches", type=_ints, default=None,
                   help="batches whose first call is timed in fresh processes (default: --batches; '' for none)")
    p.add_argument("--repeats", type=int, default=50, help="timed forwards per model and batch (median)")
    p.add_argument("--eager-repeats", type=int, default=200, help="timed forwards of each eager twin (median)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--cprofile", type=int, default=0, metavar="N",
                   help="also print cProfile's busiest functions over N compiled forwards per model and batch")
    shape = host_models.Shape()
    for name in ("width", "depth", "heads", "img_size", "patch"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(shape, name))
    p.add_argument("--processes", type=int, default=3,
                   help="steady-state measurements, each in a fresh process; a row is the process whose host / "
                        "eager ratio is the median (on a shared machine processes differ by up to 30%%)")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "BATCH", "CACHE_DIR"), help=argparse.SUPPRESS)
    p.add_argument("--steady-child", action="store_true", help=argparse.SUPPRESS)
    return p


def _shape(args: argparse.Namespace) -> host_models.Shape:
    try:
        return host_models.Shape(args.width, args.depth, args.heads, args.img_size, args.patch)
    except ValueError as e:
        raise SystemExit(f"--width/--depth/--heads/--img-size/--patch: {e}")


def _cache_entries(path: Path) -> int:
    return sum(1 for _ in path.iterdir()) if path.is_dir() else 0


def first_call_child(args: argparse.Namespace) -> dict:
    """In a fresh process (``--child``): build, optimize, then time the first forward under the stand-in."""
    model_name, batch, cache_dir = args.child[0], int(args.child[1]), Path(args.child[2])
    torch.set_num_threads(1)
    host_measure.cache_freed_memory()
    start = time.perf_counter()
    model = host_models.optimized(model_name, _shape(args), DTYPES[args.dtype])
    x = host_models.images(_shape(args), batch, DTYPES[args.dtype])
    build_s = time.perf_counter() - start
    entries = _cache_entries(cache_dir)
    with host_driver.active() as drv, torch.inference_mode():
        start = time.perf_counter()
        model(x)
        first_s = time.perf_counter() - start
        return {"first_call_s": first_s, "build_s": build_s, "variants": len(drv.kernels),
                "compiles": _cache_entries(cache_dir) - entries, "benchmark_calls": drv.benchmark_calls}


def _child_json(args: argparse.Namespace, what: list[str], env_extra: dict[str, str], why: str) -> dict:
    """Run this script in a fresh process (``what``: its mode's arguments) and read the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]))
    argv = [sys.executable, str(Path(__file__).resolve()), *what, "--dtype", args.dtype,
            *(f"--{n}={getattr(args, n.replace('-', '_'))}" for n in ("width", "depth", "heads", "img-size", "patch"))]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{why} failed:\n{done.stdout}{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_child(args: argparse.Namespace, model: str, batch: int, home: Path) -> dict:
    """One fresh process whose Triton cache and cache home are ``home``'s (empty on the first call)."""
    return _child_json(args, ["--child", model, str(batch), str(home / "triton")],
                       {"TRITON_CACHE_DIR": str(home / "triton"), "XDG_CACHE_HOME": str(home / "xdg")},
                       f"first-call process for {model} at batch {batch}")


def steady_in_processes(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """``steady`` in ``--processes`` fresh processes, one after another: per model and batch the row of the
    process whose host / eager ratio is the median, with every process's figures under ``processes``."""
    if args.processes == 1 or args.cprofile:
        return steady(args)
    what = ["--steady-child", "--models", ",".join(args.models), "--batches", ",".join(map(str, args.batches)),
            "--repeats", str(args.repeats), "--eager-repeats", str(args.eager_repeats)]
    runs = [_child_json(args, what, {}, f"steady-state process {i + 1}") for i in range(args.processes)]
    rows = []
    for i in range(len(runs[0]["rows"])):
        each = [run["rows"][i] for run in runs]
        row = dict(sorted(each, key=lambda r: r["host_over_eager"])[len(each) // 2])
        row["processes"] = {k: [r[k] for r in each] for k in (
            "host_us_per_forward", "eager_host_us_per_forward", "host_over_eager", "host_cpu_over_eager_cpu",
            "settled_block_us")}
        rows.append(row)
    return rows, runs[0]["kernels"]


def first_calls(args: argparse.Namespace, batches: list[int]) -> dict[tuple[str, int], dict]:
    """Cold, then warm, first calls per model and batch, each in a fresh process."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="host-time-") as tmp:
        for model in args.models:
            for batch in batches:
                home = Path(tmp) / f"{model}-b{batch}"
                cold = _run_child(args, model, batch, home)
                warm = _run_child(args, model, batch, home)
                out[(model, batch)] = {
                    "first_call_s_cold": cold["first_call_s"], "first_call_s_warm": warm["first_call_s"],
                    "first_call_compiles": cold["compiles"], "first_call_variants": cold["variants"],
                    "first_call_compiles_warm": warm["compiles"], "first_call_benchmark_calls": cold["benchmark_calls"],
                    "build_s": cold["build_s"],
                }
                print(f"first call {model} batch {batch}: cold {cold['first_call_s']:.2f} s "
                      f"({cold['compiles']} compiles), warm {warm['first_call_s']:.2f} s", flush=True)
    return out


def steady(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Rows per model and batch, and the static facts of every variant those forwards loaded."""
    shape, dtype = _shape(args), DTYPES[args.dtype]
    rows = []
    with host_driver.active() as drv:
        for model_name in args.models:
            twin, tx = host_models.eager_twin(model_name, shape)
            model = host_models.optimized(model_name, shape, dtype)
            for batch in args.batches:
                row = host_measure.steady_state(model, host_models.images(shape, batch, dtype), drv, args.repeats,
                                                baseline=lambda: twin(tx), baseline_repeats=args.eager_repeats)
                row.update(model=model_name, batch=batch, settled_block_us=host_measure.call_us(
                    model, host_models.images(shape, batch, dtype), host_models.first_block(model_name, model)))
                rows.append(row)
                print(f"{model_name} batch {batch}: {row['launches_per_forward']} launches, "
                      f"{row['host_us_per_forward']:.0f} µs host per forward, eager "
                      f"{row['eager_host_us_per_forward']:.0f} µs", flush=True)
                if args.cprofile:
                    _print_profile(model, host_models.images(shape, batch, dtype), args.cprofile,
                                   f"{model_name} batch {batch}")
        facts = kernel_facts.static_facts(drv)
        variants = [kernel_facts.variant_id(k) for k in drv.kernels]
    for row in rows:
        by_variant: dict[str, int] = {}
        for i, n in row["launches_by_kernel"].items():
            by_variant[variants[i]] = by_variant.get(variants[i], 0) + n
        row["launches_by_kernel"] = by_variant
    for fact in facts:
        fact["launched_by"] = [f"{r['model']}@{r['batch']}" for r in rows if fact["variant"] in r["launches_by_kernel"]]
    return rows, facts


# Where a function's own time goes, by the path of its file (first match) or, for C functions, its name.
_AREAS = (("vitfast/ops/", "vitfast ops"), ("vitfast/modules/", "vitfast modules"),
          ("vitfast/convert/", "vitfast modules"), ("kernels/", "vitfast kernel launchers"),
          ("vitfast/bench/", "stand-in driver"), ("triton/runtime/autotuner", "Triton Autotuner.run"),
          ("triton/runtime/jit", "Triton JITFunction.run"), ("triton/", "Triton, other"),
          ("torch/_library/", "torch.library dispatch"), ("torch/_ops", "torch.library dispatch"),
          ("torch/_compile", "torch.library dispatch"), ("torch/_dynamo/", "torch.library dispatch"),
          ("torch/", "torch, other Python"))


def _area(path: str, name: str) -> str:
    if path == "~":  # a C function
        return ("aten and torch C calls" if "torch" in name else "Triton C calls" if "triton" in name
                else "Python builtins")
    return next((area for part, area in _AREAS if part in path), "other Python (models, stdlib)")


def _print_profile(model: torch.nn.Module, x: torch.Tensor, forwards: int, label: str) -> None:
    """cProfile over ``forwards`` compiled forwards: the self time by area, then the 25 functions with the
    most (the profiler's own cost inflates every call about twice; read the shares, not the µs)."""
    profiler = cProfile.Profile()
    with torch.inference_mode():
        model(x)
        profiler.enable()
        for _ in range(forwards):
            model(x)
        profiler.disable()
    stats = pstats.Stats(profiler)
    areas: dict[str, float] = {}
    for (path, _, name), (_, _, own, _, _) in stats.stats.items():
        areas[_area(path, name)] = areas.get(_area(path, name), 0.0) + own
    total = sum(areas.values())
    print(f"\n== cProfile, {label}, {forwards} forwards: self time by area")
    for area, own in sorted(areas.items(), key=lambda kv: -kv[1]):
        print(f"{100 * own / total:5.1f}%  {own / forwards * 1e6:8.0f} µs per forward  {area}")
    stats.sort_stats("tottime").print_stats(25)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> dict:
    import triton

    try:
        import timm
        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    return {"device_kind": "cpu", "cpu": _cpu_name(), "cpu_cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "triton": triton.__version__, "timm": timm_version,
            "date": datetime.date.today().isoformat(),
            "datetime": datetime.datetime.now().isoformat(timespec="seconds")}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(rows: list[dict], facts: list[dict]) -> None:
    print("\n| model | batch | launches | host µs / forward | µs / launch | eager µs | host / eager | "
          "each process | block µs | host CPU µs | eager CPU µs | CPU / CPU | arithmetic µs | first call cold s | "
          "warm s | compiles |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
          "| ---: |")
    for r in rows:
        each = " ".join(f"{v:.2f}" for v in r.get("processes", {}).get("host_over_eager", [])) or "-"
        print(f"| {r['model']} | {r['batch']} | {r['launches_per_forward']} | {r['host_us_per_forward']:,.0f} | "
              f"{_fmt(r['host_us_per_launch'], '.1f')} | {r['eager_host_us_per_forward']:,.0f} | "
              f"{r['host_over_eager']:.2f} | {each} | {r['settled_block_us']:.1f} | "
              f"{r['host_cpu_us_per_forward']:,.0f} | "
              f"{r['eager_host_cpu_us_per_forward']:,.0f} | {r['host_cpu_over_eager_cpu']:.2f} | "
              f"{r['cpu_arithmetic_us_per_forward']:,.0f} | {_fmt(r.get('first_call_s_cold'), '.1f')} | "
              f"{_fmt(r.get('first_call_s_warm'), '.2f')} | {r.get('first_call_compiles', '-')} |")
    print("\n| variant | flags | tile | warps | stages | regs | spill B | smem KiB | wgmma | TMA | sizes ÷16 | "
          "launched by |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |")  # smem: dynamic
    for f in facts:
        tile = "×".join(str(v) for k, v in f["tile"].items() if k != "GROUP_M") or "-"
        flags = ", ".join(f"{k}={v}" for k, v in f["constexprs"].items()
                          if k.isupper() and v not in (False, 0) and k != "INPUT_PRECISION")
        sizes = ", ".join(n for n in f["divisible_by_16"] if not n.startswith("stride"))
        print(f"| {f['variant']} | {flags} | {tile} | {f['num_warps']} | {f['num_stages']} | {f['registers']} | "
              f"{f['spilled_bytes']} | {f['dynamic_shared_bytes'] / 1024:.0f} | {'yes' if f['wgmma'] else 'no'} | "
              f"{'yes' if f['tma'] else 'no'} | {sizes or '-'} | "
              f"{', '.join(f['launched_by'])} |")


def _settings(args: argparse.Namespace, shape: host_models.Shape, cached: bool) -> dict:
    """What the figures were taken under, for the JSON."""
    return {
        "shape": dataclasses.asdict(shape) | {"tokens": shape.tokens}, "dtype": args.dtype, "repeats": args.repeats,
        "eager_repeats": args.eager_repeats, "steady_state_processes": 1 if args.cprofile else args.processes,
        "grad_mode": "torch.inference_mode", "intra_op_threads": 1,
        "configs": "the kernels' rules (no tuning file)", "target": "sm_90 (stand-in driver, H100 properties)",
        "cpu_allocator": ("glibc malloc keeps freed memory (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1), as "
                          "CUDA's caching allocator does" if cached else "the C library's default"),
        "eager_twin": "same model class, depth and heads; width = heads; one patch per image (2 tokens); fp32; "
                      "batch 1 (its figure stands for every batch); timed in the same rounds as each batch's forwards",
        "host_time": "median of a compiled forward (wall clock; thread CPU time for the *_cpu_* fields) less the "
                     "medians of the aten operators left in the model that do more than allocate or view, each "
                     "replayed alone on its forward's arguments; forwards, replays and the eager twin timed in "
                     f"{host_measure.ROUNDS} alternating rounds",
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        print(json.dumps(first_call_child(args)))
        return 0
    if args.repeats < 1 or args.eager_repeats < 1 or args.processes < 1:
        raise SystemExit("--repeats, --eager-repeats and --processes: expected positive integers")
    if not args.batches:
        raise SystemExit("--batches: expected at least one batch size")
    torch.set_num_threads(1)
    cached = host_measure.cache_freed_memory()
    if args.steady_child:
        rows, facts = steady(args)
        print(json.dumps({"rows": rows, "kernels": facts}))
        return 0
    shape = _shape(args)
    load_start = os.getloadavg()  # 1, 5 and 15 minutes: how busy this shared machine was around the run
    # First calls first, in fresh processes, while this one does nothing.
    first = first_calls(args, args.batches if args.first_call_batches is None else args.first_call_batches)
    rows, facts = steady_in_processes(args)
    for row in rows:
        row.update(first.get((row["model"], row["batch"]), {}))
    record = {**_machine(), "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "command": " ".join(["python benchmarks/host_time.py", *(sys.argv[1:] if argv is None else argv)]),
              **_settings(args, shape, cached), "rows": rows, "kernels": facts}
    print_tables(rows, facts)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
