"""FastTransformerEncoderLayer / FastTransformerEncoder against PyTorch's own modules."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitfast
from vitfast import runtime
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, require_triton_path

D, HEADS, N, B = 32, 2, 9, 3


def _layer(norm_first=False, batch_first=True, activation="gelu", bias=True, dropout=0.0, eps=1e-5):
    layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=48, dropout=dropout, activation=activation,
                                       batch_first=batch_first, norm_first=norm_first, bias=bias,
                                       layer_norm_eps=eps)
    with torch.no_grad():  # non-trivial norms, so a swapped weight and bias would show
        for norm in (layer.norm1, layer.norm2):
            norm.weight.normal_(1.0, 0.3)
            if norm.bias is not None:
                norm.bias.normal_(0.0, 0.3)
    return layer.to(DEVICE)


def _masks(kind, dtype):
    """(src_mask, src_key_padding_mask, is_causal) of one kind; no query row is fully masked."""
    if kind == "none":
        return None, None, False
    if kind == "padding":
        kpm = torch.zeros(B, N, dtype=torch.bool, device=DEVICE)
        kpm[0, -3:] = True
        kpm[2, -1:] = True
        return None, kpm, False
    if kind == "padding-float":
        kpm = torch.zeros(B, N, dtype=dtype, device=DEVICE)
        kpm[1, -4:] = float("-inf")
        return None, kpm, False
    if kind == "bool":
        mask = torch.rand(N, N, device=DEVICE) < 0.3
        mask.fill_diagonal_(False)
        return mask, None, False
    if kind == "float":
        return torch.randn(N, N, device=DEVICE, dtype=dtype), None, False
    if kind == "causal":
        return nn.Transformer.generate_square_subsequent_mask(N, device=DEVICE, dtype=dtype), None, True
    if kind == "bool+padding":
        mask, _, _ = _masks("bool", dtype)
        return mask, _masks("padding", dtype)[1], False
    raise ValueError(kind)


def _x(batch_first, dtype):
    shape = (B, N, D) if batch_first else (N, B, D)
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


@contextlib.contextmanager
def _fastpath(enabled):
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(old)


def _compare(module_ref, module_fast, x, dtype, call, train=False, expect_kernels=True, ref_slow_path=True):
    """Three-way: module_ref in float64 (ref), in dtype (pt); module_fast in dtype (out)."""
    ref_mod = copy.deepcopy(module_ref).double()
    pt_mod = copy.deepcopy(module_ref).to(dtype)
    module_fast = module_fast.to(dtype)
    for m in (ref_mod, pt_mod, module_fast):
        m.train(train)
    with torch.no_grad():
        # PyTorch's fused CPU fast path returns NaN with a float src_mask (fp32 and fp64): the references
        # take the composite path, which is the layer's definition anyway.
        with _fastpath(not ref_slow_path):
            ref = call(ref_mod, x.double(), torch.float64)
            pt = call(pt_mod, x, dtype)
        with runtime.count_launches() as launches:
            out = call(module_fast, x, dtype)
    if expect_kernels:
        assert launches.get("attention", 0) >= 1 and launches.get("linear", 0) >= 1, launches
    assert_parity(out, pt, ref)
    return out


def _layer_call(mask_kind):
    def call(mod, x, dtype):
        mask, kpm, is_causal = _masks(mask_kind, dtype)
        return mod(x, src_mask=mask, src_key_padding_mask=kpm, is_causal=is_causal)
    return call


def _seeded(fn):
    """Each call draws the same masks: reseed so ref, pt and out see identical inputs."""
    def call(mod, x, dtype):
        torch.manual_seed(1234)
        return fn(mod, x, dtype)
    return call


@pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bnd", "nbd"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "bool", "float"])
def test_layer_matches_torch(norm_first, batch_first, activation, mask_kind):
    require_triton_path()
    ref = _layer(norm_first, batch_first, activation)
    fast = vitfast.FastTransformerEncoderLayer.from_torch(copy.deepcopy(ref))
    _compare(ref, fast, _x(batch_first, torch.float32), torch.float32, _seeded(_layer_call(mask_kind)))


@pytest.mark.parametrize("mask_kind", ["padding-float", "causal", "bool+padding"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
def test_layer_more_masks(mask_kind, norm_first):
    ref = _layer(norm_first)
    fast = vitfast.FastTransformerEncoderLayer.from_torch(copy.deepcopy(ref))
    _compare(ref, fast, _x(True, torch.float32), torch.float32, _seeded(_layer_call(mask_kind)))


@pytest.mark.parametrize("activation", [F.gelu, F.relu], ids=["F.gelu", "F.relu"])
def test_layer_function_activations(activation):
    ref = _layer(False, True, activation)
    fast = vitfast.FastTransformerEncoderLayer.from_torch(copy.deepcopy(ref))
    _compare(ref, fast, _x(True, torch.float32), torch.float32, _seeded(_layer_call("none")))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
@pytest.mark.parametrize("mask_kind", ["none", "padding"])
def test_layer_dtypes(dtype, norm_first, mask_kind):
    ref = _layer(norm_first, True, "gelu")
    fast = vitfast.FastTransformerEncoderLayer.from_torch(copy.deepcopy(ref))
    _compare(ref, fast, _x(True, dtype), dtype, _seeded(_layer_call(mask_kind)))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
def test_layer_no_bias_and_eps(norm_first):
    ref = _layer(norm_first, True, "relu", bias=False, eps=1e-6)
    fast = vitfast.FastTransformerEncoderLayer.from_torch(copy.deepcopy(ref))
    _compare(ref, fast, _x(True, torch.float32), torch.float32, _seeded(_layer_call("none")))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
def test_layer_train_mode_without_dropout_uses_kernels(norm_first):
    ref = _layer(norm_first, dropout=0.0)
    fast = vitfast.FastTransformerEncoderLayer.from_torch(copy.deepcopy(ref))
    _compare(ref, fast, _x(True, torch.float32), torch.float32, _seeded(_layer_call("padding")), train=True)


def test_layer_train_mode_with_dropout_runs_the_kernels():
    """Dropout in training runs inside the kernels (tests/test_training_dropout.py proves each site):
    the same seed reproduces the output bit for bit, another seed drops other elements."""
    ref = _layer(dropout=0.1).train()
    fast = vitfast.FastTransformerEncoderLayer.from_torch(copy.deepcopy(ref)).train()
    x = _x(True, torch.float32)
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        with runtime.count_launches() as launches:
            outs.append(fast(x))
        assert launches.get("attention") == 1 and launches.get("mlp") == 1, launches
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    with torch.no_grad():
        assert not torch.equal(outs[0], fast.eval()(x)), "training drops"


def test_layer_unbatched_input():
    ref = _layer(True)
    fast = vitfast.FastTransformerEncoderLayer.from_torch(copy.deepcopy(ref))
    x = torch.randn(N, D, device=DEVICE)
    _compare(ref, fast, x, torch.float32, _seeded(_layer_call("none")))


def test_layer_constructor_and_state_dict_round_trip():
    fast = vitfast.FastTransformerEncoderLayer(D, HEADS, dim_feedforward=48, activation="gelu", batch_first=True)
    torch_layer = _layer()
    assert isinstance(fast, nn.TransformerEncoderLayer)
    assert list(fast.state_dict()) == list(torch_layer.state_dict())
    fast.load_state_dict(torch_layer.state_dict())
    back = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=48, batch_first=True)
    back.load_state_dict(fast.state_dict())
    for a, b in zip(back.state_dict().values(), torch_layer.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())


def test_from_torch_shares_weights():
    layer = _layer()
    fast = vitfast.FastTransformerEncoderLayer.from_torch(layer)
    assert fast.self_attn.in_proj_weight is layer.self_attn.in_proj_weight
    assert fast.norm1.weight is layer.norm1.weight
    assert type(layer) is nn.TransformerEncoderLayer and type(layer.norm1) is nn.LayerNorm


def test_layer_is_causal_needs_mask():
    fast = vitfast.FastTransformerEncoderLayer.from_torch(_layer()).eval()
    with pytest.raises(RuntimeError, match="is_causal"):
        fast(_x(True, torch.float32), is_causal=True)


def test_layer_bad_mask_dtype():
    fast = vitfast.FastTransformerEncoderLayer.from_torch(_layer()).eval()
    with pytest.raises(TypeError, match="src_key_padding_mask must be a bool or floating-point"):
        fast(_x(True, torch.float32), src_key_padding_mask=torch.zeros(B, N, dtype=torch.int64, device=DEVICE))


def _encoder(norm_first, batch_first=True, final_norm=True, layers=2):
    layer = _layer(norm_first, batch_first)
    norm = nn.LayerNorm(D).to(DEVICE) if final_norm else None
    return nn.TransformerEncoder(layer, num_layers=layers, norm=norm, enable_nested_tensor=not norm_first)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bnd", "nbd"])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal"])
def test_encoder_matches_torch(norm_first, batch_first, mask_kind):
    ref = _encoder(norm_first, batch_first, final_norm=norm_first)
    fast = vitfast.FastTransformerEncoder.from_torch(copy.deepcopy(ref))
    assert all(isinstance(l, vitfast.FastTransformerEncoderLayer) for l in fast.layers)

    def call(mod, x, dtype):
        mask, kpm, is_causal = _masks(mask_kind, dtype)
        return mod(x, mask=mask, src_key_padding_mask=kpm, is_causal=is_causal if mask_kind == "causal" else None)

    # The float64 reference keeps PyTorch's nested-tensor path, which zeroes padded positions.
    _compare(ref, fast, _x(batch_first, torch.float32), torch.float32, _seeded(call), ref_slow_path=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_encoder_dtypes_train_mode_no_dropout(dtype):
    ref = _encoder(False)
    fast = vitfast.FastTransformerEncoder.from_torch(copy.deepcopy(ref))
    _compare(ref, fast, _x(True, dtype), dtype, _seeded(lambda m, x, d: m(x)), train=True)


def test_encoder_state_dict_round_trip_and_constructor():
    ref = _encoder(False)
    fast = vitfast.FastTransformerEncoder(_layer(), num_layers=2, norm=nn.LayerNorm(D).to(DEVICE))
    assert isinstance(fast.norm, vitfast.modules.LayerNorm)
    assert list(fast.state_dict()) == list(ref.state_dict())
    fast.load_state_dict(ref.state_dict())
    again = _encoder(False)
    again.load_state_dict(fast.state_dict())
    x = _x(True, torch.float32)
    ref.eval(), fast.eval(), again.eval()
    with torch.no_grad():
        assert_parity(fast(x), ref(x), copy.deepcopy(ref).double()(x.double()))
        torch.testing.assert_close(again(x), ref(x))


class _UserLayer(vitfast.FastTransformerEncoderLayer):
    """A user's subclass that adds a method and changes nothing the forward reads."""

    def width(self) -> int:
        return self.linear1.in_features


