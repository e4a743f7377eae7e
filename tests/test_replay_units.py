"""Settled calls of whole models (vitfast/modules/_replay.py, _plan.unit): a stand-in whose fused forward
calls children as modules (timm's VisionTransformer, the reference ViT and its encoder) replays the whole
call once nothing below it has a hook and every module its call reaches is a stand-in or a passive
torch module; a hook, a module whose forward a replay would skip, a stand-in running its original
forward or a changed setting below keeps it, or takes it back, to the checked path."""
import copy
import re
import warnings

import pytest
import torch
from torch import nn

import vitfast
from vitfast.modules import _replay
from helpers import DEVICE, require_triton_path
from test_optimize import _logits
from test_replay import _check, _images, _pair, replays  # noqa: F401 (a fixture: the replays run, in order)


def _settled(family):
    require_triton_path()
    model, fast = _pair(family)
    x = _images()
    with torch.no_grad():
        first = _logits(fast, x)
    return model, fast, x, first


def _root_replays(fast):
    return [r for r in fast._vitfast_plan.replays.values() if r is not None]


@pytest.mark.parametrize("family", ["timm", "reference"])
def test_a_whole_model_replays_as_one_call(family, replays):
    model, fast, x, first = _settled(family)
    assert not replays and len(_root_replays(fast)) == 1
    with torch.no_grad():
        again = _logits(fast, x)
    assert replays == _root_replays(fast)  # one replay: the model's, none of its blocks'
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    _check(model, fast, x)


def _blocks(fast):
    return fast.blocks if hasattr(fast, "blocks") else fast.encoder.layers


@pytest.mark.parametrize("family", ["timm", "reference"])
def test_a_hook_below_fires_and_its_removal_brings_the_replay_back(family, replays):
    model, fast, x, first = _settled(family)
    calls = []

    def doubled(module, args, out):
        calls.append(module)
        return out * 2.0

    handles = [_blocks(m)[1].register_forward_hook(doubled) for m in (model, fast)]
    _check(model, fast, x)
    with torch.no_grad():
        _logits(fast, x)
    assert calls.count(_blocks(fast)[1]) == 2 and len(replays) > 0
    assert all(r not in _root_replays(fast) for r in replays)  # the blocks without hooks replay alone
    for h in handles:
        h.remove()
    n = len(replays)
    with torch.no_grad():
        again = _logits(fast, x)
    assert replays[n:] == _root_replays(fast)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def _eps(m):
    _blocks(m)[1].norm1.eps = 0.5


def _weight(m):
    fc = _blocks(m)[0].mlp.fc1 if hasattr(m, "blocks") else _blocks(m)[0].linear1
    fc.weight = nn.Parameter(fc.weight.detach().flip(0) * -2.0)


def _final_norm(m):
    norm = m.norm if hasattr(m, "blocks") else m.encoder.layers[1].norm2
    with torch.no_grad():
        norm.bias.add_(1.0)


@pytest.mark.parametrize("change", [_eps, _weight, _final_norm], ids=["attribute", "weight", "in place"])
@pytest.mark.parametrize("family", ["timm", "reference"])
def test_a_change_below_records_the_model_again(family, change, replays):
    model, fast, x, _ = _settled(family)
    for m in (model, fast):
        change(m)
    _check(model, fast, x)  # recorded again, under the new state
    n = len(replays)
    with torch.no_grad():
        _logits(fast, x)
    assert replays[n:] == _root_replays(fast)
    _check(model, fast, x)


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def test_a_module_a_replay_would_skip_keeps_the_model_checked(replays):
    """A module of the user's between the stand-ins runs on every call: the model is not replayed
    past it, and says why; its blocks still replay."""
    model, fast = _pair("timm")
    require_triton_path()
    for m in (model, fast):
        m.norm_pre = _Counting()
    x = _images()
    with torch.no_grad():
        for _ in range(3):
            _logits(fast, x)
    assert fast.norm_pre.calls == 3
    assert fast._vitfast_plan.unit_reason == "norm_pre is a _Counting, whose forward a replay would skip"
    assert replays and not _root_replays(fast)
    _check(model, fast, x)


def test_a_stand_in_with_a_forward_of_its_own_keeps_the_model_checked(replays):
    model, fast, x, _ = _settled("timm")
    calls = []

    class Counted(type(fast.norm)):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)

    fast.norm.__class__ = Counted
    with torch.no_grad():
        _logits(fast, x), _logits(fast, x)
    assert len(calls) == 2 and "norm is a Counted with a forward of its own" == fast._vitfast_plan.unit_reason
    _check(model, fast, x)


def test_a_layer_running_its_original_forward_is_not_replayed():
    """A layer with a dropout switched on (in eval, under no_grad) runs PyTorch's own layer: the encoder's
    and the model's recordings see it and keep both on the checked path."""
    require_triton_path()
    model, fast = _pair("reference")
    for m in (model, fast):
        m.encoder.layers[0].dropout.p = 0.5
        m.encoder.layers[0].dropout.train()
    x = _images()
    with torch.no_grad():
        for _ in range(2):
            _logits(fast, x)
    assert not _root_replays(fast) and not _root_replays(fast.encoder)
    _check(model, fast, x)


def test_a_setting_a_stand_in_below_reads_is_in_the_model_key(replays):
    """The encoder reads PyTorch's fast-path switch (its nested-tensor path): a model settled with it on
    records again with it off."""
    _, fast, x, _ = _settled("reference")
    with torch.no_grad():
        _logits(fast, x)
    assert len(replays) == 1
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(not enabled)
    try:
        with torch.no_grad():
            _logits(fast, x)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
    assert len(replays) == 1 and len(_root_replays(fast)) == 2


