"""What the tests share: the device, the dtypes under test, and the three-way parity rule."""
import torch

from vitfast import runtime
from vitfast.testing import assert_parity, parity  # noqa: F401  (the one parity helper)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter computes bf16 tl.dot wrongly and has no bf16 NumPy type: bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
DTYPE_IDS = [str(d).replace("torch.", "") for d in DTYPES]


def require_triton_path() -> None:
    """Kernel tests assert they run the kernel; a test passing on the fallback would prove nothing."""
    backend = runtime.backend_name(DEVICE)
    assert backend in ("triton", "triton-interpreter"), f"kernels are not running (backend: {backend})"


def layouts(t: torch.Tensor, stride0: bool = True):
    """``(name, tensor)``: ``t``'s values in other memory layouts, each a fresh leaf that requires grad
    when ``t`` does, so a kernel that ignores a stride reads the wrong values and its test fails.

    * "contiguous";
    * "strided": every other element of a buffer twice as long along the last dimension, the elements
      between them NaN (a slice ``[..., ::2]``);
    * "stride0": the first value along the last dimension broadcast with ``expand`` (stride 0), when
      ``stride0`` and the last dimension has more than one element; other values than ``t``'s, so
      compare against references computed from the yielded tensor;
    * "transposed": the last two dimensions stored transposed (for tensors of 2 or more dimensions).
    """
    def leaf(v: torch.Tensor) -> torch.Tensor:
        return v.detach().requires_grad_(t.requires_grad)

    yield "contiguous", leaf(t.contiguous())
    gap = float("nan") if t.is_floating_point() else 0
    strided = torch.full((*t.shape[:-1], 2 * t.shape[-1]), gap, dtype=t.dtype, device=t.device)[..., ::2]
    strided.copy_(t)
    yield "strided", leaf(strided)
    if stride0 and t.shape[-1] > 1:
        yield "stride0", leaf(t[..., :1].expand(t.shape))
    if t.dim() >= 2:
        yield "transposed", leaf(t.mT.contiguous().mT)


def _assign_data(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    getattr(module, name).data = value.clone()


def _new_parameter(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, torch.nn.Parameter(value.clone()))


def _copy_under_no_grad(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    with torch.no_grad():
        getattr(module, name).copy_(value)


# The ways code changes a module's parameter after it has run (EMA updates, checkpoint loaders,
# pruning, weight surgery): ``edit(module, parameter name, new value)``. Only some bump the tensor's
# version counter, so a cache keyed on it misses the others.
PARAMETER_EDITS = {
    "copy_": _copy_under_no_grad,
    "data.copy_": lambda m, n, v: getattr(m, n).data.copy_(v),
    "data =": _assign_data,
    "new Parameter": _new_parameter,
    "load_state_dict": lambda m, n, v: m.load_state_dict({**m.state_dict(), n: v}),
}


def _zero_output(module, args, output):
    return output * 0


def _zero_input(module, args):
    return (args[0] * 0, *args[1:])


# The hooks code registers on a submodule to read or steer it (feature extraction, attention-map
# capture, activation patching): ``register(module, calls)`` returns the handle; each hook appends to
# ``calls`` when it fires and changes the module's result, so a bypassed hook changes the output.
HOOKS = {
    "forward": lambda m, calls: m.register_forward_hook(lambda *a: calls.append(1) or _zero_output(*a)),
    "forward_pre": lambda m, calls: m.register_forward_pre_hook(lambda *a: calls.append(1) or _zero_input(*a)),
    "forward_with_kwargs": lambda m, calls: m.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(1) or out * 0, with_kwargs=True),
}


def math_attention():
    """PyTorch's attention references through its math backend: on CUDA the memory-efficient kernel
    (fp32 with dropout) scales kept probabilities by 1/(1-p), which at p = 1 makes inf · 0 = NaN where
    the math backend, like the CPU, gives zeros."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)
