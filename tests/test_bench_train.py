"""The bench's training-step rows (--train, --train-batch): what is timed, the files' fields, the derived figures."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
import test_bench_cli
from test_bench_cli import REPO, _bench, _gpu_record

from vitfast import bench
from vitfast.bench import implementations
from vitfast.bench.measure import Timer

report = test_bench_cli.report  # the fixture that loads benchmarks/report.py


def _cfg(*argv: str) -> bench.Config:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench.resolve(parser.parse_args(["--quick", "--device", "cpu", *argv]))


def _check_derived(record: dict, rows: list[dict]) -> None:
    """Every ok row's figures from its own median, its mode's FLOPs, and the same mode's baselines."""
    gflops = record["models"]["vit_tiny"]["gflops_per_image"]
    assert record["models"]["vit_tiny"]["train_gflops_per_image"] == pytest.approx(3 * gflops)
    for r in rows:
        if r["status"] != "ok":
            continue
        flops = gflops * 1e9 * (3 if r["mode"] == "train" else 1)
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1e3 / r["median_ms"])
        assert r["tflops"] == pytest.approx(flops * r["batch"] / r["median_ms"] / 1e9)
        assert r["frac_of_peak"] == pytest.approx(r["tflops"] / record["peak"]["matmul_tflops"])
        for b in record["baselines"]:
            base = next(x for x in rows if x["implementation"] == b and x["mode"] == r["mode"]
                        and x["batch"] == r["batch"])
            assert r[bench.speedup_field(b)] == pytest.approx(base["median_ms"] / r["median_ms"])


def test_cpu_bench_train_batch_adds_training_rows_after_the_inference_rows(tmp_path):
    stdout, record, csv_rows = _bench(tmp_path, "--device", "cpu", "--baselines", "reference-eager,timm-eager",
                                      "--train-batch", "3")
    rows = record["rows"]
    assert record["batch"] == [2] and record["dtype"] == "fp32"
    assert record["train"]["models"] == ["vit_tiny"] and record["train"]["batch"] == [3]
    assert record["train"]["param_dtype"] == "fp32" and record["train"]["autocast_dtype"] is None
    assert record["train"]["flops_factor"] == 3 and "no autocast" in record["train"]["step"]
    impls = ["reference-eager", "timm-eager", "vitfast", "vitfast-cudagraph"]
    assert [(r["mode"], r["implementation"], r["batch"]) for r in rows] == \
        [("inference", i, 2) for i in impls] + [("train", i, 3) for i in impls]
    assert all(r["autocast_dtype"] is None for r in rows)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "skipped"] * 2
    assert rows[6]["label"] == "vitfast (PyTorch fallback on CPU)"
    _check_derived(record, rows)
    assert bench.TRAIN_NOTE in record["models"]["vit_tiny"]["notes"]
    assert [c["mode"] for c in csv_rows] == [r["mode"] for r in rows]
    assert set(csv_rows[0]) == (set(bench.RUN_FIELDS) | set(bench.ROW_FIELDS) | set(bench.TRAIN_ROW_FIELDS)
                                | {bench.speedup_field(b) for b in record["baselines"]})
    assert "timm-eager train batch 3:" in stdout and "training step, 3 x the forward's FLOPs" in stdout


