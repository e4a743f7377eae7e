"""The benchmark harness: FLOP count, timm weight mapping, the CLI's files and the README report."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vitfast import bench, reference
from vitfast.__main__ import main as vitfast_main

REPO = Path(__file__).resolve().parents[1]
RUN_KEYS = {"device_kind", "gpu", "driver", "torch", "triton", "dtype", "batch", "date", "note", "peak",
            "models", "rows", "baselines", "compile_mode", "timing"}


def _run(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    """A subprocess without TRITON_INTERPRET: the bench must never time the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _bench(out: Path, *extra: str) -> tuple[str, dict, list[dict]]:
    proc = _run(["-m", "vitfast", "bench", "--quick", "--out", str(out), *extra])
    (json_path,) = out.glob("*.json")
    (csv_path,) = out.glob("*.csv")
    (png_path,) = out.glob("*.png")
    assert json_path.stem == csv_path.stem == png_path.stem
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with csv_path.open() as fh:
        return proc.stdout, json.loads(json_path.read_text()), list(csv.DictReader(fh))


def _check_rows(record: dict, rows: list[dict], csv_rows: list[dict]) -> None:
    speedups = {bench.speedup_field(b) for b in record["baselines"]}
    assert RUN_KEYS <= set(record)
    ran = {i for i in bench.IMPLEMENTATIONS if i not in bench.BASELINES or i in record["baselines"]}
    assert {r["implementation"] for r in rows} == ran
    assert len(csv_rows) == len(rows)
    assert set(bench.RUN_FIELDS) | set(bench.ROW_FIELDS) | speedups == set(csv_rows[0])
    flops = record["models"]["vit_tiny"]["gflops_per_image"] * 1e9
    for r, c in zip(rows, csv_rows):
        assert set(bench.ROW_FIELDS) | speedups <= set(r)
        assert c["implementation"] == r["implementation"] and c["device_kind"] == record["device_kind"]
        if r["status"] != "ok":
            assert r["reason"] and r["median_ms"] is None and r["images_per_s"] is None
            continue
        assert r["median_ms"] > 0 and r["first_call_s"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1e3 / r["median_ms"])
        assert r["tflops"] == pytest.approx(flops * r["batch"] / r["median_ms"] / 1e9)
        assert r["frac_of_peak"] == pytest.approx(r["tflops"] / record["peak"]["matmul_tflops"])
        ref_ms = next(x["median_ms"] for x in rows if x["implementation"] == "reference-eager"
                      and x["batch"] == r["batch"])
        assert r["speedup_vs_reference-eager"] == pytest.approx(ref_ms / r["median_ms"])
        assert float(c["median_ms"]) == pytest.approx(r["median_ms"])


def test_vit_b16_flops_match_conventions():
    with torch.device("meta"):
        model = reference.vit_base()
    flops = bench.flops_per_image(bench.shape_of(model))
    assert flops == pytest.approx(35.16e9, rel=0.01)


def test_flop_count_reads_timm_and_reference_alike():
    ref = reference.vit_tiny(img_size=64, n_layers=3)
    twin = bench.timm_from_reference(ref)
    assert bench.shape_of(twin) == bench.shape_of(ref)
    # By hand: 17 tokens, width 192, hidden 768, 16 patches of 3*16*16, 1000 classes.
    n, d = 17, 192
    layer = 2 * n * (4 * d * d + 2 * d * 768) + 4 * n * n * d
    assert bench.flops_per_image(bench.shape_of(ref)) == 2 * 16 * 768 * d + 3 * layer + 2 * d * 1000


