"""vitfast.modules.Linear: nn.Linear on vitfast's GEMM (a ViT's head), the same parameters and state_dict,
PyTorch's own forward and error for what the kernel does not take."""
import copy

import pytest
import torch
from torch import nn

from vitfast import runtime
from vitfast.modules import Linear
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, require_triton_path


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(3, 48), (48,), (2, 5, 48), (1, 48)], ids=["batch", "vector", "tokens", "one"])
def test_linear_matches_nn_linear(shape, dtype):
    require_triton_path()
    torch.manual_seed(0)
    plain = nn.Linear(48, 10).to(DEVICE)
    fast = Linear.from_torch(copy.deepcopy(plain)).to(dtype)
    x = torch.randn(*shape, device=DEVICE)
    with torch.no_grad(), runtime.count_launches() as launches:
        out = fast(x.to(dtype))
    assert launches.get("linear") == 1, launches
    with torch.no_grad():
        assert_parity(out, plain.to(dtype)(x.to(dtype)), plain.double()(x.double()))


def test_linear_keeps_the_state_dict_and_shares_the_weights():
    plain = nn.Linear(8, 3)
    fast = Linear.from_torch(plain)
    assert fast.weight is plain.weight and fast.bias is plain.bias
    other = Linear(8, 3, bias=True)
    other.load_state_dict(plain.state_dict())
    nn.Linear(8, 3).load_state_dict(other.state_dict())
    assert list(other.state_dict()) == ["weight", "bias"] and isinstance(other, nn.Linear)


def test_linear_without_bias_and_with_gradients():
    require_triton_path()
    torch.manual_seed(0)
    plain = nn.Linear(16, 4, bias=False).to(DEVICE)
    fast = Linear.from_torch(copy.deepcopy(plain))
    x = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    fast(x).square().sum().backward()
    grad_x, x.grad = x.grad, None
    plain(x).square().sum().backward()
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad)


def test_linear_bad_input_raises_pytorchs_error():
    fast = Linear(16, 4).to(DEVICE)
    for x in (torch.randn(3, 15, device=DEVICE), torch.randn(3, 16, device=DEVICE, dtype=torch.float64)):
        with pytest.raises(RuntimeError) as original:
            nn.Linear.forward(fast, x)
        with pytest.warns(RuntimeWarning, match="running Linear's own forward"), \
                pytest.raises(RuntimeError, match=str(original.value)[:20]):
            fast(x)


def test_linear_float64_under_autocast_raises_pytorchs_error():
    fast = Linear(16, 4).to(DEVICE)
    x = torch.randn(3, 16, device=DEVICE, dtype=torch.float64)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        with pytest.raises(RuntimeError) as original:
            nn.Linear.forward(fast, x)
        with pytest.raises(RuntimeError, match=str(original.value)[:20]):
            fast(x)
