"""vitfast.optimize on the encoders built from rotary embeddings, gated MLPs and attention pooling:
timm's EVA02, the RoPE ViTs (axial and mixed), Perception Encoder's ViT, a MAP head with several
queries, GeGLU in timm's ViT block and DINOv2's SwiGLU in transformers (test_optimize_models.py has
SigLIP's heads). Tiny random-initialised models, output three-way against the unmodified model, launch
counts proving every block and every pooling head ran on the kernels."""
import copy

import pytest
import torch

import vitfast
from vitfast import runtime
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, require_triton_path
from test_optimize_models import CLASSES, DEPTH, HEADS, IMG, PATCH, WIDTH, _hf, optimized_three_way, randomize


def _timm(name, mlp_layer=None, **extra):
    def build():
        import timm

        if mlp_layer is not None:  # a timm.layers class, by name
            extra["mlp_layer"] = getattr(timm.layers, mlp_layer)
        args = dict(pretrained=False, img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH,
                    num_heads=HEADS, num_classes=CLASSES)
        return timm.create_model(name, **{**args, **extra})
    return build


def _siglip_four_queries():
    """SigLIP with a MAP head of 4 learned queries averaged (timm's models build it with one)."""
    from timm.layers import AttentionPoolLatent

    model = _timm("vit_base_patch16_siglip_224")()
    model.attn_pool = AttentionPoolLatent(WIDTH, num_heads=HEADS, latent_len=4, pool_type="avg",
                                          norm_layer=torch.nn.LayerNorm)
    return model


# name: (build, what the forward returns is read by, pooling heads).
MODELS = {
    # GluMlp (SwiGLU packed in one fc1), rotary embedding after a class token, q/v biases around k's zeros.
    "timm-eva02-small": (_timm("eva02_small_patch14_224"), None, 0),
    # q, k, v projected apart, SwiGLU with its sub-LN, the attention's scale-norm, the half rotary layout.
    "timm-eva02-base-subln-half": (
        _timm("eva02_base_patch14_224", scale_attn_inner=True, rope_rotate_half=True), None, 0),
    # No class token, one register (the prefix left unrotated), LayerScale, average pooling.
    "timm-rope-vit-reg1-gap": (_timm("vit_base_patch16_rope_reg1_gap_256"), None, 0),
    # AttentionRope with a per-head (mixed) rotary table for each block.
    "timm-rope-mixed": (_timm("vit_base_patch16_rope_mixed_224"), None, 0),
    # Perception Encoder: AttentionRope, rotary embedding and a MAP head.
    "timm-pe-core": (_timm("vit_pe_core_tiny_patch16_384", attn_pool_num_heads=HEADS), None, 1),
    "timm-siglip-map-4-queries": (_siglip_four_queries, None, 1),
    # timm's ViT Block with a GeGLU MLP: GluMlp with GELU, the gate in fc1's second half (gate_last).
    "timm-vit-geglu": (_timm("vit_base_patch16_224", mlp_layer="GluMlp"), None, 0),
    # DINOv2's SwiGLU MLP (gate_proj, up_proj, down_proj).
    "hf-dinov2-swiglu": (_hf("Dinov2Model", "Dinov2Config", use_swiglu_ffn=True), "pooler_output", 0),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_optimize_rope_glu_pooling(name, dtype):
    require_triton_path()
    build, read, heads = MODELS[name]
    out, pt, ref, launches, report = optimized_three_way(build, read, dtype)
    assert report.skipped == [], str(report)
    # Every block's attention and MLP, and every pooling head's, ran on the kernels.
    mlps = launches.get("mlp", 0) + launches.get("gated_linear", 0)
    assert launches.get("attention") == DEPTH + heads and mlps == DEPTH + heads, launches
    assert launches.get("patch_embed") == 1, launches
    assert_parity(out, pt, ref)


@pytest.mark.parametrize("name", ["timm-eva02-base-subln-half", "timm-rope-vit-reg1-gap",
                                  "timm-siglip-map-4-queries"])
def test_optimize_rope_glu_pooling_gradients(name):
    """Training (no dropout): the loss's gradient wrt every parameter and the image, three-way."""
    require_triton_path()
    dtype = torch.float32
    model = randomize(MODELS[name][0]()).to(DEVICE).train()
    x = torch.randn(2, 3, IMG, IMG, device=DEVICE, dtype=dtype)

    def grads(m, inp):
        inp = inp.detach().requires_grad_()
        m(inp).square().sum().backward()
        return [inp.grad] + [p.grad for p in m.parameters()]

    ref = grads(copy.deepcopy(model).double(), x.double())
    pt = grads(copy.deepcopy(model), x)
    fast_model = vitfast.optimize(copy.deepcopy(model))
    with runtime.count_launches() as launches:
        out = grads(fast_model, x)
    assert launches.get("attention_bwd") == DEPTH + ("map" in name), launches
    for o, p, r in zip(out, pt, ref):
        assert_parity(o, p, r)


def test_eva_rotary_table_that_needs_grad_stays_exact(monkeypatch):
    """The mixed RoPE ViT's learned frequencies need gradients in training: the rotary embedding then
    runs on PyTorch (warned), and the model's gradients, the frequencies' included, stay right."""
    require_triton_path()
    model = randomize(MODELS["timm-rope-mixed"][0]()).to(DEVICE).train()
    x = torch.randn(2, 3, IMG, IMG, device=DEVICE)
    pt = copy.deepcopy(model)
    pt(x).sum().backward()
    fast = vitfast.optimize(copy.deepcopy(model))
    monkeypatch.setattr(runtime, "_warned", set())
    with pytest.warns(RuntimeWarning, match="rope|rotary"):
        fast(x).sum().backward()
    for (name, p), q in zip(fast.named_parameters(), pt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
