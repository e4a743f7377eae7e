"""optimize's contract: every call that worked on a model before works after, with the same result.

Each supported family is optimized, then used the ways the ecosystem uses a model beyond a plain
forward: hooks on submodules, a LoRA-style wrapper put in after conversion, gradient checkpointing,
training-mode fallbacks, timm's forward_intermediates, Hugging Face's recorded outputs, torch.jit.script,
torch.export, torch.fx, pickling. Each result is compared with the unmodified model's.
"""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import vitfast
from vitfast import runtime
from helpers import DEVICE, HOOKS, assert_parity
from test_optimize import DEPTH, FAMILIES, IMG, PATCH, _logits, _randomize, hf_vit

# One Linear inside the first block of each family, which the fused path would otherwise read bare.
FIRST_LINEAR = {
    "reference": "encoder.layers.0.linear1",
    "timm": "blocks.0.attn.qkv",
    "torchvision": "encoder.layers.encoder_layer_0.mlp.0",
    "huggingface": "vit.layers.0.attention.q_proj",
}


def _pair(family, **build_kwargs):
    model = _randomize(FAMILIES[family][0](**build_kwargs)).to(DEVICE).eval()
    return model, vitfast.optimize(copy.deepcopy(model))


def _images(batch=2):
    return torch.randn(batch, 3, IMG, IMG, device=DEVICE)


def _three_way(model, fast, run, x):
    """``run(model, x)`` on the optimized model against the unmodified one, float64 as reference."""
    ref = run(copy.deepcopy(model).double(), x.double())
    assert_parity(run(fast, x), run(model, x), ref)


def _set(model, path, module):
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


class LoRA(nn.Module):
    """A low-rank adapter around a Linear, as PEFT builds one: base(x) + B(A(x))."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_b.weight)

    @property
    def weight(self):  # PEFT exposes the base layer's weight too; the fused path must still not use it
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x))


@pytest.mark.parametrize("hook", list(HOOKS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_hooks_on_submodules_fire_and_steer_the_result(family, hook):
    model, fast = _pair(family)
    x = _images()
    path = FIRST_LINEAR[family]
    calls = []
    with torch.no_grad():
        handle = HOOKS[hook](model.get_submodule(path), calls)
        expected = _logits(model, x)
        handle.remove()
        handle = HOOKS[hook](fast.get_submodule(path), calls)
        runtime._warned.clear()
        with runtime.count_launches() as launches, pytest.warns(RuntimeWarning, match=f"hooks are registered on"):
            out = _logits(fast, x)
        handle.remove()
    assert len(calls) == 2, "the hook fired once per model"
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # The hooked block steps aside; every other block still runs on the kernels.
    assert launches.get("attention") == DEPTH - 1, launches
    with torch.no_grad(), runtime.count_launches() as launches:
        _logits(fast, x)
    assert launches.get("attention") == DEPTH, "removing the hook restores the fused path"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_wrapper_put_in_after_optimize_is_honoured(family):
    model, fast = _pair(family)
    x = _images()
    path = FIRST_LINEAR[family]
    for m in (model, fast):
        torch.manual_seed(1)
        _set(m, path, LoRA(m.get_submodule(path)).to(DEVICE))
    with torch.no_grad(), runtime.count_launches() as launches:
        _three_way(model, fast, _logits, x)
    assert launches.get("attention") == DEPTH - 1, launches


def _first_block_dropout(family, model):
    """Switch on one dropout of the first block, at p = 1: every element drops, so the kernels' masks
    and the library's are the same (all zero) and the gradients must agree."""
    if family == "timm":
        model.blocks[0].attn.proj_drop.p = 1.0
    elif family == "torchvision":
        model.encoder.layers[0].dropout.p = 1.0
    else:
        model.vit.layers[0].dropout.p = 1.0


