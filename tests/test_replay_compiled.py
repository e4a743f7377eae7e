"""A settled call's replay with compiled kernels (vitfast/modules/_replay_steps.py): the generated launcher
code and the workspace layout, checked where CI can check them.

Numerically, CI checks the replay under Triton's interpreter (test_replay.py), which runs the same steps
over the same layout. What only compiled kernels run, the generated code that launches them with
addresses, is checked here against the checked path's own launches through the stand-in driver
(tests/replay_launch_check.py, in a process without TRITON_INTERPRET): same kernels, grids, constants
and pointers, buffers that keep their views' offsets and never overlap while alive."""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from vitfast.modules import _replay_steps
from vitfast.modules._replay_steps import pack, span_bytes

CHECK = Path(__file__).resolve().parent / "replay_launch_check.py"


@pytest.mark.parametrize("args, said", [
    (["timm", "reference"], ["the second call launched the same work"] * 2),
    (["--cublas", "reference"], ["the second call launched the same work", "cuBLAS tactic: "]),  # call steps
], ids=["fused", "cublas"])
def test_compiled_replays_launch_what_the_checked_path_launched(args, said, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    done = subprocess.run([sys.executable, str(CHECK), *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(done.stdout.count(s) == said.count(s) for s in said), done.stdout


def _overlap(a, b):
    return a[0] <= b[1] and b[0] <= a[1]


@pytest.mark.parametrize("seed", range(20))
def test_pack_never_overlaps_buffers_alive_at_once(seed):
    rng = random.Random(seed)
    buffers = []
    for _ in range(rng.randint(1, 12)):
        first = rng.randint(0, 10)
        buffers.append((first, first + rng.randint(0, 5), rng.randint(1, 5000)))
    buffers.sort(key=lambda b: b[0])
    offsets, total = pack(buffers)
    for i, (a, oa) in enumerate(zip(buffers, offsets)):
        assert oa % 256 == 0 and oa + a[2] <= total
        for b, ob in zip(buffers[i + 1:], offsets[i + 1:]):
            if _overlap(a, b):
                assert oa + a[2] <= ob or ob + b[2] <= oa, (a, oa, b, ob)
    assert total <= sum(-(-b[2] // 256) * 256 for b in buffers)


def test_a_vit_blocks_workspace_is_its_peak():
    """LayerNorm, qkv, attention, the residual stream, LayerNorm, fc1 (a block's inner buffers, x = one
    activation): the most alive at once is the residual stream, the second LayerNorm and fc1, 6x."""
    x = 197 * 768 * 2  # a multiple of 256 bytes
    steps = [(0, 1, x), (1, 2, 3 * x), (2, 3, x), (3, 6, x), (4, 5, x), (5, 6, 4 * x)]
    assert pack(steps)[1] == 6 * x


def test_span_bytes():
    assert span_bytes((2, 3), (3, 1), 2) == 12 and span_bytes((2, 3), (1, 2), 4) == 24
    assert span_bytes((0, 5), (5, 1), 4) == 0 and span_bytes((4,), (2,), 2) == 14
    assert _replay_steps._contiguous((2, 1, 3), (3, 7, 1)) and not _replay_steps._contiguous((2, 3), (1, 2))
