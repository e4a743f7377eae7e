"""Training with dropout and stochastic depth on the kernels, at the level of whole layers and models.

* Every site is wired to the module that owns it: with that one module's probability at 1 (a
  deterministic drop: the branch or the probabilities become zeros) the optimized model matches the
  original three-way, forward and backward; with p < 1 the masks come from the kernels' own stream
  (tests/test_attention_dropout.py and tests/test_linear_dropout.py prove their statistics).
* Stochastic depth draws its per-sample mask with the original module's own calls, so under one
  ``torch.manual_seed`` vitfast and timm (or transformers) drop the same samples and agree three-way.
* In training with the recipes' dropout and drop path, every layer's attention and MLP runs on the
  kernels, forward and backward, with no fallback; the same seed reproduces a step bit for bit.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import vitfast
from vitfast import runtime, train_check
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, math_attention, require_triton_path
from test_optimize_models import CLASSES, DEPTH, HEADS, IMG, PATCH, WIDTH, _hf, output, randomize

# Launches of one training step (forward + backward) of each block, whatever its MLP.
BLOCK_OPS = ("attention", "attention_bwd")


def _timm_vit(**extra):
    def build():
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                                 num_classes=CLASSES, **extra)
    return build


def _timm_eva(**extra):
    def build():
        import timm

        return timm.create_model("eva02_small_patch14_224", pretrained=False, img_size=IMG, patch_size=PATCH,
                                 embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES, **extra)
    return build


def _torchvision(**extra):
    def build():
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(image_size=IMG, patch_size=PATCH, num_layers=DEPTH, num_heads=HEADS,
                                 hidden_dim=WIDTH, mlp_dim=4 * WIDTH, num_classes=CLASSES, **extra)
    return build


def _encoder(norm_first, **extra):
    def build():
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, activation="gelu", batch_first=True,
                                           norm_first=norm_first, **extra)
        return nn.TransformerEncoder(layer, DEPTH, enable_nested_tensor=False)
    return build


def _inputs(model_kind: str, dtype):
    if model_kind == "tokens":
        return torch.randn(3, 17, WIDTH, device=DEVICE, dtype=dtype)
    return torch.randn(4, 3, IMG, IMG, device=DEVICE, dtype=dtype)


def _step(model, read, x, upstream, seed):
    """Output and gradients (input, then parameters by name) of one step under ``torch.manual_seed(seed)``."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = output(model, read, x)
    out.backward(upstream.to(out.dtype))
    return out.detach(), [("input", x.grad)] + [(n, p.grad) for n, p in sorted(model.named_parameters())]


def _train_three_way(build, read, kind, dtype, seed=0, patch_ref=None):
    """One training step of the float64 original, the original in ``dtype`` and its optimized copy, each
    under the same seed; asserts the three-way bound on the output and every gradient, and returns the
    launches of the optimized step. ``patch_ref``: a context manager around the float64 run."""
    require_triton_path()
    model = build()
    torch.manual_seed(1)  # after the build: the weights do not depend on how many numbers its __init__ drew
    model = randomize(model).to(DEVICE).train()
    x = _inputs(kind, torch.float32)
    with torch.no_grad():
        upstream = torch.randn_like(output(copy.deepcopy(model).eval(), read, x).float())
    with patch_ref() if patch_ref else _nothing():
        ref = _step(copy.deepcopy(model).double(), read, x.double(), upstream.double(), seed)
    pt = _step(copy.deepcopy(model).to(dtype), read, x.to(dtype), upstream, seed)
    fast_model = vitfast.optimize(copy.deepcopy(model).to(dtype))
    with runtime.count_launches() as launches, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no stand-in falls back, no op takes PyTorch
        out = _step(fast_model, read, x.to(dtype), upstream, seed)
    assert_parity(out[0], pt[0], ref[0], what="output")
    for (name, o), (_, p), (_, r) in zip(out[1], pt[1], ref[1]):
        assert (o is None) == (r is None), name
        if r is not None:
            assert_parity(o, p, r, what=f"grad of {name}")
    return launches, out, fast_model


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _set(model, attr_path: str, value: float) -> None:
    """Set ``attr_path`` (``<module class name>.<attribute>``) on every module of that class."""
    cls_name, attr = attr_path.rsplit(".", 1)
    hits = [m for m in model.modules() if type(m).__name__ == cls_name]
    assert hits, cls_name
    for m in hits:
        setattr(m, attr, value)


def _with(build, *settings):
    def built():
        model = build()
        for path, value in settings:
            if path[:1].isupper():  # <class name>.<attribute>
                _set(model, path, value)
            elif path.endswith("scale_by_keep"):  # <submodule name>.scale_by_keep
                hits = [m for name, m in model.named_modules() if name.endswith(path.rsplit(".", 1)[0])]
                assert hits, path
                for m in hits:
                    m.scale_by_keep = value
            else:  # the suffix of submodules' names: their p
                hits = [m for name, m in model.named_modules() if name.endswith(path)]
                assert hits, path
                for m in hits:
                    m.p = value
        return model
    return built


