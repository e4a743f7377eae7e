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


def autotune_enabled() -> bool:
    return os.environ.get("VITFAST_AUTOTUNE", "1") != "0"


def configs(full: list[triton.Config]) -> list[triton.Config]:
    return full if autotune_enabled() else full[:1]


def pruned(kept: list[triton.Config]) -> list[triton.Config]:
    """What a pruner returns: every config it kept, or only the first when autotuning is off."""
    return kept if autotune_enabled() else kept[:1]
