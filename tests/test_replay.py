"""Settled calls (vitfast/modules/_replay.py): a stand-in's second call with the same signature replays
the launches its first call recorded, exactly; every change the per-call checks catch (weights,
``.data``, hooks, attributes, submodules, input shape, dtype, strides, alignment, autograd) takes
the checked path again, and the result is the changed model's."""
import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import vitfast
from vitfast import runtime
from vitfast.modules import _replay
from helpers import DEVICE, assert_parity, require_triton_path
from test_optimize import FAMILIES, IMG, _logits, _randomize


@pytest.fixture
def replays(monkeypatch):
    """The replays run during a test, in order."""
    ran = []
    run = _replay.Replay.run

    def counted(self, inputs, ptrs):
        ran.append(self)
        return run(self, inputs, ptrs)

    monkeypatch.setattr(_replay.Replay, "run", counted)
    return ran


def _pair(family="timm"):
    model = _randomize(FAMILIES[family][0]()).to(DEVICE).eval()
    return model, vitfast.optimize(copy.deepcopy(model))


def _images(batch=2, dtype=torch.float32):
    return torch.randn(batch, 3, IMG, IMG, device=DEVICE, dtype=dtype)


def _settled_pair():
    """A timm model, its optimized copy after two calls (recorded, then replayed) and the images."""
    require_triton_path()
    model, fast = _pair()
    x = _images()
    with torch.no_grad():
        fast(x), fast(x)
    return model, fast, x


def _check(model, fast, x):
    with torch.no_grad():
        ref = _logits(copy.deepcopy(model).double(), x.double())
        assert_parity(_logits(fast, x), _logits(model, x), ref)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_second_call_replays_the_first_exactly(family, replays):
    require_triton_path()
    model, fast = _pair(family)
    x = _images()
    with torch.no_grad(), runtime.count_launches() as first:
        recorded = _logits(fast, x)
    assert not replays
    with torch.no_grad(), runtime.count_launches() as second:
        replayed = _logits(fast, x)
    assert replays and first == second, (len(replays), first, second)
    torch.testing.assert_close(replayed, recorded, rtol=0, atol=0)
    _check(model, fast, x)


def test_whole_models_replay_and_hugging_face_layers_say_why_not(replays):
    """timm's model replays as one call; a Hugging Face layer packs its q, k and v weights with torch.cat
    on every call, which a replay would not redo, so it stays on the checked path."""
    require_triton_path()
    for family, module, settles in (("timm", "", True), ("huggingface", "vit.layers.0", False)):
        _, fast = _pair(family)
        with torch.no_grad():
            for _ in range(2):
                fast(_images())
        replays_held = list(fast.get_submodule(module)._vitfast_plan.replays.values())
        assert len(replays_held) == 1 and (replays_held[0] is not None) == settles, (family, replays_held)


def _replace_weight(m):
    fc1 = m.blocks[0].mlp.fc1
    fc1.weight = nn.Parameter(fc1.weight.detach().flip(0) * -2.0)


def _write_data(m):
    fc1 = m.blocks[0].mlp.fc1
    fc1.weight.data = fc1.weight.detach().flip(1) + 0.5  # new storage, same shape


def _transpose_data(m):  # same shape (square), other strides: a replay must not launch with the old ones
    proj = m.blocks[0].attn.proj
    proj.weight.data = proj.weight.data.t()


def _in_place(m):
    with torch.no_grad():
        m.blocks[1].mlp.fc2.weight.mul_(-2.0)


def _hook(m):
    m.blocks[0].mlp.fc1.register_forward_hook(lambda mod, args, out: out * 2.0)


def _eps(m):
    m.blocks[1].norm1.eps = 0.5


def _activation(m):
    m.blocks[0].mlp.act = nn.ReLU()


def _buffer(m):
    m.blocks[0].register_buffer("extra", torch.zeros(1))


CHANGES = {"weight replaced": _replace_weight, ".data written": _write_data, ".data transposed": _transpose_data,
           "in-place update": _in_place, "hook": _hook, "attribute": _eps, "submodule replaced": _activation,
           "buffer added": _buffer, "half precision": lambda m: m.half()}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_to_the_model_is_seen_after_replays(change, replays):
    model, fast, x = _settled_pair()
    assert replays
    for m in (model, fast):
        CHANGES[change](m)
    if change == "half precision":
        x = x.half()
    _check(model, fast, x)
    if change != "hook":  # the hook keeps the first block checked; the others settle again
        n = len(replays)
        with torch.no_grad():
            fast(x)
        assert len(replays) > n


INPUTS = {
    "batch": lambda x: torch.cat([x, x[:1]]),
    "strides": lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),
    "alignment": lambda x: torch.cat([x.new_zeros(1), x.flatten()])[1:].view(x.shape),  # data_ptr % 16 == 4
    "dtype": lambda x: x.half(),
}


@pytest.mark.parametrize("kind", list(INPUTS))
def test_a_new_input_signature_records_again(kind, replays):
    """The model records the new images' signature next to the old one, then replays each."""
    model, fast, x = _settled_pair()
    settled = len(replays)
    y = INPUTS[kind](_images())
    if kind == "dtype":
        model, fast = model.half(), fast.half()
    if kind == "alignment":
        assert y.data_ptr() % 16 != x.data_ptr() % 16
    _check(model, fast, y)
    assert len(replays) == settled  # recorded, not replayed
    with torch.no_grad():
        torch.testing.assert_close(_logits(fast, y), _logits(fast, y), rtol=0, atol=0)
        if kind != "dtype":  # after half(), the old signature's replay would find its parameters changed
            _logits(fast, x)
    assert len(replays) == settled + (2 if kind == "dtype" else 3)
    assert len(fast._vitfast_plan.replays) == 2


