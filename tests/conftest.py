"""Fixtures every vitfast test uses: one seed per test and poisoned (NaN) kernel outputs; failures
written out as they happen when ``VITFAST_FAILURE_LOG`` names a file."""
import os

import pytest
import torch

from vitfast import runtime

# PyTorch's references in full fp32 on the GPU: cuDNN convolutions (the patch embedding's Conv2d)
# default to TF32 there, while vitfast's fp32 kernels follow torch.backends.cuda.matmul.allow_tf32,
# off by default. A TF32 reference would fail the fp32 comparisons for PyTorch's error, not vitfast's.
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed_and_poison():
    torch.manual_seed(0)
    with runtime.poison_outputs():
        yield


def pytest_runtest_logreport(report):
    """Append each failure's node id and the end of its traceback to ``VITFAST_FAILURE_LOG`` at once
    (gpu_suite.sh sets it): a GPU run cut short by its time limit still names what failed, and why.
    xdist workers leave it to the controller, which receives every worker's reports."""
    path = os.environ.get("VITFAST_FAILURE_LOG")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    tail = "\n".join(report.longreprtext.splitlines()[-25:])
    with open(path, "a") as f:
        f.write(f"FAILED {report.nodeid} ({report.when})\n{tail}\n\n")