def test_timm_twin_holds_the_reference_weights():
    ref = reference.vit_tiny(img_size=32, n_layers=2).eval()
    twin = bench.timm_from_reference(ref)
    assert len(list(twin.parameters())) == len(list(ref.parameters()))
    assert isinstance(twin.norm, torch.nn.Identity)  # the reference has no final norm
    x = torch.randn(3, 5, 192)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(twin.patch_embed(img), ref.patch_embed(img))
        assert torch.equal(twin.pos_embed, ref.pos_embed) and torch.equal(twin.cls_token, ref.cls_token)
        assert torch.equal(twin.head(x), ref.head(x))
        for block, layer in zip(twin.blocks, ref.encoder.layers):
            want = layer.self_attn(x, x, x, need_weights=False)[0]
            torch.testing.assert_close(block.attn(x), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(block.mlp(x), layer.linear2(F.gelu(layer.linear1(x))), rtol=1e-5, atol=1e-5)
            assert torch.equal(block.norm1(x), layer.norm1(x)) and torch.equal(block.norm2(x), layer.norm2(x))


def test_cpu_bench_writes_labelled_json_csv_png(tmp_path):
    stdout, record, csv_rows = _bench(tmp_path, "--device", "cpu", "--baselines", "reference-eager,timm-eager")
    rows = record["rows"]
    assert bench.CPU_NOTE in stdout and "[CPU figures, harness smoke only]" in stdout
    assert "pre-norm" in stdout
    assert record["device_kind"] == "cpu" and bench.CPU_NOTE in record["note"]
    assert record["dtype"] == "fp32" and record["batch"] == [2] and record["driver"] is None
    assert {c["device_kind"] for c in csv_rows} == {"cpu"} and bench.CPU_NOTE in csv_rows[0]["note"]
    _check_rows(record, rows, csv_rows)
    status = {r["implementation"]: r for r in rows}
    assert status["reference-eager"]["status"] == status["timm-eager"]["status"] == "ok"
    assert status["reference-eager"]["speedup_vs_reference-eager"] == 1.0
    assert "timm-compile" not in status  # not named in --baselines
    assert status["vitfast-cudagraph"]["status"] == "skipped" and "GPU" in status["vitfast-cudagraph"]["reason"]
    fast = status["vitfast"]
    assert fast["status"] == "ok" and fast["label"] == "vitfast (PyTorch fallback on CPU)"
    assert fast["label"] in stdout and record["peak"]["copy_gbs"] > 0
    # Without --train the files are as before training rows existed: no mode, no train field.
    assert "train" not in record and not any("mode" in r for r in rows) and "mode" not in csv_rows[0]
    assert "train_gflops_per_image" not in record["models"]["vit_tiny"] and " train batch" not in stdout


@pytest.mark.gpu
def test_gpu_bench_smoke(tmp_path):
    _, record, csv_rows = _bench(tmp_path, "--device", "cuda", "--model", "vit_tiny", "--img-size", "64",
                                 "--batch", "1", "3", "--baselines", "reference-eager", "timm-eager")
    rows = record["rows"]
    assert record["device_kind"] == "cuda" and record["dtype"] == "bf16" and record["driver"]
    _check_rows(record, rows, csv_rows)
    assert all(r["status"] == "ok" and r["peak_mem_mib"] > 0 for r in rows if r["implementation"] != "timm-compile")


@pytest.mark.parametrize("flag, value", [("--model", "vit_gigantic_nonsense"), ("--baselines", "timm-jit"),
                                         ("--batch", "0"), ("--train-batch", "0"), ("--train-model", "vit_small")])
def test_bench_rejects_unknown_names(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        vitfast_main(["bench", flag, value, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and flag in err and value in err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def report():
    """benchmarks/report.py, a script rather than a package module, loaded from its path."""
    spec = importlib.util.spec_from_file_location("vitfast_bench_report", REPO / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


README = "# project\n\nintro\n\n## Performance\n\n<!-- bench:start -->\nold text\n<!-- bench:end -->\n\n## After\n"


def test_report_without_gpu_results(tmp_path, report):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "cpu-2026-01-01.json").write_text(json.dumps({"device_kind": "cpu"}))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert report.main(["--results", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "No GPU results have been committed yet" in text and "old text" not in text
    assert text.startswith("# project\n\nintro\n\n## Performance\n\n<!-- bench:start -->\n")
    assert text.endswith("<!-- bench:end -->\n\n## After\n")


def _gpu_record(gpu: str, date: str, ms: float) -> dict:
    rows = [{**bench.blank_row("vit_base", impl, impl, 256), "median_ms": ms * (2 if impl == "reference-eager" else 1),
             "peak_mem_mib": 1000.0, "setup_s": 0.5, "first_call_s": 1.5} for impl in ("reference-eager", "vitfast")]
    bench.fill_derived(rows, {"vit_base": 35_000_000_000}, 800.0, ["reference-eager"])
    return {"device_kind": "cuda", "gpu": gpu, "driver": "580.1", "torch": "2.11.0", "triton": "3.6.0",
            "dtype": "bf16", "img_size": 224, "date": date, "datetime": f"{date}T00:00:00+00:00",
            "compile_mode": "default", "timing": "do_bench", "baselines": ["reference-eager"],
            "peak": {"matmul_tflops": 800.0, "matmul_dtype": "bfloat16", "copy_gbs": 3000.0},
            "models": {"vit_base": {"gflops_per_image": 35.0, "notes": ["a note"]}}, "rows": rows}


def test_report_renders_newest_gpu_result_between_markers(tmp_path, report, capsys):
    results = tmp_path / "results"
    results.mkdir()
    for name, rec in {"nvidia-h100-2026-01-01": _gpu_record("NVIDIA H100", "2026-01-01", 100.0),
                      "nvidia-h100-2026-02-01": _gpu_record("NVIDIA H100", "2026-02-01", 50.0)}.items():
        (results / f"{name}.json").write_text(json.dumps(rec))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    args = ["--results", str(results), "--readme", str(readme), "--print"]
    assert report.main(args) == 0
    printed = capsys.readouterr().out
    text = readme.read_text()
    assert printed.strip() in text and "No GPU results" not in text
    assert "### NVIDIA H100, 2026-02-01" in text and "2026-01-01" not in text
    # 256 images in 50 ms; the reference took twice as long; 35 GFLOP each against an 800 TFLOP/s peak.
    assert "| vitfast | 256 | 50.00 | 5120.0 | 179 | 22.4% | 2.00x |" in text
    assert "- a note" in text and text.endswith("<!-- bench:end -->\n\n## After\n")
    report.main(args)
    assert readme.read_text() == text  # rewriting is idempotent


def test_report_refuses_readme_without_markers(tmp_path, report, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--results", str(tmp_path), "--readme", str(readme)])
    assert exit_info.value.code == 2 and "bench:start" in capsys.readouterr().err
    assert readme.read_text() == "# no markers\n"
