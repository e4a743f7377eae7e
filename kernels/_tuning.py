"""The autotune switch shared by the kernels.

``VITFAST_AUTOTUNE=0`` (read when a kernel module is imported) cuts every autotune list to its
first entry, which the pruners then fit to the shape: one compile per shape instead of one per
config. The GPU test suite uses it so that dozens of odd test shapes do not spend the GPU budget
autotuning; benchmarks and users keep the full lists.
"""
from __future__ import annotations

import os

import triton


def autotune_enabled() -> bool:
    return os.environ.get("VITFAST_AUTOTUNE", "1") != "0"


def configs(full: list[triton.Config]) -> list[triton.Config]:
    return full if autotune_enabled() else full[:1]
