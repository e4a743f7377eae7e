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
