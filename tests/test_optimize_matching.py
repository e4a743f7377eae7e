"""optimize converts a module only when it is exactly what the fused path computes.

Regressions from an adversarial pass: timm blocks that merely share the class name ``Block``, or hold
another attention or MLP, were converted and ran as plain attention (a wrong answer) or crashed; a
LayerNorm with eps=0 was converted and then raised. Each model here runs before optimize, so it must
run after it, with the same result within the three-way bound.
"""
import copy
import threading

import pytest
import torch
from torch import nn

import vitfast
from vitfast import runtime
from vitfast.convert.timm import FusedTimmBlock
from helpers import DEVICE, assert_parity
from test_optimize import DEPTH, HEADS, IMG, PATCH, WIDTH, _randomize, timm_vit

TINY = dict(img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=10)


def _timm(name):
    import timm

    if name == "diff-attention":
        return timm_vit(attn_layer="diff")
    if name == "qk-norm":
        return timm_vit(qk_norm=True)
    if name == "beit":
        return timm.models.beit.Beit(**TINY, use_shared_rel_pos_bias=True, use_abs_pos_emb=False, init_values=0.1)
    if name == "convit":
        return timm.models.convit.ConVit(**TINY, local_up_to_layer=1)
    if name == "twins":
        return timm.models.twins.Twins(img_size=IMG, patch_size=4, embed_dims=(32, 64), num_heads=(1, 2),
                                       mlp_ratios=(2, 2), depths=(1, 1), sr_ratios=(2, 1), wss=(2, 2), num_classes=10)
    assert name == "sam"
    return timm.models.vision_transformer_sam.VisionTransformerSAM(
        **TINY, window_size=2, global_attn_indexes=(1,), global_pool="avg", use_rel_pos=True, ref_feat_shape=(4, 4))


def _three_way(model, x):
    model = _randomize(model).to(DEVICE).eval()
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        pt = model(x)
        fast = vitfast.optimize(copy.deepcopy(model))
        with runtime.count_launches() as launches:
            out = fast(x)
    assert_parity(out, pt, ref)
    return fast, launches


@pytest.mark.parametrize("name", ["diff-attention", "qk-norm", "beit", "convit", "twins", "sam"])
def test_timm_lookalike_blocks_are_left_alone_and_run(name):
    fast, launches = _three_way(_timm(name), torch.randn(2, 3, IMG, IMG, device=DEVICE))
    assert "attention" not in launches, "no block of these models is the plain timm Block the kernels compute"
    assert not any(isinstance(m, FusedTimmBlock) for m in fast.modules())


def test_timm_block_with_other_attention_is_reported():
    fast, _ = _three_way(_timm("diff-attention"), torch.randn(1, 3, IMG, IMG, device=DEVICE))
    reasons = [e.result for e in fast.vitfast_report.skipped if e.path.startswith("blocks.")]
    assert len(reasons) == DEPTH and all("not timm's Attention" in r for r in reasons), fast.vitfast_report


def test_subclass_of_a_known_block_is_not_converted():
    """A user's subclass may override forward: only the exact class is converted."""
    from timm.models.vision_transformer import Block

    class Doubled(Block):
        def forward(self, x, attn_mask=None, is_causal=False):
            return 2 * super().forward(x)

    model = nn.Sequential(Doubled(WIDTH, HEADS, qkv_bias=True))
    fast, launches = _three_way(model, torch.randn(2, 17, WIDTH, device=DEVICE))
    assert type(fast[0]) is Doubled and "attention" not in launches


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_layer_norm_eps_zero_is_converted_and_runs(eps):
    fast, launches = _three_way(nn.Sequential(nn.LayerNorm(WIDTH, eps=eps)), torch.randn(3, 5, WIDTH, device=DEVICE))
    assert launches.get("layer_norm") == 1 and isinstance(fast[0], vitfast.modules.LayerNorm)


def test_float64_model_runs_pytorch_code():
    model = _randomize(timm_vit()).to(DEVICE).eval().double()
    fast = vitfast.optimize(copy.deepcopy(model))
    x = torch.randn(2, 3, IMG, IMG, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-10, atol=1e-10)


def test_global_module_hooks_step_aside():
    model = _randomize(timm_vit()).to(DEVICE).eval()
    fast = vitfast.optimize(copy.deepcopy(model))
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    try:
        with torch.no_grad(), runtime.count_launches() as launches:
            fast(torch.randn(1, 3, IMG, IMG, device=DEVICE))
    finally:
        handle.remove()
    assert "attention" not in launches and "Linear" in seen, "every module's hook fired, so none was bypassed"
    assert launches.get("layer_norm", 0) > 0, "a LayerNorm bypasses no submodule: it stays fused"


def test_two_threads_share_one_model():
    """The interpreter's state is global; vitfast serialises its launches, so threads get right answers."""
    model = _randomize(timm_vit()).to(DEVICE).eval()
    fast = vitfast.optimize(copy.deepcopy(model))
    inputs = [torch.randn(1, 3, IMG, IMG, device=DEVICE) for _ in range(4)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    results, errors = [None] * len(inputs), []

    def run(i):
        try:
            with torch.no_grad():
                results[i] = fast(inputs[i])
        except Exception as e:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for out, exp in zip(results, expected):
        torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-4)
