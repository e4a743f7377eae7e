"""Run by test_replay_compiled.py in a process without TRITON_INTERPRET: a small optimized ViT through the
stand-in driver (vitfast.bench.host_driver), kernels compiled for sm_90. Its first call runs the checked
path (the JIT launches, with tensors) and records; its second replays (the generated launcher code, with
addresses). Both calls' launches must be the same work:

* the same kernels in the same order, the same grids, the same arguments but the pointers;
* every launch of the second call made by the model's own replay (the whole model settles as one call:
  ``_plan.unit``), so with addresses only;
* a parameter's and the image's pointers the same addresses;
* the pointers into the memory a call allocated keep the layout the first call had: two pointers into
  one buffer of the first call differ by the same bytes in the second, with the same alignment mod 16,
  and two buffers alive at once (between the first and last launch that uses each; a forward's output
  to the end) never overlap in the second call.

With ``--cublas`` every GEMM site runs its cuBLAS tactic (kernels/gemm_tactic.py): the products are aten
calls between the launches, and the second call must replay them too (its generated code's ``call``
steps).

Prints one line per model and exits 0, or raises AssertionError saying what differs.
    python tests/replay_launch_check.py timm reference
    python tests/replay_launch_check.py --cublas reference
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from vitfast.bench import host_driver, host_models  # noqa: E402

SHAPE = host_models.Shape(width=64, depth=2, heads=2, img_size=32, patch=8)  # 17 tokens: the resident attention


def _launches(drv, model, x) -> list:
    drv.trace = []
    with torch.inference_mode():
        out = model(x)
    trace, drv.trace = drv.trace, None
    return trace, out


def check(name: str) -> str:
    with host_driver.active() as drv:
        model = host_models.optimized(name, SHAPE)
        x = host_models.images(SHAPE, 2, torch.bfloat16)
        first, out = _launches(drv, model, x)  # keeps every tensor it launched with alive: no address reused
        second, _ = _launches(drv, model, x)
        fixed = {t.untyped_storage().data_ptr() for t in (x, *model.parameters(), *model.buffers())}
        assert len(first) == len(second) > 0, (len(first), len(second))
        buffers: dict[int, dict] = {}  # first call's storage -> its pointers and lifetime
        replayed = 0  # pointers the second call passed as addresses (a replay's)
        for i, ((k1, g1, a1), (k2, g2, a2)) in enumerate(zip(first, second)):
            assert k1 is k2 and g1 == g2 and len(a1) == len(a2), (i, k1.name, k2.name, g1, g2)
            for pos, (v1, v2) in enumerate(zip(a1, a2)):
                where = f"launch {i} ({k1.name}) argument {pos}"
                if not isinstance(v1, Tensor):
                    assert type(v1) is type(v2) and v1 == v2, (where, v1, v2)
                    continue
                if v1.numel() == 0:
                    assert isinstance(v2, Tensor) and v2.numel() == 0, (where, v2)
                    continue
                assert not isinstance(v2, Tensor), (where, "launched on the checked path: the model did not replay")
                replayed += 1
                storage = v1.untyped_storage()
                if storage.data_ptr() in fixed:
                    assert v2 == v1.data_ptr(), (where, "a parameter or the image moved")
                    continue
                assert v2 % 16 == v1.data_ptr() % 16, (where, "alignment")
                base = v2 - (v1.data_ptr() - storage.data_ptr())  # where the buffer starts in the second call
                buf = buffers.setdefault(storage.data_ptr(), {"base": base, "bytes": storage.nbytes(), "first": i})
                assert buf["base"] == base, (where, "a buffer's views moved apart")
                buf["last"] = i
        for o in (out if isinstance(out, tuple) else (out,)):
            if isinstance(o, Tensor) and o.untyped_storage().data_ptr() in buffers:
                buffers[o.untyped_storage().data_ptr()]["last"] = len(first)
        spans = sorted(buffers.values(), key=lambda b: b["base"])
        for a in spans:
            for b in spans:
                if a is not b and a["first"] <= b["last"] and b["first"] <= a["last"]:
                    assert a["base"] + a["bytes"] <= b["base"] or b["base"] + b["bytes"] <= a["base"], (
                        "two buffers alive at once overlap", a, b)
        assert replayed, "nothing was replayed"
        return (f"{name}: {len(first)} launches, {len(buffers)} buffers, {replayed} pointers replayed: the second "
                "call launched the same work")


def cublas_everywhere() -> list:
    """Every GEMM site on the cuBLAS tactic; the replays run from now on, listed as they run."""
    from vitfast.kernels import _configs, gemm_tactic, linear  # noqa: F401  (linear declares the tactics)
    from vitfast.modules import _replay_steps

    for tactic in gemm_tactic.TACTICS.values():
        tactic.rule = lambda arch, key: _configs._TACTICS[1]
    ran = []
    run = _replay_steps.Replay.run

    def counted(self, inputs, ptrs):
        ran.append(self)
        return run(self, inputs, ptrs)
    _replay_steps.Replay.run = counted
    return ran


if __name__ == "__main__":
    names = [a for a in sys.argv[1:] if a != "--cublas"]
    replays = cublas_everywhere() if "--cublas" in sys.argv else None
    for model_name in names or ["timm", "reference"]:
        print(check(model_name))
    if replays is not None:
        calls = sum(step[0] == "call" for replay in replays for step in replay.steps)
        assert replays and all(replay.compiled for replay in replays) and calls, (len(replays), calls)
        print(f"cuBLAS tactic: {len(replays)} compiled replays made {calls} cuBLAS calls between their launches")
