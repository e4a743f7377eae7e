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


def _attention_pool_head(**options):
    from timm.layers import AttentionPoolLatent

    return AttentionPoolLatent(WIDTH, num_heads=HEADS, **options)


@pytest.mark.parametrize("options", [dict(out_features=0), dict(q_proj=False, pool_type="", latent_len=3),
                                     dict(pos_embed="abs", feat_size=17, norm_layer=torch.nn.LayerNorm)],
                         ids=["no-mlp", "no-q-projection", "position-embedding"])
def test_timm_attention_pool_options(options):
    """timm's head without an MLP (out_features=0: ``mlp`` is None), with the latent as the query, or
    with its own position embedding, runs on the kernels."""
    require_triton_path()
    head = randomize(_attention_pool_head(**options)).to(DEVICE).eval()
    x = torch.randn(2, 17, WIDTH, device=DEVICE)
    with torch.no_grad():
        ref, pt = copy.deepcopy(head).double()(x.double()), head(x)
        fast = vitfast.optimize(copy.deepcopy(head))
        with runtime.count_launches() as launches:
            out = fast(x)
    assert launches.get("attention") == 1, launches
    assert_parity(out, pt, ref)


def _siglip2_head():
    from transformers import Siglip2VisionConfig
    from transformers.models.siglip2.modeling_siglip2 import Siglip2MultiheadAttentionPoolingHead

    return Siglip2MultiheadAttentionPoolingHead(Siglip2VisionConfig(hidden_size=WIDTH, num_attention_heads=HEADS,
                                                                     intermediate_size=4 * WIDTH))


@pytest.mark.parametrize("implementation,all_padding,fused", [
    ("sdpa", False, True), ("eager", False, True), ("sdpa", True, False), (None, False, False)])
def test_siglip2_head_masks_as_transformers_does(implementation, all_padding, fused):
    """SigLIP 2's head masks its padding for the attention implementation: the kernel takes sdpa's and
    eager's padding mask. An image that is all padding, and a head built outside a model (no
    implementation set), run transformers' own code, whose answer for that image differs between
    releases: up to 5.24 an additive finfo.min mask attends uniformly to every token; from 5.25 the head
    hands ``nn.MultiheadAttention`` a ``key_padding_mask``, and PyTorch gives NaN for a query with no
    key. vitfast's answer is transformers' own there, NaN where it has NaN; every other image three-way."""
    require_triton_path()
    head = randomize(_siglip2_head()).to(DEVICE).eval()
    head.config._attn_implementation = implementation
    x = torch.randn(3, 17, WIDTH, device=DEVICE)
    mask = torch.ones(3, 17, dtype=torch.long, device=DEVICE)
    mask[1, 10:] = 0
    if all_padding:
        mask[2] = 0
    with torch.no_grad():
        ref = copy.deepcopy(head).double()(x.double(), attention_mask=mask)
        pt = head(x, attention_mask=mask)
        fast = vitfast.optimize(copy.deepcopy(head))
        with runtime.count_launches() as launches:
            out = fast(x, attention_mask=mask)
    assert ("attention" in launches) == fused, launches
    padded = mask.bool().logical_not().all(-1)
    assert torch.equal(out.isnan(), pt.isnan()) and not pt[~padded].isnan().any()
    assert_parity(out[~padded], pt[~padded], ref[~padded])
