"""Host time a converted block spends deciding, per call, that its fused path may run.

Every call of a stand-in (``vitfast/modules/_fused.py``) re-verifies what could make the fused path
inexact: hooks on the submodules it bypasses, a submodule, parameter or attribute changed since its
last full check, the dropout sites, the inputs and weights. This is Python on the host, the same on
any machine, and it adds to every block's launch overhead (at small batch, outside CUDA graphs).
Measured per family on a ViT block of the tests' tiny configuration (the checks do not depend on
the width): the cached-plan check alone, and everything the block does before its first launch.
"""
import copy
import sys
from pathlib import Path

import pytest
import torch

import vitfast
from vitfast.modules._block_checks import block_input_reason
from vitfast.modules._fused import Fused

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_optimize import FAMILIES, WIDTH, _randomize  # noqa: E402

ROUNDS = dict(warmup_rounds=100, rounds=2000, iterations=1)


def _block(family: str) -> torch.nn.Module:
    model = vitfast.optimize(copy.deepcopy(_randomize(FAMILIES[family][0]()).eval()))
    block = next(m for m in model.modules() if isinstance(m, Fused) and hasattr(m, "_weights"))
    assert block._vitfast_check() is None
    return block


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plan_check(benchmark, family):
    block = _block(family)
    benchmark.pedantic(block._vitfast_check, **ROUNDS)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_everything_before_the_first_launch(benchmark, family):
    block = _block(family)
    x = torch.randn(2, 17, WIDTH)

    def decide():
        assert block._vitfast_check() is None and not block._vitfast_declines(x)
        assert block_input_reason(x, block._weights()) is None

    benchmark.pedantic(decide, **ROUNDS)
