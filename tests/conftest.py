"""Fixtures every vitfast test uses: one seed per test and poisoned (NaN) kernel outputs."""
import pytest
import torch

from vitfast import runtime


@pytest.fixture(autouse=True)
def _seed_and_poison():
    torch.manual_seed(0)
    with runtime.poison_outputs():
        yield