# One site at a time at p = 1 (every element, or every sample, dropped), the rest at 0.
SITES = {
    "encoder-post-attention-probs": (_with(_encoder(False, dropout=0.0), ("MultiheadAttention.dropout", 1.0))),
    "encoder-post-dropout1": (_with(_encoder(False, dropout=0.0), ("dropout1", 1.0))),
    "encoder-pre-hidden-dropout": (_with(_encoder(True, dropout=0.0), ("layers.0.dropout", 1.0))),
    "encoder-pre-dropout2": (_with(_encoder(True, dropout=0.0), ("dropout2", 1.0))),
    "timm-attn-drop": _timm_vit(attn_drop_rate=1.0),
    "timm-proj-drop": _with(_timm_vit(), ("attn.proj_drop", 1.0)),
    "timm-mlp-drop1": _with(_timm_vit(), ("mlp.drop1", 1.0)),
    "timm-mlp-drop2": _with(_timm_vit(), ("mlp.drop2", 1.0)),
    "timm-drop-path": _timm_vit(drop_path_rate=1.0),  # the last block's DropPath(1.0)
    "torchvision-attention-dropout": _torchvision(attention_dropout=1.0),
    # The blocks' dropouts only: the encoder's own dropout (before the blocks) is PyTorch's.
    "torchvision-dropout": _with(_torchvision(), ("encoder_layer_0.dropout", 1.0), ("encoder_layer_1.mlp.4", 1.0)),
    "torchvision-mlp-hidden": _with(_torchvision(), ("encoder_layer_0.mlp.2", 1.0)),
    "hf-vit-attention-probs": _hf("ViTModel", "ViTConfig", attention_probs_dropout_prob=1.0),
    # transformers 5.17 drops DINOv2's attention branch (after its output projection) by
    # hidden_dropout_prob, not its MLP branch; 5.24 has no dropout in the layer.
    "hf-dinov2-hidden-dropout": _with(_hf("Dinov2Model", "Dinov2Config", hidden_dropout_prob=1.0, layerscale_value=0.5),
                                      ("embeddings.dropout", 0.0)),
}
_SITE_READS = {"hf-vit-attention-probs": "last_hidden_state", "hf-dinov2-hidden-dropout": "last_hidden_state"}


@pytest.mark.parametrize("name", list(SITES))
def test_each_dropout_site_is_wired_to_its_module(name):
    build = SITES[name]
    kind = "tokens" if name.startswith("encoder") else "images"
    with math_attention():  # p = 1 sites: CUDA's memory-efficient attention gives NaN there
        launches, _, _ = _train_three_way(build, _SITE_READS.get(name), kind, torch.float32)
    for op in BLOCK_OPS:
        assert launches.get(op) == DEPTH, launches


def test_encoder_layer_in_eval_with_a_dropout_in_train_runs_pytorch():
    """PyTorch's encoder layer in eval takes its fast path without grad, which drops nothing even where
    a dropout module was switched back to train (Monte Carlo dropout): vitfast runs PyTorch's forward
    there, so the optimized layer computes what the original does."""
    layer = randomize(nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, batch_first=True)).to(DEVICE).eval()
    layer.dropout1.p = 1.0
    layer.dropout1.train()
    fast = vitfast.optimize(copy.deepcopy(layer))
    x = torch.randn(3, 17, WIDTH, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x))
    x.requires_grad_(True)  # PyTorch's other path, which drops: so does vitfast's
    torch.testing.assert_close(fast(x), layer(x))


# Stochastic depth alone (no dropout): the same samples drop as in the original, under one seed.
def _float32_rand():
    """transformers draws DINOv2's drop path with torch.rand in the tokens' dtype, and float64 draws
    other numbers than float32: the float64 reference draws in float32 (the mask the others see)."""
    original = torch.rand

    class Patch:
        def __enter__(self):
            def rand(*args, dtype=None, **kwargs):
                if dtype == torch.float64:
                    return original(*args, dtype=torch.float32, **kwargs).double()
                return original(*args, dtype=dtype, **kwargs)
            torch.rand = rand

        def __exit__(self, *exc):
            torch.rand = original
    return Patch()


