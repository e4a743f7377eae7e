"""Result rows and files: the fields, the figures derived from each median, JSON, CSV and the text table."""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

RUN_FIELDS = ("device_kind", "gpu", "driver", "torch", "triton", "dtype", "img_size", "date", "compile_mode", "note")
ROW_FIELDS = ("model", "implementation", "label", "batch", "status", "reason", "median_ms", "images_per_s",
              "tflops", "frac_of_peak", "peak_mem_mib", "setup_s", "first_call_s")
# Only in runs that measured a training step (--train, --train-batch): every row says which it is.
TRAIN_ROW_FIELDS = ("mode", "autocast_dtype")
MODE_INFERENCE, MODE_TRAIN = "inference", "train"
# A training step's FLOPs: the forward's, and twice as many in the backward (one GEMM for the gradient of
# the activations and one for the weights' per forward GEMM; attention's backward counted alike, without the
# recomputation of QK^T that flash-style kernels add).
TRAIN_FLOPS_FACTOR = 3


def row_mode(row: dict) -> str:
    """A row's mode; rows without one (every row of an inference-only run) are inference rows."""
    return row.get("mode", MODE_INFERENCE)


def speedup_field(baseline: str) -> str:
    return f"speedup_vs_{baseline}"


def blank_row(model: str, impl: str, label: str, batch: int, status: str = "ok", reason: str = "") -> dict:
    """A result row before measurement; ``fill_derived`` adds the figures computed from the median."""
    return {"model": model, "implementation": impl, "label": label, "batch": batch, "status": status,
            "reason": reason, "median_ms": None, "peak_mem_mib": None, "setup_s": None, "first_call_s": None}


def fill_derived(rows: list[dict], flops: dict[str, int | None], peak_tflops: float, baselines: list[str]) -> None:
    """images/s, TFLOP/s, fraction of peak, and the speedup over each baseline at the same model, mode and batch.

    ``flops``: a forward's FLOPs per image; a training row counts ``TRAIN_FLOPS_FACTOR`` times as many.
    """
    timed = {(r["model"], row_mode(r), r["batch"], r["implementation"]): r["median_ms"]
             for r in rows if r["status"] == "ok"}
    for r in rows:
        ms, f = r["median_ms"], flops.get(r["model"])
        f = f and f * (TRAIN_FLOPS_FACTOR if row_mode(r) == MODE_TRAIN else 1)
        ok = r["status"] == "ok"
        r["images_per_s"] = r["batch"] / ms * 1e3 if ok else None
        r["tflops"] = f * r["batch"] / ms / 1e9 if ok and f else None
        r["frac_of_peak"] = r["tflops"] / peak_tflops if r["tflops"] else None
        for b in baselines:
            base = timed.get((r["model"], row_mode(r), r["batch"], b))
            r[speedup_field(b)] = base / ms if ok and base else None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def result_stem(record: dict) -> str:
    """``<gpu>-<date>``, or ``cpu-<date>`` for CPU smoke runs."""
    return f"{_slug(record['gpu']) if record['device_kind'] == 'cuda' else 'cpu'}-{record['date']}"


def write_json_csv(record: dict, out: Path) -> tuple[Path, Path]:
    stem = out / result_stem(record)
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    columns = list(RUN_FIELDS) + list(ROW_FIELDS) + [speedup_field(b) for b in record["baselines"]]
    if "train" in record:
        columns += TRAIN_ROW_FIELDS
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in record["rows"]:
            writer.writerow({c: record[c] if c in RUN_FIELDS else r[c] for c in columns})
    return json_path, csv_path


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def format_table(rows: list[dict], baselines: list[str], markdown: bool = False) -> str:
    """One model's rows as a text table (or a Markdown table for the README)."""
    headers = ["implementation", "batch", "ms/batch", "images/s", "TFLOP/s", "of peak",
               *(f"vs {b}" for b in baselines), "peak MiB", "setup s", "1st call s", "note"]
    body = []
    for r in rows:
        ok = r["status"] == "ok"
        body.append([r["label"], str(r["batch"]), _fmt(r["median_ms"], ".2f"), _fmt(r["images_per_s"], ".1f"),
                     _fmt(r["tflops"], ".3g"), _fmt(r["frac_of_peak"] and 100 * r["frac_of_peak"], ".1f", "%"),
                     *(_fmt(r[speedup_field(b)], ".2f" if (r[speedup_field(b)] or 1) >= 0.01 else ".1g", "x")
                       for b in baselines),
                     _fmt(r["peak_mem_mib"], ".0f"), _fmt(r["setup_s"], ".2f"),
                     _fmt(r["first_call_s"], ".2f"), "" if ok else f"{r['status']}: {r['reason']}"])
    if markdown:
        return "\n".join("| " + " | ".join(c.replace("|", "/") for c in line) + " |"
                         for line in [headers, ["---"] * len(headers), *body])
    widths = [max(len(line[i]) for line in [headers, *body]) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in [headers, ["-" * w for w in widths], *body])


