"""vitfast.optimize on the models people have: same logits, and really on vitfast's kernels."""
import copy
import re

import pytest
import torch
from torch import nn

import vitfast
from vitfast import runtime
from helpers import DEVICE, DTYPE_IDS, DTYPES, PARAMETER_EDITS, assert_parity, require_triton_path

IMG, PATCH, WIDTH, DEPTH, HEADS, CLASSES = 32, 8, 64, 2, 4, 10


def reference_vit():
    return vitfast.reference.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, n_layers=DEPTH,
                                               n_heads=HEADS, n_classes=CLASSES)


def timm_vit(**kwargs):
    import timm

    args = dict(img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                num_classes=CLASSES, qkv_bias=True)
    args.update(kwargs)
    return timm.models.vision_transformer.VisionTransformer(**args)


def torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=IMG, patch_size=PATCH, num_layers=DEPTH, num_heads=HEADS,
                             hidden_dim=WIDTH, mlp_dim=4 * WIDTH, num_classes=CLASSES)


def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=IMG, patch_size=PATCH, hidden_size=WIDTH, num_hidden_layers=DEPTH,
                       num_attention_heads=HEADS, intermediate_size=4 * WIDTH, num_labels=CLASSES)
    return ViTForImageClassification(config)


def _logits(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _randomize(model):
    """Fresh non-trivial values everywhere (zero-initialised CLS tokens and biases would hide bugs)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.5))
    return model


FAMILIES = {
    "reference": (reference_vit, {"FastVisionTransformer": 1, "FastTransformerEncoderLayer": DEPTH}),
    "timm": (timm_vit, {"FusedTimmPatchEmbed": 1, "FusedTimmBlock": DEPTH}),
    "torchvision": (torchvision_vit, {"PatchConv2d": 1, "FusedTorchvisionEncoderBlock": DEPTH}),
    "huggingface": (hf_vit, {"FusedHFViTEmbeddings": 1, "FusedHFEncoderLayer": DEPTH}),
}


def _check_family(build, expected_swaps, dtype, batch=2):
    require_triton_path()
    model = _randomize(build()).to(DEVICE).eval()
    x = torch.randn(batch, 3, IMG, IMG, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        ref = _logits(copy.deepcopy(model).double(), x.double())
        pt_model = copy.deepcopy(model).to(dtype)
        pt = _logits(pt_model, x)
        fast = vitfast.optimize(copy.deepcopy(model).to(dtype))
        counts = fast.vitfast_report.counts()
        for name, n in expected_swaps.items():
            assert counts.get(name) == n, str(fast.vitfast_report)
        with runtime.count_launches() as launches:
            out = _logits(fast, x)
    # Every block ran its attention and its MLP on the kernels, and the embedding too.
    assert launches.get("attention") == DEPTH and launches.get("mlp") == DEPTH, launches
    assert launches.get("patch_embed") == 1 and launches.get("layer_norm", 0) >= 2 * DEPTH, launches
    assert_parity(out, pt, ref)
    assert list(fast.state_dict()) == list(pt_model.state_dict())
    return model, fast


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_optimize_family(family, dtype):
    build, swaps = FAMILIES[family]
    _check_family(build, swaps, dtype)


def test_optimize_state_dict_round_trip_and_inplace():
    model = _randomize(reference_vit()).to(DEVICE).eval()
    original = copy.deepcopy(model)
    copy_fast = vitfast.optimize(model, inplace=False)
    assert type(model) is vitfast.reference.VisionTransformer and copy_fast is not model
    same = vitfast.optimize(model)
    assert same is model and isinstance(model, vitfast.modules.FastVisionTransformer)
    fresh = reference_vit().to(DEVICE)
    fresh.load_state_dict(model.state_dict())
    model.load_state_dict(original.state_dict())
    for a, b in zip(fresh.state_dict().values(), original.state_dict().values()):
        assert torch.equal(a, b)


def test_optimize_timm_layer_scale_and_no_class_token():
    build = lambda: timm_vit(init_values=0.3, class_token=False, global_pool="avg", no_embed_class=True)  # noqa: E731
    _check_family(build, {"FusedTimmBlock": DEPTH}, torch.float32)


def test_optimize_generic_encoder_in_a_user_model():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 32)
            layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, activation="relu", batch_first=True,
                                               norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32), enable_nested_tensor=False)
            self.out = nn.Linear(32, 5)

        def forward(self, tokens, padding):
            return self.out(self.encoder(self.embed(tokens), src_key_padding_mask=padding))

    model = _randomize(Tagger()).to(DEVICE).eval()
    tokens = torch.randint(0, 50, (3, 11), device=DEVICE)
    padding = torch.zeros(3, 11, dtype=torch.bool, device=DEVICE)
    padding[1, 7:] = True
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(tokens, padding)
        pt = model(tokens, padding)
        fast = vitfast.optimize(copy.deepcopy(model))
        with runtime.count_launches() as launches:
            out = fast(tokens, padding)
    assert launches.get("attention") == 2
    assert isinstance(fast.encoder, vitfast.FastTransformerEncoder)
    assert type(fast.embed) is nn.Embedding and type(fast.out) is nn.Linear
    assert_parity(out, pt, ref)


def test_optimize_leaves_unsupported_head_size_and_reports_why():
    layer = nn.TransformerEncoderLayer(36, 3, 48, batch_first=True)  # head size 12: no kernel tile
    model = nn.Sequential(layer).to(DEVICE)
    vitfast.optimize(model)
    assert type(model[0]) is nn.TransformerEncoderLayer
    report = model.vitfast_report
    assert any("head size 12" in e.result for e in report.skipped), str(report)
    assert "left" in str(report)


def test_optimize_leaves_unknown_modules_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten()).to(DEVICE)
    before = [type(m) for m in model.modules()]
    vitfast.optimize(model)
    assert [type(m) for m in model.modules()] == before
    assert not model.vitfast_report.swapped


def test_optimize_rejects_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        vitfast.optimize({"not": "a model"})


def test_optimized_reference_vit_wrong_image_size_or_channels():
    """vitfast's own reference ViT gets vitfast's clear errors, raised before any launch."""
    model = vitfast.optimize(reference_vit().to(DEVICE).eval())
    for h in (IMG + 4, IMG + PATCH):  # not a multiple of the patch; a grid the position table lacks
        with torch.no_grad(), pytest.raises(ValueError, match=rf"height {h}|{h}x|\({h}, {IMG}\)|{h // PATCH}x"):
            model(torch.randn(1, 3, h, IMG, device=DEVICE))
    with torch.no_grad(), pytest.raises(ValueError, match="channel"):
        model(torch.randn(1, 4, IMG, IMG, device=DEVICE))


@pytest.mark.parametrize("family", ["timm", "torchvision", "huggingface"])
def test_optimized_model_wrong_image_raises_as_the_original(family):
    """Inputs the fused embedding cannot take go to the library's own code, which raises its own error."""
    model = FAMILIES[family][0]().to(DEVICE).eval()
    fast = vitfast.optimize(copy.deepcopy(model))
    for shape in ((1, 3, IMG + 4, IMG), (1, 3, IMG + PATCH, IMG), (1, 4, IMG, IMG)):
        x = torch.randn(*shape, device=DEVICE)
        with torch.no_grad(), pytest.raises(Exception) as original:
            model(x)
        with torch.no_grad(), pytest.raises(original.type, match=re.escape(str(original.value)[:40])):
            fast(x)


def test_optimized_model_trains_with_dropout_on_the_kernels():
    """train(): the reference ViT's default dropout (0.1) runs inside the kernels, forward and backward;
    the same seed gives the same gradients, and with dropout at 0 they are PyTorch's."""
    model = _randomize(reference_vit()).to(DEVICE).train()
    fast = vitfast.optimize(copy.deepcopy(model))
    x = torch.randn(2, 3, IMG, IMG, device=DEVICE)
    grads = []
    for _ in range(2):
        fast.zero_grad()
        torch.manual_seed(3)
        with runtime.count_launches() as launches:
            fast(x).square().mean().backward()
        assert launches.get("attention") == launches.get("attention_bwd") == len(model.encoder.layers), launches
        grads.append([p.grad.clone() for p in fast.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    for m in (model, fast):
        for d in m.modules():
            if isinstance(d, nn.Dropout):
                d.p = 0.0
            if isinstance(d, nn.MultiheadAttention):
                d.dropout = 0.0
        m.zero_grad()
        m(x).square().mean().backward()
    for (name, a), b in zip(model.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def _vit_b16(family):
    if family == "reference":
        return vitfast.reference.vit_base()
    if family == "timm":
        import timm

        return timm.create_model("vit_base_patch16_224", pretrained=False)
    if family == "torchvision":
        from torchvision.models import vit_b_16

        return vit_b_16(weights=None)
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(num_labels=1000))


@pytest.mark.gpu
@pytest.mark.parametrize("family", list(FAMILIES))
def test_optimize_vit_b16_bf16(family):
    model = _vit_b16(family).cuda().eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = _logits(copy.deepcopy(model).double(), x.double())
        pt_model = copy.deepcopy(model).bfloat16()
        pt = _logits(pt_model, x.bfloat16())
        with runtime.count_launches() as launches:
            out = _logits(vitfast.optimize(pt_model), x.bfloat16())
    assert launches.get("attention") == 12 and launches.get("patch_embed") == 1, launches
    assert_parity(out, pt, ref)


@pytest.mark.parametrize("family", ["timm-layerscale", "huggingface"])
@pytest.mark.parametrize("edit", list(PARAMETER_EDITS))
def test_parameter_edits_after_a_forward_are_seen(family, edit):
    """LayerScale and the packed QKV are derived from the parameters on every call, so every way of
    changing a parameter shows at once, writes through ``.data`` (which bump no version counter) too."""
    if family == "huggingface":
        build, path, name = hf_vit, "vit.layers.0.attention.q_proj", "weight"
    else:
        build, path, name = (lambda: timm_vit(init_values=0.3)), "blocks.0.ls2", "gamma"
    model = _randomize(build()).to(DEVICE).eval()
    fast = vitfast.optimize(copy.deepcopy(model))
    x = torch.randn(2, 3, IMG, IMG, device=DEVICE)
    module = model.get_submodule(path)
    new = torch.randn_like(getattr(module, name))
    with torch.no_grad():
        before = _logits(fast, x)
        for m in (model, fast):
            target = m.get_submodule(path)
            edit_fn = PARAMETER_EDITS[edit]
            if edit == "load_state_dict":
                edit_fn(m, f"{path}.{name}", new)
            else:
                edit_fn(target, name, new)
        ref = _logits(copy.deepcopy(model).double(), x.double())
        after = _logits(fast, x)
        assert_parity(after, _logits(model, x), ref)
    assert (after - before).abs().max() > 1e-3