DROP_PATH = {
    "timm-vit": (_timm_vit(drop_path_rate=0.6), None, None),
    "timm-vit-unscaled": (
        _with(_timm_vit(drop_path_rate=0.6), ("DropPath.scale_by_keep", False)), None, None),
    # Each branch's DropPath decides its own scaling.
    "timm-vit-mixed-scaling": (_with(_timm_vit(drop_path_rate=0.6), ("drop_path2.scale_by_keep", False)), None, None),
    "timm-eva02-small": (_timm_eva(drop_path_rate=0.6), None, None),
    "hf-dinov2": (_hf("Dinov2Model", "Dinov2Config", drop_path_rate=0.6, layerscale_value=0.5), "pooler_output",
                  _float32_rand),
}


@pytest.mark.parametrize("name", list(DROP_PATH))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_stochastic_depth_drops_the_samples_the_original_drops(name, dtype):
    build, read, patch = DROP_PATH[name]
    launches, (out, _), fast = _train_three_way(build, read, "images", dtype, seed=3, patch_ref=patch)
    for op in BLOCK_OPS:
        assert launches.get(op) == DEPTH, launches
    # Not vacuous: some sample was dropped somewhere, so the training output differs from eval's.
    with torch.no_grad():
        x = _inputs("images", dtype)
        torch.manual_seed(3)
        train_out = output(fast, read, x)
        fast.eval()
        assert not torch.equal(train_out, output(fast, read, x))


# The recipes' settings: every layer's attention and MLP on the kernels, forward and backward.
RECIPES = {
    "encoder-post-default-dropout": (_encoder(False), None, "tokens"),
    "encoder-pre-default-dropout": (_encoder(True), None, "tokens"),
    "timm-vit-deit-recipe": (_timm_vit(drop_path_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1), None, "images"),
    "timm-eva02-small": (_timm_eva(drop_path_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1), None, "images"),
    "hf-dinov2": (_hf("Dinov2Model", "Dinov2Config", drop_path_rate=0.1, attention_probs_dropout_prob=0.1),
                  "pooler_output", "images"),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_training_with_dropout_runs_every_layer_on_the_kernels(name):
    require_triton_path()
    build, read, kind = RECIPES[name]
    torch.manual_seed(0)
    model = vitfast.optimize(randomize(build()).to(DEVICE).train())
    assert model.vitfast_report.skipped == [], str(model.vitfast_report)
    x = _inputs(kind, torch.float32)
    upstream = torch.randn_like(output(copy.deepcopy(model).eval(), read, x))
    steps = []
    for seed in (5, 5, 6):
        with runtime.count_launches() as launches, warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            steps.append(_step(model, read, x, upstream, seed))
        for op in BLOCK_OPS:
            assert launches.get(op) == DEPTH, launches
        mlp_launches = launches.get("mlp", 0) + launches.get("gated_linear", 0)
        assert mlp_launches == DEPTH, launches
        assert launches.get("linear_bwd", 0) >= 3 * DEPTH and launches.get("layer_norm_bwd", 0) >= 2 * DEPTH
    (out_a, grads_a), (out_b, grads_b), (out_c, _) = steps
    assert torch.equal(out_a, out_b), "the same seed must reproduce the step bit for bit"
    for (name_a, a), (_, b) in zip(grads_a, grads_b):
        assert (a is None and b is None) or torch.equal(a, b), name_a
    assert not torch.equal(out_a, out_c), "another seed must drop other elements"


def test_train_check_with_dropout_and_drop_path_stays_near_pytorch():
    """The DeiT-style recipe (dropout and drop path 0.1) on timm's ViT, on the digits at their own 8×8
    (4 patches: a fraction of the default's interpreter time, and the loss falls within 20 steps)."""
    curves = train_check.run(device=DEVICE, dropout=0.1, drop_path=0.1, img_size=8, patch_size=4, batch=16, steps=20,
                             lr=1e-2, reruns=8)
    assert curves.falls(), curves.vitfast
    assert not curves.missing_kernels(), curves.kernels
    noise = curves.noise(10)
    assert 0 < noise and curves.max_rel_diff(window=10) <= 2 * noise, (noise, curves.reference, curves.vitfast)


def test_train_check_with_drop_path_alone_agrees_step_by_step():
    curves = train_check.run(device=DEVICE, drop_path=0.2, img_size=8, patch_size=4, batch=16, steps=4)
    assert curves.max_rel_diff() <= 1e-3, list(zip(curves.reference, curves.vitfast))
    assert not curves.missing_kernels(), curves.kernels


def test_train_check_command_takes_dropout_and_drop_path(capsys):
    from vitfast.__main__ import main

    code = main(["train-check", "--steps", "2", "--batch", "4", "--dropout", "0.1", "--drop-path", "0.1"])
    assert code in (0, 1)
    out = capsys.readouterr().out
    assert "timm ViT" in out and "dropout 0.1" in out and "of 10-step means" in out and "5 reruns" in out
    with pytest.raises(SystemExit):
        main(["train-check", "--dropout", "1.5"])
