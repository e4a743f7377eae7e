"""``python -m vitfast bench``: whole-model inference speed of vitfast against its baselines.

The run behind the command: peaks first, then per model, implementation and batch one measured row,
the result files rewritten after every row, and a table per model at the end.
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
from .implementations import BUILDERS, Skip
from .machine import machine_info
from .measure import Timer, measure_peaks, measure_row, release_memory
from .options import BASELINES, DTYPES, IMPLEMENTATIONS, Config, add_arguments, resolve
from .plot import write_plot
from .results import blank_row, fill_derived, format_table, write_json_csv
from .subjects import build_subject

CPU_NOTE = "no GPU: CPU figures, harness smoke only"


def run(cfg: Config) -> int:
    """Measure, print and write everything; 1 when a row failed (a skipped row is not a failure)."""
    start = time.perf_counter()
    cuda = cfg.device.type == "cuda"
    timer = Timer(cfg.device, cfg.quick)
    cfg.out.mkdir(parents=True, exist_ok=True)
    record = {**machine_info(cfg.device), "schema": 1, "date": dt.date.today().isoformat(),
              "datetime": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "note": "GPU figures" if cuda else f"{CPU_NOTE}; host-clock timings of synchronous CPU work",
              "dtype": cfg.dtype, "batch": cfg.batches, "img_size": cfg.img_size, "depth": cfg.depth,
              "baselines": cfg.baselines, "compile_mode": cfg.compile_mode, "timing": timer.method,
              "argv": sys.argv[1:], "models": {}, "rows": []}
    print(f"vitfast bench on {record['gpu']}: torch {record['torch']}, triton {record['triton']}, {cfg.dtype}, "
          f"img {cfg.img_size}, batch {cfg.batches}", flush=True)
    if not cuda:
        print(f"{CPU_NOTE}: figures below time synchronous CPU work with a host clock; "
              "vitfast rows run the PyTorch fallback", flush=True)
    print("measuring peaks ...", flush=True)
    record["peak"] = peak = measure_peaks(cfg.device, timer)
    print(f"  matmul {peak['matmul_shape']} {peak['matmul_dtype']}: {peak['matmul_tflops']:.3g} TFLOP/s; "
          f"copy {peak['copy_mib']:.0f} MiB: {peak['copy_gbs']:.4g} GB/s", flush=True)
    flops: dict[str, int | None] = {}
    failed = 0

    def save() -> tuple[Path, Path]:  # after every row, so a run cut short still leaves its results
        fill_derived(record["rows"], flops, peak["matmul_tflops"], cfg.baselines)
        return write_json_csv(record, cfg.out)

    impls = [i for i in IMPLEMENTATIONS if i not in BASELINES or i in cfg.baselines]
    for name in cfg.models:
        try:
            subject = build_subject(name, cfg)
        except Exception as e:  # noqa: BLE001 - e.g. a timm model that takes no img_size; the others still run
            reason = f"could not build {name}: {type(e).__name__}: {e}"[:300]
            print(f"[{name}] {reason}", flush=True)
            flops[name] = None
            record["models"][name] = {"shape": None, "gflops_per_image": None, "notes": [reason]}
            record["rows"] += [blank_row(name, i, i, b, "failed", reason) for i in impls for b in cfg.batches]
            failed += 1
            save()
            continue
        try:
            shape = shape_of(subject.ref if subject.ref is not None else subject.timm)
        except ValueError as e:
            shape, flops[name] = None, None
            subject.notes.append(f"FLOPs not counted ({e}): no TFLOP/s or fraction of peak")
        else:
            flops[name] = flops_per_image(shape)
        record["models"][name] = {"shape": shape and dataclasses.asdict(shape),
                                  "gflops_per_image": flops[name] and flops[name] / 1e9, "notes": subject.notes}
        print(f"[{name}] " + (f"{shape.depth} layers, width {shape.embed_dim}, {shape.tokens} tokens, "
                              f"{flops[name] / 1e9:.2f} GFLOP/image" if shape else subject.notes[-1]), flush=True)
        for impl_name in impls:
            try:
                t0 = time.perf_counter()
                impl = BUILDERS[impl_name](subject)
                impl.setup_s = time.perf_counter() - t0
            except Skip as e:
                impl, skip = None, ("skipped", str(e))
            except Exception as e:  # noqa: BLE001 - one broken implementation must not end the run
                impl, skip = None, ("failed", f"{type(e).__name__}: {e}"[:300])
            for batch in cfg.batches:
                elapsed = time.perf_counter() - start
                if impl is None:
                    row = blank_row(name, impl_name, impl_name, batch, *skip)
                elif cfg.budget_s is not None and elapsed > cfg.budget_s:
                    row = blank_row(name, impl_name, impl.label, batch, "skipped", f"time budget of {cfg.budget_s:.0f} s spent")
                else:
                    row = blank_row(name, impl_name, impl.label, batch)
                    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=cfg.device, dtype=DTYPES[cfg.dtype])
                    try:
                        with torch.inference_mode():
                            row.update(measure_row(impl, x, timer), setup_s=impl.setup_s)
                    except Exception as e:  # noqa: BLE001 - e.g. out of memory at one batch size
                        row.update(status="failed", reason=f"{type(e).__name__}: {e}"[:300])
                    del x
                    release_memory(cfg.device)
                failed += row["status"] == "failed"
                record["rows"].append(row)
                save()
                shown = (f"{row['median_ms']:.2f} ms, {row['images_per_s']:.1f} images/s, "
                         f"first call {row['first_call_s']:.2f} s") if row["status"] == "ok" \
                    else f"{row['status']}: {row['reason']}"
                print(f"  {impl_name} batch {batch}: {shown}", flush=True)
            del impl
            release_memory(cfg.device)
        write_plot(record, cfg.out)
        del subject
        torch._dynamo.reset()
        release_memory(cfg.device)
    record["wall_s"] = time.perf_counter() - start
    json_path, csv_path = save()
    png_path = write_plot(record, cfg.out)
    for name in cfg.models:
        gflops = record["models"][name]["gflops_per_image"]
        print(f"\n{name}: {'?' if gflops is None else f'{gflops:.2f}'} GFLOP/image, {cfg.dtype}, img {cfg.img_size}"
              + ("  [CPU figures, harness smoke only]" if not cuda else ""))
        print(format_table([r for r in record["rows"] if r["model"] == name], cfg.baselines))
        for note in record["models"][name]["notes"]:
            print(f"  note: {note}")
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
