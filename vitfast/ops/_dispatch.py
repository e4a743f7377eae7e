"""Which path a validated call takes: the Triton kernels, or PyTorch with one warning per reason."""
from __future__ import annotations

import threading

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


def custom_op(name: str, **options):
    """``torch.library.custom_op(name, **options)`` that also keeps the decorated function itself,
    for :func:`call`'s plain eager calls."""
    def register(fn):
        op = torch.library.custom_op(name, **options)(fn)
        op.vitfast_plain = fn
        return op
    return register


# The thread on which a stand-in records a forward for replay (vitfast/modules/_replay.py): its
# dispatch mode watches the plain calls' aten ops, and is the one mode that may be on that stack.
recording_thread: int | None = None


def call(op, *args):
    """Run the custom op ``op`` on ``args``. The dispatcher's layers (autograd, autocast, tracing,
    fake and functional tensors, torch.compile) cost tens of microseconds of host time per call;
    an eager call that needs none of them runs the op's function directly:

    * gradients off, or no argument that requires one;
    * no autocast on the arguments' device, no torch.compile, torch.jit tracing or torch.func
      transform, no torch function or dispatch mode (but the replay recorder's), no profiler (which
      shows each ``vitfast::`` op);
    * every tensor a plain ``torch.Tensor`` or ``nn.Parameter`` (no subclass: DTensor, FakeTensor).
    """
    watched = recording_thread is not None and recording_thread == threading.get_ident()
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._is_torch_function_mode_enabled()
            or torch._C._len_torch_dispatch_stack() != watched or torch.autograd.profiler._is_profiler_enabled
            or torch._C._functorch.maybe_current_level() is not None):
        return op(*args)
    grad = torch.is_grad_enabled()
    device = None
    for a in args:
        if isinstance(a, Tensor):
            if (type(a) is not Tensor and type(a) is not torch.nn.Parameter) or (grad and a.requires_grad):
                return op(*args)
            device = device or a.device
    if device is not None and torch.is_autocast_enabled(device.type):
        return op(*args)
    return op.vitfast_plain(*args)
