"""Which path a validated call takes: the Triton kernels, or PyTorch with one warning per reason."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import runtime


def kernel_path(op: str, main: Tensor, *others: Tensor | None, dot: bool = True) -> bool:
    """Whether the Triton kernels can take a call on ``main``'s device with these tensors.

    A valid call that the kernels cannot compute exactly takes PyTorch, warned once per op and reason:

    * float64 anywhere: the kernels compute in fp32, PyTorch keeps float64;
    * a bfloat16 ``main`` on CPU tensors when the kernel feeds it to ``tl.dot`` (``dot``): Triton's
      interpreter computes bf16 dots wrongly (ENVIRONMENT.md).
    """
    if not runtime.use_triton(main):
        return False
    if any(t is not None and t.dtype == torch.float64 for t in (main, *others)):
        runtime.warn_once(f"{op}:float64", f"vitfast.{op}: float64 inputs; the kernels compute in fp32, "
                                           f"so PyTorch computes this call in float64")
        return False
    # On CPU tensors the kernels run in the interpreter unless the stand-in driver compiles them as for a GPU.
    if dot and main.dtype == torch.bfloat16 and main.device.type == "cpu" and not runtime.stand_in_driver_active():
        runtime.warn_once(f"{op}:interpreter-bf16", f"vitfast.{op}: bfloat16 under Triton's interpreter, "
                                                    f"whose bf16 dots are wrong; using PyTorch")
        return False
    return True
