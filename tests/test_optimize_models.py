"""vitfast.optimize on the image encoders people deploy (timm, Hugging Face, torchvision, open_clip):
tiny random-initialised configurations, output three-way against the unmodified model, launch counts
proving every encoder layer ran attention and MLP on the kernels, and an honest report."""
import copy

import pytest
import torch

import vitfast
from vitfast import runtime
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, require_triton_path

IMG, PATCH, WIDTH, DEPTH, HEADS = 32, 8, 64, 2, 2  # head size 32
CLASSES = 5


def _timm(name, **extra):
    def build():
        import timm

        args = dict(pretrained=False, img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH,
                    num_heads=HEADS, num_classes=CLASSES)
        return timm.create_model(name, **{**args, **extra})
    return build


def _hf(model, config, **extra):
    def build():
        import transformers

        args = dict(image_size=IMG, patch_size=PATCH, hidden_size=WIDTH, num_hidden_layers=DEPTH,
                    num_attention_heads=HEADS, intermediate_size=4 * WIDTH)
        return getattr(transformers, model)(getattr(transformers, config)(**{**args, **extra}))
    return build


def _hf_clip_model():
    from transformers import CLIPConfig, CLIPModel

    vision = dict(image_size=IMG, patch_size=PATCH, hidden_size=WIDTH, num_hidden_layers=DEPTH,
                  num_attention_heads=HEADS, intermediate_size=4 * WIDTH)
    text = dict(vocab_size=64, hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                intermediate_size=4 * WIDTH, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision))


def _torchvision():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=IMG, patch_size=PATCH, num_layers=DEPTH, num_heads=HEADS,
                             hidden_dim=WIDTH, mlp_dim=4 * WIDTH, num_classes=CLASSES)


def _open_clip(**extra):
    def build():
        from open_clip.transformer import VisionTransformer

        return VisionTransformer(image_size=IMG, patch_size=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS,
                                 mlp_ratio=4.0, output_dim=32, **extra)
    return build


def _open_clip_quick_gelu_layer_scale():
    from open_clip.transformer import QuickGELU

    return _open_clip(act_layer=QuickGELU, ls_init_value=0.5)()


# name: (build, what the forward returns is read by, modules a report may list as left alone).
MODELS = {
    "timm-vit": (_timm("vit_base_patch16_224"), None, ()),
    "timm-clip": (_timm("vit_base_patch16_clip_224"), None, ()),
    "timm-clip-quickgelu": (_timm("vit_base_patch16_clip_quickgelu_224"), None, ()),
    "timm-siglip": (_timm("vit_base_patch16_siglip_224"), None, ()),
    "timm-dinov2": (_timm("vit_small_patch14_dinov2"), None, ()),
    # The model's embedding stage with its register tokens stays timm's (the model itself is left alone).
    "timm-dinov2-reg4": (_timm("vit_small_patch14_reg4_dinov2"), None, ("",)),
    "timm-deit-distilled": (_timm("deit_base_distilled_patch16_224"), None, ()),
    "hf-vit": (_hf("ViTModel", "ViTConfig"), "last_hidden_state", ()),
    "hf-clip-vision": (_hf("CLIPVisionModel", "CLIPVisionConfig"), "last_hidden_state", ()),
    "hf-clip-vision-projection-quickgelu": (
        _hf("CLIPVisionModelWithProjection", "CLIPVisionConfig", hidden_act="quick_gelu", projection_dim=16),
        "image_embeds", ()),
    "hf-clip-model": (_hf_clip_model, "get_image_features", ()),
    "hf-siglip-vision": (_hf("SiglipVisionModel", "SiglipVisionConfig"), "pooler_output", ()),
    "hf-dinov2": (_hf("Dinov2Model", "Dinov2Config", layerscale_value=0.5), "pooler_output", ()),
    "hf-dinov2-registers": (
        _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", num_register_tokens=4), "pooler_output", ()),
    "hf-deit": (_hf("DeiTModel", "DeiTConfig"), "last_hidden_state", ()),
    "hf-deit-distilled": (
        _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", num_labels=CLASSES), "logits", ()),
    "torchvision-vit": (_torchvision, None, ()),
    "open_clip-vit": (_open_clip(), None, ()),
    "open_clip-vit-quickgelu-layerscale": (_open_clip_quick_gelu_layer_scale, None, ()),
}


def randomize(model):
    """Fresh non-trivial values everywhere (zero-initialised tokens, biases and layer scales hide bugs)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.5))
    return model


def output(model, read, x):
    if read == "get_image_features":
        out = model.get_image_features(pixel_values=x)
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    out = model(x) if read is None else getattr(model(pixel_values=x), read)
    return out[0] if isinstance(out, tuple) else out


def cast(model, dtype):
    """A copy of ``model`` in ``dtype``, the position grid (integers) of timm's RotaryEmbeddingMixed kept
    in float32. timm 1.0.31 keeps that grid at float32 or wider through ``.to()`` and multiplies it by
    the frequencies in float32, so this changes nothing there; timm 1.0.29 casts the grid with the
    model, then multiplies it by float32 frequencies, which raises in every dtype but float32."""
    model = copy.deepcopy(model).to(dtype)
    for m in model.modules():
        if type(m).__name__ == "RotaryEmbeddingMixed" and getattr(m, "t_x", None) is not None:
            m.t_x, m.t_y = m.t_x.float(), m.t_y.float()
    return model


def optimized_three_way(build, read, dtype):
    """A random-initialised model's output in float64, in ``dtype`` on PyTorch and in ``dtype`` after
    ``optimize`` (with the launches it made); the optimized and the PyTorch model."""
    model = randomize(build()).to(DEVICE).eval()
    x = torch.randn(2, 3, IMG, IMG, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        ref = output(cast(model, torch.float64), read, x.double())
        pt_model = cast(model, dtype)
        pt = output(pt_model, read, x)
        fast = vitfast.optimize(cast(model, dtype))
        with runtime.count_launches() as launches:
            out = output(fast, read, x)
    assert list(fast.state_dict()) == list(pt_model.state_dict())
    return out, pt, ref, launches, fast.vitfast_report


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_optimize_deployed_encoder(name, dtype):
    require_triton_path()
    build, read, may_stay = MODELS[name]
    out, pt, ref, launches, report = optimized_three_way(build, read, dtype)
    assert sorted(e.path for e in report.skipped) == sorted(may_stay), str(report)
    # Every encoder layer, and SigLIP's attention-pooling head, ran its attention and its MLP on the
    # kernels, after the patch embedding.
    heads = int("siglip" in name)
    assert launches.get("attention") == DEPTH + heads and launches.get("mlp") == DEPTH + heads, launches
    assert launches.get("patch_embed") == 1 and launches.get("layer_norm", 0) >= 2 * DEPTH, launches
    assert_parity(out, pt, ref)