def save_section(path: Path, section: str | None, doc: dict) -> None:
    """Write ``doc`` to the JSON file ``path``; with ``section``, as that key of the object the file holds
    (kept with its other keys), so that several GPU scripts can share one of the few files a GPU run
    brings back."""
    if section is not None:
        try:
            held = json.loads(path.read_text()) if path.exists() else {}
        except json.JSONDecodeError:  # cut short before writes were atomic, or by hand: kept aside, not lost
            os.replace(path, path.with_name(path.name + ".unreadable"))
            held = {}
        doc = {**held, section: doc}
    part = path.with_name(path.name + ".part")  # replaced in one step: a writer killed mid-way leaves the old file
    part.write_text(json.dumps(doc, indent=1))
    os.replace(part, path)


def gpu_script_parser(description: str, budget_s: float, what: str):
    """The arguments every GPU timing script takes: ``--json`` (where), ``--section`` (under which key of
    that file) and ``--budget`` (seconds after which no new ``what`` starts); the script adds its own."""
    import argparse

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True, help="where to write the rows")
    p.add_argument("--section", default=None, help="write the document under this key of the JSON file")
    p.add_argument("--budget", type=float, default=budget_s, help=f"seconds; no new {what} starts after them")
    return p


def start_gpu_script(script: str) -> dict:
    """A GPU timing script's start: refused under the interpreter or without CUDA; kernels on their rules'
    configs and tactics, never a tuned pick (the tuning file pointed at an empty place); the document's
    header (GPU, versions, dtype) with empty ``rows`` and ``skipped``."""
    import tempfile

    import torch

    if os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available():
        raise SystemExit(f"{script} times kernels on a CUDA GPU (and TRITON_INTERPRET must be unset)")
    import triton

    from vitfast.kernels import _select

    os.environ["VITFAST_TUNING_FILE"] = str(Path(tempfile.mkdtemp()) / "no-picks.json")
    _select.reset()
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "dtype": "bfloat16", "rows": [], "skipped": []}


def timed_rows(todo: list, budget_s: float, doc: dict, measure, describe, save) -> None:
    """A GPU script's loop: for each item of ``todo`` (an object with a ``name``), ``measure(item)`` its
    row, stamp the row's seconds, append it to ``doc["rows"]``, print ``describe(row)`` and ``save()``,
    so that a run cut short keeps what it measured; an item whose measuring raises goes to
    ``doc["errors"]`` and the next one starts; items reached after ``budget_s`` seconds go to
    ``doc["skipped"]``."""
    import time

    start = time.perf_counter()
    for item in todo:
        if time.perf_counter() - start > budget_s:
            doc["skipped"].append(item.name)
            continue
        t0 = time.perf_counter()
        try:
            row = measure(item)
        except Exception as e:  # noqa: BLE001 - one item's failure must not cost the others their GPU time
            doc.setdefault("errors", []).append(f"{item.name}: {type(e).__name__}: {e}"[:500])
            print(f"{item.name}: FAILED {type(e).__name__}: {e}", flush=True)
            save()
            continue
        row["seconds"] = round(time.perf_counter() - t0, 1)
        doc["rows"].append(row)
        print(f"{item.name}: {describe(row)} [{row['seconds']} s]", flush=True)
        save()
    save()
    print(f"{len(doc['rows'])} timed, {len(doc['skipped'])} left for the budget, {time.perf_counter() - start:.0f} s")


def time_or_record(row: dict, what: str, bench, fn) -> float | None:
    """``bench(fn)``, or None with the error in ``row["errors"]`` (a config that does not fit, a backend
    that does not take the shape): a GPU script's row keeps what else it measured."""
    try:
        return bench(fn)
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        row.setdefault("errors", []).append(f"{what}: {type(e).__name__}: {e}"[:300])
        return None


def time_candidates(row: dict, candidates: list, rule, run, bench, compiling) -> list[dict]:
    """Every candidate config compiled at once (``compiling``: ``_precompile.compiling`` compiled, None
    in the interpreter), then each timed by ``bench`` on ``run(config)``: its config, whether it is the
    rule's pick, and its ms (None where it failed, the error in ``row["errors"]``)."""
    if compiling is not None:
        with compiling():  # on all cores at once
            for c in candidates:
                run(c)
    same = lambda a, b: (a.kwargs, a.num_warps, a.num_stages) == (b.kwargs, b.num_warps, b.num_stages)  # noqa: E731
    return [{"config": {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}, "rule": same(c, rule),
             "ms": time_or_record(row, str(c), bench, lambda: run(c))} for c in candidates]