def test_a_layer_whose_dropout_is_switched_on_after_replays_declines_again(replays):
    """A layer in eval with a dropout put back in training runs PyTorch's own forward (its fast path drops
    nothing there); the settled call's memo of the layer's dropouts goes with its plan."""
    require_triton_path()
    from vitfast.modules.encoder import FastTransformerEncoderLayer

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True).to(DEVICE).eval()
    fast = FastTransformerEncoderLayer.from_torch(copy.deepcopy(layer))
    x = torch.randn(2, 5, 32, device=DEVICE)
    with torch.no_grad():
        fast(x), fast(x)
        assert len(replays) == 1
        for m in (layer, fast):
            m.dropout.p = 0.5
            m.dropout.train()
        torch.testing.assert_close(fast(x), layer(x), rtol=0, atol=0)
        assert len(replays) == 1


def test_autograd_takes_the_checked_path(replays):
    model, fast, x = _settled_pair()
    settled = len(replays)
    out = _logits(fast, x)
    assert out.requires_grad and len(replays) == settled
    out.sum().backward()
    assert fast.blocks[0].mlp.fc1.weight.grad is not None


def test_the_call_key_holds_everything_a_launch_depends_on():
    """Device and the switches the ops read are in the key (a second device is not at hand in CI)."""
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        key = _replay._key((x,), {}, ())
        assert key == _replay._key((x.clone(),), {}, ()) or x.data_ptr() % 16 != x.clone().data_ptr() % 16
        assert key[-1][4] == x.device and _replay._key((torch.empty(2, 5, 8, device="meta"),), {}, ()) is None
        assert key != _replay._key((x, x), {}, ()) != _replay._key((x, x.clone()), {}, ())
        assert key != _replay._key((x,), {"mask": None}, ()) and key != _replay._key((x,), {}, (True,))
        assert _replay._key((x, 1), {}, ()) != _replay._key((x, True), {}, ())
        tf32 = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = not tf32
            assert key != _replay._key((x,), {}, ())
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        assert _replay._key((x, [1]), {}, ()) is None  # containers: the checked path
        assert _replay._key((x.to_sparse(),), {}, ()) is None  # layouts other than strided: the checked path
        assert _replay._key((torch.nested.nested_tensor([x[0], x[1, :3]]),), {}, ()) is None
        with torch.autocast("cpu"):
            assert _replay._key((x,), {}, ()) is None
    assert _replay._key((x,), {}, ()) is None  # gradients on


def test_the_call_key_changes_when_configs_or_the_driver_may_have(monkeypatch):
    """Configs chosen again (a tuning session closed, ``reset``) and the stand-in driver turned on or off
    change what the checked path launches: a settled call recorded before is not replayed."""
    require_triton_path()
    from vitfast.kernels import _select

    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        key = _replay._key((x,), {}, ())
        _select.reset()
        assert _replay._key((x,), {}, ()) != key
        key = _replay._key((x,), {}, ())
        monkeypatch.setattr(runtime, "_stand_in_driver", not runtime._stand_in_driver)
        assert _replay._key((x,), {}, ()) != key


def test_replays_keep_no_tensor_of_the_recorded_call_alive():
    require_triton_path()
    _, fast = _pair()
    x = _images()
    alive = weakref.ref(x)
    with torch.no_grad():
        out = weakref.ref(fast(x))
        fast(x)
    del x
    gc.collect()
    assert alive() is None and out() is None


def test_an_empty_batch_replays_and_the_pytorch_fallback_records_nothing(monkeypatch, replays):
    require_triton_path()
    model, fast = _pair()
    with torch.no_grad():
        for _ in range(2):
            assert fast(_images(batch=0)).shape == (0, 10)
    model, fast = _pair()
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors now take the plain-PyTorch fallback
    for _ in range(2):
        _check(model, fast, _images())
    assert list(fast.blocks[0]._vitfast_plan.replays.values()) == [None]


def test_multihead_attention_replays_only_under_the_fast_path_setting_it_recorded():
    """With a bool mask and the causal hint, PyTorch drops the mask only off its native path, whose
    switch (``torch.backends.mha``) is part of the stand-in's call key."""
    require_triton_path()
    torch_mha = nn.MultiheadAttention(64, 4, batch_first=True).to(DEVICE).eval()
    fast = vitfast.modules.MultiheadAttention.from_torch(copy.deepcopy(torch_mha)).eval()
    x = torch.randn(2, 8, 64, device=DEVICE)
    mask = torch.rand(8, 8, device=DEVICE) > 0.7
    mask.fill_diagonal_(False)

    def call(m):
        return m(x, x, x, need_weights=False, attn_mask=mask, is_causal=True)[0]

    enabled = torch.backends.mha.get_fastpath_enabled()
    try:
        with torch.no_grad():
            for setting in (True, False, True):
                torch.backends.mha.set_fastpath_enabled(setting)
                for _ in range(2):
                    torch.testing.assert_close(call(fast), call(torch_mha), rtol=1e-4, atol=1e-5)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def test_the_profiler_sees_replays_and_the_ops():
    model, fast, x = _settled_pair()
    with torch.no_grad(), torch.profiler.profile() as prof:
        fast(x)
        vitfast.ops.layer_norm(x, torch.ones(IMG, device=DEVICE), None)
    names = {e.name for e in prof.events()}
    assert "vitfast::replay" in names and "vitfast::layer_norm_fwd" in names, names
