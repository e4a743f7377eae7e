"""Where the kernels run: in Triton's interpreter or compiled, and for which GPU.

Launch configs come from rules (``_configs``) or tuned picks (``_tuned``), chosen per launch by
``_select``; ``VITFAST_AUTOTUNE``, which switched Triton's autotuners off, is gone with them.
"""
from __future__ import annotations

import functools
import os

import torch
import triton

# The device name and architecture of launches that run in Triton's interpreter.
INTERPRETER = "Triton interpreter"


def interpreting() -> bool:
    """Whether kernels run in Triton's interpreter (CPU tensors, tests) rather than compiled. Read from
    the environment: kernels/ sits above vitfast.runtime in the layering. Launchers choose tiles by
    this, not by a tensor's device, so a stand-in driver can run the compiled path on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def device_facts(device: int) -> tuple[str, int | str]:
    """(name, architecture) of the device whose tensors a launch takes (``Tensor.get_device()``, -1 for
    CPU tensors). The name keys the tuned-picks file; the architecture, Triton's target (90 for sm_90),
    keys the rules. Under the interpreter both are ``INTERPRETER``; for CPU tensors compiled through a
    stand-in driver (host-time measurements) the name is the target's."""
    if interpreting():
        return INTERPRETER, INTERPRETER
    target = triton.runtime.driver.active.get_current_target()
    name = torch.cuda.get_device_name(device) if device >= 0 else f"{target.backend} {target.arch} (no device)"
    return name, target.arch
