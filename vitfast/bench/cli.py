"""``python -m vitfast bench``: whole-model inference speed of vitfast against its baselines.

The run behind the command: peaks first, then per model its inference rows and, with ``--train`` or
``--train-batch``, its training-step rows, one measured row per implementation and batch, the result
files rewritten after every row, and a table per model and mode at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
import time
from pathlib import Path

import torch

from .flops import flops_per_image, shape_of
from .implementations import BUILDERS, Impl, Skip
from .machine import machine_info
from .measure import Timer, measure_peaks, measure_row, release_memory
from .options import BASELINES, DTYPES, IMPLEMENTATIONS, Config, add_arguments, resolve
from .plot import write_plot
from .results import (MODE_INFERENCE, MODE_TRAIN, TRAIN_FLOPS_FACTOR, blank_row, fill_derived, format_table, row_mode,
                      write_json_csv)
from .subjects import Subject, build_subject
from .train import autocast_dtype, train_info, training_step

CPU_NOTE = "no GPU: CPU figures, harness smoke only"


@dataclasses.dataclass
class _Run:
    """What every pass of a run shares: its settings, timer, clock, record and FLOP counts."""

    cfg: Config
    timer: Timer
    start: float
    record: dict
    flops: dict[str, int | None] = dataclasses.field(default_factory=dict)

    def save(self) -> tuple[Path, Path]:  # after every row, so a run cut short still leaves its results
        fill_derived(self.record["rows"], self.flops, self.record["peak"]["matmul_tflops"], self.cfg.baselines)
        return write_json_csv(self.record, self.cfg.out)

    def row(self, model: str, impl: str, label: str, batch: int, mode: str, *status: str) -> dict:
        row = blank_row(model, impl, label, batch, *status)
        if "train" in self.record:  # runs with training rows say of every row which it is
            row.update(mode=mode, autocast_dtype=autocast_dtype(self.cfg.dtype) if mode == MODE_TRAIN else None)
        return row


def _model_info(run: _Run, name: str, subject: Subject) -> None:
    """The model's shape, FLOPs and notes in the record (once per model; a second pass adds its notes)."""
    info = run.record["models"].get(name)
    if info is None:
        try:
            shape = shape_of(subject.ref if subject.ref is not None else subject.timm)
        except ValueError as e:
            shape, run.flops[name] = None, None
            subject.notes.append(f"FLOPs not counted ({e}): no TFLOP/s or fraction of peak")
        else:
            run.flops[name] = flops_per_image(shape)
        info = run.record["models"][name] = {"shape": shape and dataclasses.asdict(shape),
                                             "gflops_per_image": run.flops[name] and run.flops[name] / 1e9,
                                             "notes": []}
        print(f"[{name}] " + (f"{shape.depth} layers, width {shape.embed_dim}, {shape.tokens} tokens, "
                              f"{run.flops[name] / 1e9:.2f} GFLOP/image" if shape else subject.notes[-1]), flush=True)
    if subject.training:
        info["train_gflops_per_image"] = info["gflops_per_image"] and TRAIN_FLOPS_FACTOR * info["gflops_per_image"]
    _add_notes(run, name, subject)


def _add_notes(run: _Run, name: str, subject: Subject) -> None:
    """The subject's notes not yet in the record (building an implementation can add one)."""
    notes = run.record["models"][name]["notes"]
    notes += [n for n in subject.notes if n not in notes]


def _measure(run: _Run, impl: Impl, batch: int, training: bool) -> dict:
    cfg = run.cfg
    dtype = torch.float32 if training else DTYPES[cfg.dtype]
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=cfg.device, dtype=dtype)
    with torch.enable_grad() if training else torch.inference_mode():
        return measure_row(impl, x, run.timer)


# Row fields -> (kernels module, its record of what each launch key ran, the function listing it).
_RECORDS = {"gemm_sites": ("vitfast.kernels.gemm_tactic", "ran", "chosen"),
            "attention_routes": ("vitfast.kernels.attention", "ran", "routes")}


def _launch_records(clear: bool = False) -> dict:
    """What the kernels recorded about the launches since the last clear: the tactic of each GEMM site
    and the forward of each attention key, from modules imported by a launch (none without Triton)."""
    out = {}
    for field, (module, record, listing) in _RECORDS.items():
        kernels = sys.modules.get(module)
        if kernels is None:
            continue
        if clear:
            getattr(kernels, record).clear()
        elif getattr(kernels, record):
            out[field] = getattr(kernels, listing)()
    return out