def test_a_global_hook_keeps_the_model_checked(replays):
    model, fast, x, _ = _settled("timm")
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m)))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # each stand-in says once that it runs its original forward
            _logits(fast, x)
    finally:
        handle.remove()
    assert not replays and type(fast.blocks[0]) in seen
    _check(model, fast, x)


def test_timm_embedding_variants_run_in_one_launch():
    """No class token, a position table without the class row, and images of another size than the model
    was built for (its table then does not fit: timm's own code raises)."""
    from test_optimize import timm_vit, _randomize

    require_triton_path()
    for kwargs in (dict(class_token=False, global_pool="avg"), dict(no_embed_class=True)):
        model = _randomize(timm_vit(**kwargs)).to(DEVICE).eval()
        fast = vitfast.optimize(copy.deepcopy(model))
        assert type(fast).__name__ == "VisionTransformer" and fast._vitfast_unsupported() is None
        x = _images()
        with torch.no_grad(), vitfast.runtime.count_launches() as launches:
            _logits(fast, x)
        assert launches.get("patch_embed") == 1, launches
        _check(model, fast, x)
    loose = _randomize(timm_vit()).to(DEVICE).eval()
    loose.patch_embed.strict_img_size = False
    fast = vitfast.optimize(copy.deepcopy(loose))
    bigger = torch.randn(1, 3, 48, 48, device=DEVICE)
    with torch.no_grad(), pytest.raises(RuntimeError) as original:
        loose(bigger)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="position embedding of"), \
            pytest.raises(RuntimeError, match=re.escape(str(original.value))):
        fast(bigger)


def test_timm_models_with_register_tokens_keep_their_embedding():
    from test_optimize import timm_vit

    fast = vitfast.optimize(timm_vit(reg_tokens=2))
    skipped = {e.path: e.result for e in fast.vitfast_report.skipped}
    assert skipped[""].startswith("register tokens"), skipped
    assert type(fast.blocks[0]).__name__ == "Block" and hasattr(fast.blocks[0], "_vitfast_original")


def test_a_unit_that_did_not_replay_looks_below_again(monkeypatch, replays):
    """A module of the user's put in a model's blocks, then taken out again: the model replays again (it
    compares what is below it every few calls that found no replay)."""
    monkeypatch.setattr(_replay, "_LOOK_AGAIN", 2)
    model, fast, x, _ = _settled("timm")
    block = fast.blocks[1]
    fast.blocks[1] = _Counting()
    with torch.no_grad():
        for _ in range(3):
            _logits(fast, x)
    assert fast._vitfast_plan.unit_reason.startswith("blocks.1 is a _Counting")
    fast.blocks[1] = block
    with torch.no_grad():
        for _ in range(4):
            _logits(fast, x)
    assert fast._vitfast_plan.unit_reason is None and replays[-1] in _root_replays(fast)
    _check(model, fast, x)


def test_timm_methods_replaced_on_the_class_run_timms_forward(monkeypatch, replays):
    """The fused forward stands for _pos_embed and forward_features and calls forward_head: replaced on
    the class, before conversion or after the model settled, timm's forward runs (quietly)."""
    from timm.models.vision_transformer import VisionTransformer

    model, fast, x, _ = _settled("timm")
    for name in ("_pos_embed", "forward_head"):
        original = getattr(VisionTransformer, name)
        monkeypatch.setattr(VisionTransformer, name, lambda self, t, *a, _f=original, **k: _f(self, t, *a, **k) * 0.5)
        n = len(replays)
        _check(model, fast, x)
        assert all(r not in _root_replays(fast) for r in replays[n:])
        monkeypatch.setattr(VisionTransformer, name, original)
    model, fast = _pair("timm")
    monkeypatch.setattr(VisionTransformer, "forward_features", lambda self, t, *a, **k: torch.zeros(
        t.shape[0], 17, 64, device=t.device, dtype=t.dtype))
    assert fast._vitfast_unsupported() == "a method of VisionTransformer is replaced"
    _check(model, fast, x)


def test_timm_without_a_position_table_drops_nothing_at_positions():
    """timm applies pos_drop only after adding positions: without a table, none (in training too)."""
    from test_optimize import timm_vit, _randomize

    require_triton_path()
    model = _randomize(timm_vit(pos_embed="none", pos_drop_rate=0.9)).to(DEVICE).train()
    fast = vitfast.optimize(copy.deepcopy(model))
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(_logits(fast, x), _logits(model, x), rtol=1e-4, atol=1e-4)


def test_timm_hooks_on_the_patch_embedding_run_timms_forward_quietly(replays):
    model, fast, x, _ = _settled("timm")
    calls = []
    handle = fast.patch_embed.register_forward_hook(lambda m, a, out: calls.append(out.shape))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        _check(model, fast, x)
    assert len(calls) == 1 and not replays
    handle.remove()
    with torch.no_grad():
        _logits(fast, x)
    assert replays[-1] in _root_replays(fast)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_timm_model_traces_with_torch_jit_before_its_first_call():
    """The conversion check reads no tensor, so the tracer's check run sees the graph its first run saw."""
    model, fast = _pair("timm")
    x = _images()
    with torch.no_grad():
        traced = torch.jit.trace(fast, x)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-4)