class _DoubledFeedForward(vitfast.FastTransformerEncoderLayer):
    """A user's subclass that redefines a method of nn.TransformerEncoderLayer's forward."""

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class _TorchDoubledFeedForward(nn.TransformerEncoderLayer):
    _ff_block = _DoubledFeedForward._ff_block


@pytest.mark.parametrize("inside_encoder", [False, True], ids=["layer", "in-nn.TransformerEncoder"])
@pytest.mark.parametrize("cls", [vitfast.FastTransformerEncoderLayer, _UserLayer])
def test_jit_script_of_fast_layer_and_user_subclass(cls, inside_encoder):
    """torch.jit.script compiles PyTorch's forward for vitfast's layer and a user's subclass of it, alone
    or inside a plain nn.TransformerEncoder, and leaves the scripted model itself running the kernels."""
    require_triton_path()
    torch_layer = _layer(norm_first=True).eval()
    layer = cls.from_torch(torch_layer).eval()
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval() if inside_encoder else layer
    reference = (nn.TransformerEncoder(torch_layer, 2, enable_nested_tensor=False).eval() if inside_encoder
                 else torch_layer)
    x = _x(True, torch.float32)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        ref = copy.deepcopy(reference).double()(x.double())
        pt = reference(x)
        assert_parity(scripted(x), pt, ref)
        with runtime.count_launches() as launches:
            assert_parity(model(x), pt, ref)
    assert launches.get("attention") == (2 if inside_encoder else 1), launches
    layers = model.layers if inside_encoder else [model]
    assert all(type(m) is cls for m in layers)


def test_user_subclass_redefining_a_forward_method_runs_pytorch_forward():
    """The fused path skips _ff_block: a subclass that redefines it gets PyTorch's forward, with a warning,
    computing what its own definition says."""
    require_triton_path()
    torch_layer = _layer().eval()
    reference = copy.deepcopy(torch_layer)
    reference.__class__ = _TorchDoubledFeedForward
    layer = _DoubledFeedForward.from_torch(torch_layer).eval()
    x = _x(True, torch.float32)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="redefines TransformerEncoderLayer._ff_block"):
        with runtime.count_launches() as launches:
            out = layer(x)
        ref = copy.deepcopy(reference).double()(x.double())
        assert_parity(out, reference(x), ref)
    assert "attention" not in launches, launches
    scripted = torch.jit.script(layer)
    with torch.no_grad():
        assert_parity(scripted(x), reference(x), ref)