def _model_pass(run: _Run, name: str, mode: str, batches: list[int], impls: list[str]) -> int:
    """One model's rows in one mode, every implementation at every batch; the number of failed rows."""
    cfg, training = run.cfg, mode == MODE_TRAIN
    tag = f"{mode} " if training else ""  # the inference lines read as they always have
    try:
        subject = build_subject(name, cfg, training=training)
    except Exception as e:  # noqa: BLE001 - e.g. a timm model that takes no img_size; the others still run
        reason = f"could not build {name}: {type(e).__name__}: {e}"[:300]
        print(f"[{name}] {tag}{reason}", flush=True)
        run.flops.setdefault(name, None)
        info = run.record["models"].setdefault(name, {"shape": None, "gflops_per_image": None, "notes": []})
        info["notes"].append(reason)
        run.record["rows"] += [run.row(name, i, i, b, mode, "failed", reason) for i in impls for b in batches]
        run.save()
        return 1
    _model_info(run, name, subject)
    failed = 0
    for impl_name in impls:
        try:
            t0 = time.perf_counter()
            impl = BUILDERS[impl_name](subject)
            impl = training_step(impl, cfg.device, cfg.dtype) if training else impl
            impl.setup_s = time.perf_counter() - t0
            _add_notes(run, name, subject)
        except Skip as e:
            impl, skip = None, ("skipped", str(e))
        except Exception as e:  # noqa: BLE001 - one broken implementation must not end the run
            impl, skip = None, ("failed", f"{type(e).__name__}: {e}"[:300])
        for batch in batches:
            elapsed = time.perf_counter() - run.start
            if impl is None:
                row = run.row(name, impl_name, impl_name, batch, mode, *skip)
            elif cfg.budget_s is not None and elapsed > cfg.budget_s:
                row = run.row(name, impl_name, impl.label, batch, mode, "skipped",
                              f"time budget of {cfg.budget_s:.0f} s spent")
            else:
                row = run.row(name, impl_name, impl.label, batch, mode)
                _launch_records(clear=True)
                try:
                    row.update(_measure(run, impl, batch, training), setup_s=impl.setup_s)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory at one batch size
                    row.update(status="failed", reason=f"{type(e).__name__}: {e}"[:300])
                row.update(_launch_records())  # which tactic each GEMM site, route each attention ran (JSON only)
                release_memory(cfg.device)
            failed += row["status"] == "failed"
            run.record["rows"].append(row)
            run.save()
            shown = (f"{row['median_ms']:.2f} ms, {row['images_per_s']:.1f} images/s, "
                     f"first call {row['first_call_s']:.2f} s") if row["status"] == "ok" \
                else f"{row['status']}: {row['reason']}"
            print(f"  {impl_name} {tag}batch {batch}: {shown}", flush=True)
        del impl
        release_memory(cfg.device)
    write_plot(run.record, cfg.out)
    del subject
    torch._dynamo.reset()
    release_memory(cfg.device)
    return failed


def _print_tables(run: _Run, cuda: bool) -> None:
    cfg = run.cfg
    for name in cfg.models:
        info = run.record["models"][name]
        for mode in (MODE_INFERENCE, MODE_TRAIN):
            rows = [r for r in run.record["rows"] if r["model"] == name and row_mode(r) == mode]
            if not rows:
                continue
            gflops = info.get("train_gflops_per_image" if mode == MODE_TRAIN else "gflops_per_image")
            what = (f"training step, {TRAIN_FLOPS_FACTOR} x the forward's FLOPs, "
                    f"{autocast_dtype(cfg.dtype) or 'no'} autocast over fp32 parameters" if mode == MODE_TRAIN
                    else cfg.dtype)
            print(f"\n{name}: {'?' if gflops is None else f'{gflops:.2f}'} GFLOP/image, {what}, img {cfg.img_size}"
                  + ("  [CPU figures, harness smoke only]" if not cuda else ""))
            print(format_table(rows, cfg.baselines))
        for note in info["notes"]:
            print(f"  note: {note}")


def run(cfg: Config) -> int:
    """Measure, print and write everything; 1 when a row failed (a skipped row is not a failure)."""
    cuda = cfg.device.type == "cuda"
    timer = Timer(cfg.device, cfg.quick)
    cfg.out.mkdir(parents=True, exist_ok=True)
    record = {**machine_info(cfg.device), "schema": 1, "date": dt.date.today().isoformat(),
              "datetime": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "note": "GPU figures" if cuda else f"{CPU_NOTE}; host-clock timings of synchronous CPU work",
              "dtype": cfg.dtype, "batch": cfg.batches, "img_size": cfg.img_size, "depth": cfg.depth,
              "baselines": cfg.baselines, "compile_mode": cfg.compile_mode, "timing": timer.method,
              "argv": sys.argv[1:], "models": {}, "rows": []}
    if cfg.train_batches:
        record["train"] = train_info(cfg.dtype, cfg.train_batches, cfg.train_models)
    run = _Run(cfg, timer, time.perf_counter(), record)
    print(f"vitfast bench on {record['gpu']}: torch {record['torch']}, triton {record['triton']}, {cfg.dtype}, "
          f"img {cfg.img_size}, batch {cfg.batches}"
          + (f", training step at batch {cfg.train_batches}" if cfg.train_batches else ""), flush=True)
    if not cuda:
        print(f"{CPU_NOTE}: figures below time synchronous CPU work with a host clock; "
              "vitfast rows run the PyTorch fallback", flush=True)
    print("measuring peaks ...", flush=True)
    record["peak"] = peak = measure_peaks(cfg.device, timer)
    print(f"  matmul {peak['matmul_shape']} {peak['matmul_dtype']}: {peak['matmul_tflops']:.3g} TFLOP/s; "
          f"copy {peak['copy_mib']:.0f} MiB: {peak['copy_gbs']:.4g} GB/s", flush=True)
    impls = [i for i in IMPLEMENTATIONS if i not in BASELINES or i in cfg.baselines]
    failed = 0
    for name in cfg.models:  # each model's training rows right after its inference rows
        if cfg.batches:
            failed += _model_pass(run, name, MODE_INFERENCE, cfg.batches, impls)
        if name in cfg.train_models:
            failed += _model_pass(run, name, MODE_TRAIN, cfg.train_batches, impls)
    record["wall_s"] = time.perf_counter() - run.start
    json_path, csv_path = run.save()
    png_path = write_plot(record, cfg.out)
    _print_tables(run, cuda)
    print(f"\npeak: matmul {peak['matmul_tflops']:.3g} TFLOP/s ({peak['matmul_dtype']}), copy "
          f"{peak['copy_gbs']:.4g} GB/s{'' if cuda else '  [CPU figures]'}; timing: {timer.method}")
    print(f"wrote {json_path}, {csv_path}, {png_path}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitfast.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv), parser)


def run_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        cfg = resolve(args)
    except ValueError as e:
        parser.error(str(e))
    return run(cfg)
