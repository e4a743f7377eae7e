"""The tuned-picks file and the tuning session, on the CPU: the file's round trip into a launcher, its
rejection (stale, foreign, corrupt: one warning each, never an exception), and the session's choice
and saving with a fake timer. Launches run one small GEMM in the interpreter, whose tuned-picks file
is the one of the device named ``Triton interpreter``."""
import json
import warnings

import pytest
import torch
import triton
from triton.runtime.errors import OutOfResources

import vitfast.tuning
from vitfast.kernels import _configs, _select, _tuned, linear
from vitfast.kernels._tuning import INTERPRETER, interpreting

M, N, K = 17, 24, 42
# What linear_fwd makes of an fp32 [17, 42] x [24, 42]ᵀ launch, and of [40, 42] x [24, 42]ᵀ: the pointer
# kernel's (rows of 168 bytes are no multiple of 16, so the descriptor kernel cannot take them).
KEY = _configs.GemmKey(32, N, K, torch.float32, torch.float32, True, True, "ieee", "none", False, False, False)
PICK = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}, num_warps=2, num_stages=1)


@pytest.fixture(autouse=True)
def _tuning_file(tmp_path, monkeypatch):
    """A fresh tuned-picks file, and exact fp32 products: KEY's precision is "ieee"."""
    assert interpreting(), "these tests launch in the interpreter"
    monkeypatch.setenv("VITFAST_TUNING_FILE", str(tmp_path / "picks.json"))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    _select.reset()
    yield tmp_path / "picks.json"
    _select.reset()
    torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture
def launches(monkeypatch):
    """The launch keywords of every linear launch."""
    seen = []

    def spy(fn, grid, args, meta):
        seen.append(meta)
        fn[grid](*args, **meta)
    monkeypatch.setattr(linear, "launch", spy)
    return seen


def _run_linear(rows: int = M) -> None:
    x = torch.randn(rows, K)
    w = torch.randn(N, K)
    y = torch.full((rows, N), float("nan"))
    linear.linear_fwd(x, w, None, None, "none", y)
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)


def _tiles(meta: dict) -> tuple:
    return tuple(meta[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))


def _doc(**changes) -> dict:
    doc = {"schema": _tuned.SCHEMA, "gpu": INTERPRETER, "triton": triton.__version__,
           "kernels": {"linear": {"source": _tuned.source_hash(linear.LINEAR.fn), "picks": {
               _configs.key_text(KEY): {**PICK.kwargs, "num_warps": PICK.num_warps, "num_stages": PICK.num_stages}}}}}
    return {**doc, **changes}


def test_saved_picks_come_back_to_a_launcher(_tuning_file, launches):
    _tuned.save(_tuning_file, INTERPRETER, {"linear": _tuned.KernelPicks(
        _tuned.source_hash(linear.LINEAR.fn), {_configs.key_text(KEY): _tuned.Pick(PICK, 0.25)})})
    assert json.loads(_tuning_file.read_text()) == _doc(kernels={"linear": {
        **_doc()["kernels"]["linear"], "picks": {_configs.key_text(KEY): {**_doc()["kernels"]["linear"]["picks"][
            _configs.key_text(KEY)], "ms": 0.25}}}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", _tuned.TuningFileWarning)
        _run_linear()
        _run_linear(40)  # another key (M bucket 64): no pick, the interpreter's tile
    assert _tiles(launches[0]) == (16, 16, 16, 2, 1)
    assert _tiles(launches[1]) == (64, 64, 32, 4, 1)


REJECTED = {
    "stale": (_doc(kernels={"linear": {**_doc()["kernels"]["linear"], "source": "0" * 64}}), "kernel changed"),
    "other gpu": (_doc(gpu="NVIDIA H100 80GB HBM3"), "tuned on NVIDIA H100"),
    "other triton": (_doc(triton="0.0.1"), "Triton 0.0.1"),
    "not json": ("{\"schema\": 1, \"gpu\": ", "is not JSON"),
    "other schema": (_doc(schema=99), "schema 99"),
    "wrong fields": (_doc(kernels={"linear": {"source": "x", "picks": {
        "k": {"BLOCK_M": "64", "num_warps": 4, "num_stages": 1}}}}), "positive integer"),
    "other constexprs": (_doc(kernels={"linear": {**_doc()["kernels"]["linear"], "picks": {
        _configs.key_text(KEY): {"BLOCK_Q": 16, "num_warps": 4, "num_stages": 1}}}}), "the kernel takes"),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_rejected_file_warns_once_and_the_rule_chooses(case, _tuning_file, launches):
    content, words = REJECTED[case]
    _tuning_file.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.warns(_tuned.TuningFileWarning) as caught:
        _run_linear()
        _run_linear(40)
    caught = [str(w.message) for w in caught if w.category is _tuned.TuningFileWarning]
    assert len(caught) == 1 and words in caught[0] and str(_tuning_file) in caught[0]
    assert [_tiles(m) for m in launches] == [(64, 64, 32, 4, 1)] * 2


def test_tuning_session_times_candidates_keeps_the_fastest_and_saves_it(_tuning_file, launches):
    """Two candidates fit the key (64×64×64 and 64×64×32, 5 stages): the fake timer says the first is
    faster and that the second does not fit; the session launches and saves the first."""
    def timer(launch):
        launch()
        if launches[-1]["BLOCK_K"] == 32:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return 0.5

    with vitfast.tuning.tune(timer) as session:
        _run_linear()
        _run_linear()  # measured once per key and session
    # The two candidates, the site's tactics measured (the fused one launches once, cuBLAS launches no
    # linear kernel), then the fused tactic and, on the second call, its remembered pick.
    assert [_tiles(m) for m in launches] == [(64, 64, 64, 4, 5), (64, 64, 32, 4, 5), (64, 64, 64, 4, 5),
                                             (64, 64, 64, 4, 5), (64, 64, 64, 4, 5)]
    assert session.written == [_tuning_file]
    saved = json.loads(_tuning_file.read_text())["kernels"]["linear"]["picks"]
    assert saved == {_configs.key_text(KEY): {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8,
                                            "num_warps": 4, "num_stages": 5, "ms": 0.5}}
    vitfast.tuning.forget()
    _run_linear()  # a fresh reader: the saved pick
    assert _tiles(launches[-1]) == (64, 64, 64, 4, 5)


def test_tuning_without_cuda_or_timer_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        with vitfast.tuning.tune():
            pass


def test_tune_command_without_cuda_says_so(monkeypatch):
    from vitfast.__main__ import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="python -m vitfast tune: timing kernels needs a CUDA device"):
        main(["tune", "--model", "vit_tiny", "--batch", "1"])


def test_tuning_file_location(tmp_path, monkeypatch):
    monkeypatch.delenv("VITFAST_TUNING_FILE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _tuned.default_path("NVIDIA H100 80GB HBM3") == tmp_path / "vitfast" / "tuning-nvidia-h100-80gb-hbm3.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _tuned.default_path("NVIDIA H200") == tmp_path / ".cache" / "vitfast" / "tuning-nvidia-h200.json"