def _train_both(model, fast, prepare):
    """One training step (forward and backward) of each model after ``prepare(m)``, under one seed;
    asserts their gradients agree and returns the optimized model's launch counts."""
    x = _images()
    grads = []
    for m in (model, fast):
        prepare(m)
        m.train()
        torch.manual_seed(5)
        with runtime.count_launches() as launches:
            _logits(m, x).square().mean().backward()
        grads.append([p.grad for p in m.parameters()])
    for (name, _), a, b in zip(model.named_parameters(), *grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    return launches


@pytest.mark.parametrize("family", ["timm", "torchvision", "huggingface"])
def test_training_with_dropout_and_gradients_match(family):
    """With a dropout in training every block, that one included, trains on the kernels; gradients
    match the unmodified model's."""
    launches = _train_both(*_pair(family), lambda m: _first_block_dropout(family, m))
    assert launches.get("attention") == DEPTH and launches.get("attention_bwd") == DEPTH, launches


def test_backward_hook_on_a_submodule_fires_in_training():
    seen = []
    _train_both(*_pair("timm"), lambda m: m.blocks[0].mlp.fc1.register_full_backward_hook(
        lambda mod, grad_in, grad_out: seen.append(grad_out[0].shape)))
    assert len(seen) == 2 and seen[0] == seen[1]


def _enable_checkpointing(family, m):
    if family == "timm":
        m.set_grad_checkpointing(True)
    else:
        m.gradient_checkpointing_enable()


@pytest.mark.parametrize("family", ["timm", "huggingface"])
def test_gradient_checkpointing(family):
    launches = _train_both(*_pair(family), lambda m: _enable_checkpointing(family, m))
    # Forward, and the forward again inside the backward's recomputation, both on the kernels.
    assert launches.get("attention") == 2 * DEPTH and launches.get("attention_bwd") == DEPTH, launches


def test_timm_forward_intermediates_and_methods():
    model, fast = _pair("timm")
    x = _images()
    import timm

    assert isinstance(fast.blocks[0], timm.models.vision_transformer.Block)
    assert isinstance(fast.patch_embed, timm.layers.PatchEmbed)
    with torch.no_grad(), runtime.count_launches() as launches:
        _three_way(model, fast, lambda m, x: torch.stack(m.forward_intermediates(x, intermediates_only=True)), x)
    assert launches.get("attention") == DEPTH, launches


@pytest.mark.parametrize("output", ["output_attentions", "output_hidden_states"])
def test_huggingface_recorded_outputs(output):
    model = _randomize(hf_vit()).to(DEVICE).eval()
    model.set_attn_implementation("eager")  # sdpa records no attention weights, before optimize or after
    fast = vitfast.optimize(copy.deepcopy(model))
    key = "attentions" if output == "output_attentions" else "hidden_states"
    x = _images()
    with torch.no_grad():
        _three_way(model, fast, lambda m, x: getattr(m(x, **{output: True}), key), x)
        assert len(getattr(fast(x, **{output: True}), key)) == DEPTH + (key == "hidden_states")
        # The recorders stay installed but idle afterwards: plain calls are fused again.
        with runtime.count_launches() as launches:
            _three_way(model, fast, _logits, x)
    assert launches.get("attention") == DEPTH, launches


def test_huggingface_interpolate_pos_encoding():
    model, fast = _pair("huggingface")
    big = torch.randn(1, 3, IMG + 16, IMG + 16, device=DEVICE)
    with torch.no_grad():
        _three_way(model, fast, lambda m, x: m(x, interpolate_pos_encoding=True).logits, big)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_huggingface_attention_mask_runs_on_the_kernel(implementation):
    """transformers' 4-D masks (bool for SDPA, additive for eager) go to the attention kernel as they are."""
    model, fast = _pair("huggingface")
    for m in (model, fast):
        m.set_attn_implementation(implementation)
    mask = torch.ones(2, (IMG // PATCH) ** 2 + 1, dtype=torch.long, device=DEVICE)
    mask[1, -3:] = 0
    with torch.no_grad(), runtime.count_launches() as launches:
        _three_way(model, fast, lambda m, x: m(x, attention_mask=mask).logits, _images())
    assert launches.get("attention") == DEPTH, launches


@pytest.mark.parametrize("family", ["reference", "timm", "torchvision"])
def test_torch_jit_script_runs_pytorch_code_and_leaves_the_model_fused(family):
    model, fast = _pair(family)
    x = _images()
    scripted = torch.jit.script(fast)
    with torch.no_grad():
        _three_way(model, scripted, _logits, x)
        with runtime.count_launches() as launches:
            _three_way(model, fast, _logits, x)
    assert launches.get("attention") == DEPTH, "scripting must not unfuse the eager model"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_torch_export_holds_the_fused_ops(family):
    model, fast = _pair(family)
    x = _images()
    exported = torch.export.export(fast, (x,))
    targets = {str(n.target) for n in exported.graph.nodes}
    assert "vitfast.patch_embed_fwd.default" in targets and "vitfast.attention_packed_fwd.default" in targets, targets
    with torch.no_grad():
        _three_way(model, exported.module(), _logits, x)


@pytest.mark.parametrize("family", ["reference", "timm", "torchvision"])
def test_torch_fx(family):
    """The plain tracer records each stand-in as one call (fused when the graph runs); a feature
    extractor's tracer sees the structure it saw before optimize, so inner nodes stay addressable."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model, fast = _pair(family)
    x = _images()
    graph = torch.fx.symbolic_trace(fast)
    with torch.no_grad(), runtime.count_launches() as launches:
        _three_way(model, graph, _logits, x)
    assert launches.get("attention") == DEPTH, launches
    inner = {"reference": "encoder", "timm": "blocks.1.attn.proj", "torchvision": "encoder.layers.encoder_layer_1.mlp"}[family]
    with torch.no_grad():
        _three_way(model, fast, lambda m, x: create_feature_extractor(m, {inner: "f"})(x)["f"], x)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("after_a_call", [False, True])
def test_pickle_and_deepcopy_round_trip(family, after_a_call):
    model, fast = _pair(family)
    x = _images()
    if after_a_call:  # the stand-ins have cached their checks
        with torch.no_grad():
            fast(x)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast), torch.load(buffer, weights_only=False)]
    for other in copies:
        assert type(other) is type(fast)
        with torch.no_grad(), runtime.count_launches() as launches:
            _three_way(model, other, _logits, x)
        assert launches.get("attention") == DEPTH, launches


@pytest.mark.parametrize("family", list(FAMILIES))
def test_swapped_modules_return_fresh_tensors_where_the_originals_do(family):
    """A swapped module returns a view only where the original does: a view returned from a module
    that FSDP2 wraps loses its backward hook once the caller modifies it in place."""
    model, fast = _pair(family)
    swapped = [n for n, m in fast.named_modules() if n and type(m) is not type(model.get_submodule(n))]
    outermost = [n for n in swapped if not any(n.startswith(o + ".") for o in swapped)]
    assert outermost, "nothing was swapped"
    views = {}
    for tag, m in (("original", model), ("vitfast", fast)):
        for name in outermost:
            def record(_module, _args, out, key=(tag, name)):
                views[key] = [t._is_view() for t in (out if isinstance(out, tuple) else (out,))
                              if isinstance(t, torch.Tensor)]
            m.get_submodule(name).register_forward_hook(record)
        with torch.no_grad():
            m(_images())
    for name in outermost:
        fast_views, original_views = views["vitfast", name], views["original", name]
        assert len(fast_views) == len(original_views), (name, views)
        assert not any(f and not o for f, o in zip(fast_views, original_views)), (name, views)