def test_cpu_bench_train_times_only_the_training_step_under_autocast(tmp_path):
    assert bench.main(["--quick", "--device", "cpu", "--train", "--dtype", "bf16", "--baselines", "timm-eager",
                       "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("*.json")
    record = json.loads(json_path.read_text())
    rows = record["rows"]
    assert record["batch"] == [] and record["train"]["batch"] == [2] and record["train"]["autocast_dtype"] == "bf16"
    assert "torch.autocast(bf16)" in record["train"]["step"]
    assert [(r["mode"], r["autocast_dtype"], r["implementation"], r["status"]) for r in rows] == [
        ("train", "bf16", "timm-eager", "ok"), ("train", "bf16", "vitfast", "ok"),
        ("train", "bf16", "vitfast-cudagraph", "skipped")]
    _check_derived(record, rows)


@pytest.mark.gpu
def test_gpu_bench_train_smoke(tmp_path):
    _, record, _ = _bench(tmp_path, "--device", "cuda", "--model", "vit_tiny", "--img-size", "64", "--train",
                          "--batch", "3", "--baselines", "reference-eager", "timm-eager")
    rows = record["rows"]
    assert record["train"]["autocast_dtype"] == "bf16" and record["device_kind"] == "cuda"
    assert [(r["implementation"], r["status"]) for r in rows] == [
        ("reference-eager", "ok"), ("timm-eager", "ok"), ("vitfast", "ok"), ("vitfast-cudagraph", "skipped")]
    assert all(r["peak_mem_mib"] > 0 and r["mode"] == "train" for r in rows[:3])
    _check_derived(record, rows)


def test_training_step_is_forward_loss_backward_with_fp32_parameters():
    """What a training row times: the reference's and vitfast's steps give the reference's gradients."""
    cfg = _cfg("--train")
    subject = bench.build_subject("vit_tiny", cfg, training=True)
    assert subject.ref.training and subject.timm.training
    assert {p.dtype for p in subject.ref.parameters()} == {torch.float32}
    assert all(m.p == 0 for m in subject.ref.modules() if isinstance(m, torch.nn.Dropout))
    x = torch.randn(3, 3, 32, 32)
    grads = {}
    for name in ("reference-eager", "vitfast"):
        impl = bench.training_step(implementations.BUILDERS[name](subject), cfg.device, cfg.dtype)
        assert impl.zero_grads and impl.module.training
        impl.prepare(x)()
        grads[name] = {n: p.grad for n, p in impl.module.named_parameters()}
    names, params = zip(*subject.ref.named_parameters())
    want = dict(zip(names, torch.autograd.grad(subject.ref(x).mean(), params)))  # the loss: the logits' mean
    assert set(grads["reference-eager"]) == set(grads["vitfast"]) == set(want)
    for n, w in want.items():
        assert w.abs().max() > 0, n
        torch.testing.assert_close(grads["reference-eager"][n], w, rtol=0, atol=0, msg=n)
        torch.testing.assert_close(grads["vitfast"][n], w, rtol=1e-4, atol=1e-6, msg=n)


def test_timer_sets_gradients_to_none_before_each_timed_call():
    p = torch.nn.Parameter(torch.ones(2))
    seen = []

    def step():
        seen.append(p.grad is None)
        p.grad = torch.ones(2)

    Timer(torch.device("cpu"), quick=True)(step, [p])
    assert seen == [True] + [True] * 5  # 1 warm-up (grad still None at the start), then 5 timed calls


def test_fill_derived_keeps_modes_apart():
    rows = []
    for mode, ms in (("inference", {"reference-eager": 10.0, "vitfast": 5.0}),
                     ("train", {"reference-eager": 40.0, "vitfast": 20.0})):
        for impl, t in ms.items():
            rows.append({**bench.blank_row("vit_base", impl, impl, 128), "mode": mode, "median_ms": t})
    bench.fill_derived(rows, {"vit_base": 35_000_000_000}, 700.0, ["reference-eager"])
    by = {(r["mode"], r["implementation"]): r for r in rows}
    # 128 images in 20 ms, 3 x 35 GFLOP each: 672 TFLOP/s, 96% of 700; twice as fast as the training reference.
    assert by["train", "vitfast"]["tflops"] == pytest.approx(672.0)
    assert by["train", "vitfast"]["frac_of_peak"] == pytest.approx(0.96)
    assert by["train", "vitfast"]["speedup_vs_reference-eager"] == pytest.approx(2.0)
    assert by["inference", "vitfast"]["tflops"] == pytest.approx(896.0)
    assert by["inference", "reference-eager"]["speedup_vs_reference-eager"] == 1.0


@pytest.mark.parametrize("argv, flag", [(["--train", "--train-batch", "4"], "--train-batch"),
                                         (["--train-batch", "4", "--train-model", "vit_small"], "--train-model")])
def test_train_options_refuse_contradictions(argv, flag):
    with pytest.raises(ValueError, match=flag):
        _cfg(*argv)


def test_train_defaults():
    cfg = _cfg("--train")
    assert cfg.batches == [] and cfg.train_batches == [2] and cfg.train_models == ["vit_tiny"]
    cfg = _cfg("--model", "vit_tiny", "vit_small", "--train-batch", "4", "--train-model", "vit_small")
    assert cfg.batches == [2] and cfg.train_batches == [4] and cfg.train_models == ["vit_small"]
    assert _cfg().train_batches == [] and _cfg().train_models == []


def test_report_renders_training_rows_in_a_table_of_their_own(tmp_path, report):
    rec = _gpu_record("NVIDIA H100", "2026-02-01", 50.0)
    train_rows = [{**bench.blank_row("vit_base", impl, impl, 128), "mode": "train", "autocast_dtype": "bf16",
                   "median_ms": 80.0 * (2 if impl == "reference-eager" else 1)}
                  for impl in ("reference-eager", "vitfast")]
    rec["rows"] = [{**r, "mode": "inference", "autocast_dtype": None} for r in rec["rows"]] + train_rows
    bench.fill_derived(rec["rows"], {"vit_base": 35_000_000_000}, 800.0, ["reference-eager"])
    rec["train"] = bench.train_info("bf16", [128], ["vit_base"])
    rec["models"]["vit_base"]["train_gflops_per_image"] = 105.0
    (tmp_path / "nvidia-h100-2026-02-01.json").write_text(json.dumps(rec))
    text = report.render(report.load_gpu_results(tmp_path))
    inference, training = text.split("**vit_base, training step**")
    assert "| vitfast | 256 | 50.00 | 5120.0 | 179 | 22.4% | 2.00x |" in inference and "| 128 |" not in inference
    assert "(forward + backward, optimizer excluded; bf16 autocast, fp32 parameters; 105.00 GFLOP/image" in training
    # 128 images in 80 ms at 105 GFLOP each: 168 TFLOP/s, 21.0% of 800; the training reference took twice as long.
    assert "| vitfast | 128 | 80.00 | 1600.0 | 168 | 21.0% | 2.00x |" in training and "| 256 |" not in training


def test_report_of_the_committed_results_is_the_readme_section(report):
    """The committed files carry no training rows; their README section is unchanged by the training table."""
    section = report.render(report.load_gpu_results(REPO / "benchmarks" / "results"))
    assert "training step" not in section and section in (REPO / "README.md").read_text()
