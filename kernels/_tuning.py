"""Where the kernels run: in Triton's interpreter or compiled, and for which GPU.

Launch configs come from rules (``_configs``), chosen per launch by ``_select``;
``VITFAST_AUTOTUNE``, which switched Triton's autotuners off, is gone with them.
"""
from __future__ import annotations

import functools
import os

import triton


def interpreting() -> bool:
    """Whether kernels run in Triton's interpreter (CPU tensors, tests) rather than compiled. Read from
    the environment: kernels/ sits above vitfast.runtime in the layering. Launchers choose tiles by
    this, not by a tensor's device, so a stand-in driver can run the compiled path on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def device_arch(device: int) -> int | str:
    """The architecture the rules choose for, for launches on the device of ``Tensor.get_device()``
    (-1 for CPU tensors, which a stand-in driver may compile for): Triton's current target, 90 for
    sm_90. Launches run on the current device, so that is the tensors' device."""
    return triton.runtime.driver.active.get_current_target().arch
