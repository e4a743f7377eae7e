"""The host-time instrument (benchmarks/host_time.py) runs a small ViT through the stand-in driver and
reports launches, host times, first calls and the cubins' static facts, so that it cannot rot.

It runs in a subprocess without ``TRITON_INTERPRET`` (this process has the interpreter on): the kernels
really compile for sm_90 there, about half a second per variant.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "host_time.py"
DEPTH = 1
# The reference ViT's launches per forward: the patch embedding (CLS and positions fused), then per
# post-norm layer the QKV GEMM, attention, the out-projection with its residual, LayerNorm, fc1 + GELU,
# fc2 with its residual, LayerNorm; and the head's GEMM.
EXPECTED_LAUNCHES = 1 + 7 * DEPTH + 1
# The GEMMs run linear's descriptor kernel: the stand-in driver is an sm_90 target.
KERNELS = {"_patch_embed_kernel", "_linear_tma_kernel", "_attention_fwd_kernel", "_layer_norm_fwd_kernel"}


def test_host_time_small_reference_vit(tmp_path):
    out = tmp_path / "host.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")  # the steady-state process compiles here, privately
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "reference", "--batches", "1", "--depth", str(DEPTH),
         "--width", "64", "--heads", "2", "--img-size", "32", "--repeats", "5", "--eager-repeats", "20",
         "--processes", "2", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads(out.read_text())
    (row,) = record["rows"]
    assert row["model"] == "reference" and row["batch"] == 1
    assert row["launches_per_forward"] == EXPECTED_LAUNCHES
    each = row["processes"]  # two steady-state processes; the row is one of them
    assert len(each["host_over_eager"]) == 2 and row["host_over_eager"] in each["host_over_eager"]
    assert record["steady_state_processes"] == 2
    assert sum(row["launches_by_kernel"].values()) == EXPECTED_LAUNCHES
    for key in ("host_us_per_forward", "host_us_per_launch", "wall_us_per_forward", "host_cpu_us_per_forward",
                "settled_block_us",
                "eager_host_us_per_forward", "first_call_s_cold", "first_call_s_warm"):
        assert row[key] > 0, key
    # Nothing of PyTorch's computes on the CPU (the head is vitfast's GEMM): the host time is all the wall time.
    ops = row["cpu_arithmetic_ops"]
    assert sum(ops.get(op, {}).get("calls", 0) for op in ("aten::linear", "aten::addmm")) == 0, ops
    arithmetic = row["cpu_arithmetic_us_per_forward"]
    assert row["host_us_per_forward"] == pytest.approx(row["wall_us_per_forward"] - arithmetic)
    assert row["first_call_compiles"] > 0 and row["first_call_compiles"] == row["first_call_variants"]
    assert row["first_call_compiles_warm"] == 0  # the warm process compiled nothing: Triton's cache served it
    facts = {f["variant"]: f for f in record["kernels"]}
    assert set(row["launches_by_kernel"]) == set(facts)
    assert {f["kernel"] for f in facts.values()} == KERNELS
    for f in facts.values():
        assert 0 < f["registers"] <= 255 and f["spilled_bytes"] >= 0 and f["num_warps"] >= 1
        assert 0 <= f["dynamic_shared_bytes"] <= 232448
        assert f["tile"] and f["launched_by"] == ["reference@1"], f
    # The GEMM-shaped kernels reach Hopper's tensor-core instructions with the JIT's specialization.
    assert all(f["wgmma"] for f in facts.values() if f["kernel"] in ("_linear_tma_kernel", "_patch_embed_kernel"))
    assert all(f["tma"] for f in facts.values() if f["kernel"] == "_linear_tma_kernel")
    assert record["triton"] and record["device_kind"] == "cpu"


def test_stand_in_driver_refuses_the_interpreter():
    """Under TRITON_INTERPRET=1 (this process) the kernels are Python functions: nothing to compile."""
    from vitfast import runtime
    from vitfast.bench import host_driver

    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        host_driver.activate()
    assert not runtime.stand_in_driver_active()
