"""Repository-wide pytest setup, shared by tests/ and benchmarks/.

* Without CUDA, Triton's interpreter is switched on here, before anything imports ``triton``, so
  every kernel test really runs its kernel on the CPU.
* A skipped test that is not marked ``gpu`` fails the run: a test that skips because something is
  missing counts as missing.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and "gpu" not in item.keywords:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"non-gpu test skipped ({reason}); only tests marked gpu may skip"
