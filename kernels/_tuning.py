"""The autotune switch shared by the kernels.

``VITFAST_AUTOTUNE=0`` gives one compile per kernel and shape instead of one per config: a kernel
whose autotuner has a pruner keeps its whole list and its pruner returns only the first config that
fits the shape (``pruned``, read at each call); the others cut their list to its first entry when the
module is imported (``configs``). Cutting a pruned kernel's list instead would skip its pruner, since
Triton prunes only when it has several configs: the GEMMs' first tile (128×256×64, 3 stages) needs
288 KiB of shared memory in fp32, more than a Hopper block has.
The GPU test suite uses it so that dozens of odd test shapes do not spend the GPU budget
autotuning; benchmarks and users keep the full lists.
"""
from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    """Whether kernels run in Triton's interpreter (CPU tensors, tests) rather than compiled. Read from
    the environment: kernels/ sits above vitfast.runtime in the layering. Launchers choose tiles by
    this, not by a tensor's device, so a stand-in driver can run the compiled path on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    return os.environ.get("VITFAST_AUTOTUNE", "1") != "0"


def configs(full: list[triton.Config]) -> list[triton.Config]:
    return full if autotune_enabled() else full[:1]


def pruned(kept: list[triton.Config]) -> list[triton.Config]:
    """What a pruner returns: every config it kept, or only the first when autotuning is off."""
    return kept if autotune_enabled() else kept[:1]
