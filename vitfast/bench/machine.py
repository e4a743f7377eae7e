"""The machine a run measured on: GPU name, driver and library versions for the result files."""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess

import torch


def machine_info(device: torch.device) -> dict:
    """GPU name, driver and library versions for the result files."""
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    info = {"device_kind": device.type, "torch": torch.__version__, "triton": version("triton"),
            "timm": version("timm"), "cuda": torch.version.cuda, "python": platform.python_version()}
    if device.type != "cuda":
        return {**info, "gpu": f"none (CPU: {platform.processor() or platform.machine()})", "driver": None}
    driver = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {**info, "gpu": torch.cuda.get_device_name(device), "driver": driver}
