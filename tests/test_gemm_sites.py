"""The GEMM-site instruments on the CPU: ``benchmarks/hopper_compile.py --vit-sites`` compiles ViT-B's four
sites for sm_90 as the JIT specializes them and finds no spill, TMA and wgmma on every pick; the GPU
timing script ``benchmarks/gemm_sites.py`` runs every way of launching a site (in the interpreter, at
a tiny width, with a fake timer)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitfast.bench import gemm_sites
from vitfast.kernels import _select
from helpers import DEVICE

ROOT = Path(__file__).resolve().parents[1]


def test_vit_b_sites_compile_without_spills_on_tma_and_wgmma(tmp_path):
    """ViT-B's four sites and EVA02-B's SwiGLU fc1, in inference and training, at batch 1, 32 and 256."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "sites.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hopper_compile.py"), "--vit-sites",
                           "--models", "vit_b", "eva02_b", "--batch", "1", "32", "256", "--variants", "inference",
                           "training", "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["rows"]
    vit = [r for r in rows if r["model"] == "vit_b"]
    assert {(r["site"], r["batch"]) for r in vit} == {(s, b) for s in gemm_sites.SITES for b in (1, 32, 256)}
    assert len(vit) == 3 * (4 + 3)  # every site in inference, the three with a training launch of their own
    assert len(rows) == len(vit) + 3 * 2  # SwiGLU in inference and training
    for r in rows:
        kernel = "_gated_linear_tma_kernel" if r["site"] == "swiglu" else "_linear_tma_kernel"
        assert r["kernel"] == kernel and r["spilled_bytes"] == 0 and r["tma"] and r["wgmma"], r
        assert r["dynamic_shared_bytes"] <= 227 * 1024
    # What ran before, for the record: the pointer kernel spilled in fc1's GELU epilogue at batch 256.
    fc1 = next(r for r in rows if r["site"] == "fc1" and r["batch"] == 256 and r["variant"] == "inference")
    assert not fc1["pointer"]["tma"] and fc1["pointer"]["spilled_bytes"] > 0


def _script():
    spec = importlib.util.spec_from_file_location("gemm_sites_script", ROOT / "benchmarks" / "gemm_sites.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("site", gemm_sites.SITES)
def test_gpu_script_times_every_way_of_running_a_site(site, monkeypatch):
    monkeypatch.setitem(gemm_sites.MODELS, "tiny", 32)
    monkeypatch.setattr(gemm_sites, "TOKENS", 5)
    _select.reset()

    def bench(fn):
        fn()
        return 1.0

    launch = gemm_sites.site_launch("tiny", 3, site, "inference")
    torch.manual_seed(0)
    row = _script().site_row(launch, torch.float32, DEVICE, bench)
    assert row["m"] == 15 and row["descriptor"] and not row.get("errors")
    assert sum(d["rule"] for d in row["descriptor"]) == 1
    assert all(d["ms"] == 1.0 for d in row["descriptor"])
    assert row["summary"]["faster_tactic"] == "fused"  # ties go to the fused kernel
    for name in ("pointer_ms", "cublas_mm_ms", "cublas_addmm_ms", "cublas_epilogue_ms"):
        assert row[name] == 1.0


def test_gpu_scripts_save_each_row_and_share_one_file(tmp_path, capsys):
    """``timed_rows`` saves after every row and skips what the budget leaves out; ``save_section`` keeps
    the other scripts' sections of the shared file (the GPU suite brings back eight files at most)."""
    from types import SimpleNamespace

    from vitfast.bench.results import save_section, timed_rows

    path = tmp_path / "shapes.json"
    save_section(path, "gemm_sites", {"rows": [1]})
    doc = {"rows": [], "skipped": []}
    saved = []

    def save():
        save_section(path, "attention_shapes", doc)
        saved.append(len(doc["rows"]))

    items = [SimpleNamespace(name=f"launch {i}") for i in range(3)]
    timed_rows(items, 1e9, doc, lambda item: {"what": item.name}, lambda row: row["what"], save)
    assert saved == [1, 2, 3, 3] and [r["what"] for r in doc["rows"]] == ["launch 0", "launch 1", "launch 2"]
    assert json.loads(path.read_text()) == {"gemm_sites": {"rows": [1]}, "attention_shapes": doc}
    doc = {"rows": [], "skipped": []}
    timed_rows(items, -1.0, doc, lambda item: {}, str, lambda: None)
    assert doc == {"rows": [], "skipped": ["launch 0", "launch 1", "launch 2"]}
    assert "0 timed, 3 left for the budget" in capsys.readouterr().out


def test_gpu_scripts_share_their_arguments_and_refuse_the_interpreter(monkeypatch):
    """Both GPU timing scripts take ``--json``, ``--section`` and ``--budget`` from one parser, and refuse,
    naming themselves, to time kernels in the interpreter, before they touch the tuning file."""
    from vitfast.bench.results import gpu_script_parser, start_gpu_script

    a = gpu_script_parser("doc", 42.0, "site").parse_args(["--json", "out.json"])
    assert (a.json, a.section, a.budget) == (Path("out.json"), None, 42.0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VITFAST_TUNING_FILE", "kept.json")
    with pytest.raises(SystemExit, match="gemm_sites.py times kernels on a CUDA GPU"):
        start_gpu_script("gemm_sites.py")
    assert os.environ["VITFAST_TUNING_FILE"] == "kept.json"
