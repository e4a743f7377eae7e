"""vitfast.optimize on open_clip's models: the vision tower, its blocks sequence-first, and CLIP's towers."""
import copy

import open_clip
import pytest
import torch
from open_clip.transformer import (CustomResidualAttentionBlock, LayerNormFp32, QuickGELU, ResidualAttentionBlock,
                                   Transformer, VisionTransformer)
from torch import nn

import vitfast
from vitfast import runtime
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, require_triton_path
from test_optimize import _randomize

IMG, PATCH, WIDTH, DEPTH, HEADS, OUT = 32, 8, 64, 2, 2, 16  # head size 32, 17 tokens

VARIANTS = {
    "default": {},
    "quick_gelu_layer_scale": {"act_layer": QuickGELU, "ls_init_value": 0.1},
    "layer_norm_fp32": {"norm_layer": LayerNormFp32},
}


def _vision_tower(**kwargs):
    return VisionTransformer(image_size=IMG, patch_size=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS, mlp_ratio=4,
                             output_dim=OUT, **kwargs)


def _to(model, dtype):
    """The model in ``dtype``, LayerNormFp32's parameters kept in fp32 as open_clip keeps them."""
    model = copy.deepcopy(model).to(dtype)
    for m in model.modules():
        if isinstance(m, LayerNormFp32):
            m.float()
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_optimize_open_clip_vision_tower(variant, dtype):
    require_triton_path()
    model = _randomize(_vision_tower(**VARIANTS[variant])).to(DEVICE).eval()
    x = torch.randn(3, 3, IMG, IMG, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        ref = _to(model, torch.float64)(x.double())  # LayerNormFp32 rounds to fp32 there too: it is its definition
        pt_model = _to(model, dtype)
        pt = pt_model(x)
        fast = vitfast.optimize(_to(model, dtype))
        norm = "FusedLayerNormFp32" if variant == "layer_norm_fp32" else "FusedOpenClipLayerNorm"
        assert fast.vitfast_report.counts() == {"PatchConv2d": 1, "FusedOpenClipBlock": DEPTH, norm: 2 + 2 * DEPTH}, \
            str(fast.vitfast_report)
        with runtime.count_launches() as launches:
            out = fast(x)
    # Every block ran attention and MLP on the kernels, with its two norms; the embedding and ln_pre/ln_post too.
    assert launches == {"patch_embed": 1, "layer_norm": 2 + 2 * DEPTH, "linear": 2 * DEPTH, "attention": DEPTH,
                        "mlp": DEPTH}, launches
    assert out.dtype == dtype
    assert_parity(out, pt, ref)
    assert list(fast.state_dict()) == list(pt_model.state_dict())


def _causal(n):
    return torch.full((n, n), float("-inf"), device=DEVICE).triu(1)


@pytest.mark.parametrize("mask", [None, "causal", "per_head"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_optimize_open_clip_transformer(mask, batch_first, dtype):
    """open_clip's Transformer runs its blocks sequence-first ([N, B, D]) unless batch_first; masks are
    cast to the tokens' dtype and added, as ResidualAttentionBlock does."""
    require_triton_path()
    model = _randomize(Transformer(WIDTH, DEPTH, HEADS, batch_first=batch_first, ls_init_value=0.1)).to(DEVICE).eval()
    B, N = 3, 17
    x = torch.randn(B, N, WIDTH, device=DEVICE, dtype=dtype)
    attn_mask = {None: None, "causal": _causal(N),
                 "per_head": torch.randn(B * HEADS, N, N, device=DEVICE)}[mask]  # fp32, cast by the block
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double(), attn_mask=attn_mask)
        pt = copy.deepcopy(model).to(dtype)(x, attn_mask=attn_mask)
        fast = vitfast.optimize(copy.deepcopy(model).to(dtype))
        assert fast.vitfast_report.counts().get("FusedOpenClipBlock") == DEPTH
        with runtime.count_launches() as launches:
            out = fast(x, attn_mask=attn_mask)
    assert launches.get("attention") == DEPTH and launches.get("mlp") == DEPTH, launches
    assert out.shape == pt.shape and out.dtype == dtype
    assert_parity(out, pt, ref)


def test_optimize_open_clip_block_leaves_what_it_does_not_fuse():
    """A cross-attention block and open_clip's custom block stay as they are; the attention pooler's
    cross-attention MultiheadAttention is left with its reason."""
    cross = ResidualAttentionBlock(WIDTH, HEADS, is_cross_attention=True)
    custom = CustomResidualAttentionBlock(WIDTH, HEADS, qk_norm=True)
    pooled = _vision_tower(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)
    model = nn.ModuleList([cross, custom, pooled]).to(DEVICE)
    vitfast.optimize(model)
    assert type(cross) is ResidualAttentionBlock and type(custom) is CustomResidualAttentionBlock
    skipped = {e.path: e.result for e in model.vitfast_report.skipped}
    assert "ln_1_kv" in skipped["0"] and "kdim/vdim" in skipped["2.attn_pool.attn"], skipped
    # The cross-attention block's own attention is swapped: it declines the cross-attention call.
    assert isinstance(cross.attn, vitfast.modules.MultiheadAttention)
    q, kv = torch.randn(2, 5, WIDTH, device=DEVICE), torch.randn(2, 7, WIDTH, device=DEVICE)
    with torch.no_grad(), runtime.count_launches() as launches:
        cross(q, kv, kv)
    assert not launches.get("attention"), launches


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quick_gelu"])
def test_optimize_open_clip_clip_towers(quick_gelu):
    """The whole CLIP model: image tower as above, text tower with its causal mask."""
    require_triton_path()
    model = open_clip.CLIP(
        embed_dim=OUT, quick_gelu=quick_gelu,
        vision_cfg={"image_size": IMG, "patch_size": PATCH, "width": WIDTH, "layers": DEPTH, "head_width": 32},
        text_cfg={"context_length": 13, "vocab_size": 50, "width": WIDTH, "heads": HEADS, "layers": DEPTH},
    )
    model = _randomize(model).to(DEVICE).eval()
    images = torch.randn(2, 3, IMG, IMG, device=DEVICE)
    text = torch.randint(1, 50, (2, 13), device=DEVICE)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()
        ref_out = (ref.encode_image(images.double()), ref.encode_text(text))
        pt_out = (model.encode_image(images), model.encode_text(text))
        fast = vitfast.optimize(copy.deepcopy(model))
        assert fast.vitfast_report.counts().get("FusedOpenClipBlock") == 2 * DEPTH, str(fast.vitfast_report)
        with runtime.count_launches() as image_launches:
            image = fast.encode_image(images)
        with runtime.count_launches() as text_launches:
            txt = fast.encode_text(text)
    for launches in (image_launches, text_launches):
        assert launches.get("attention") == DEPTH and launches.get("mlp") == DEPTH, launches
    assert_parity(image, pt_out[0], ref_out[0])
    assert_parity(txt, pt_out[1], ref_out[1])


@pytest.mark.parametrize("weights,images", [(torch.float16, torch.float32), (torch.float32, torch.float16),
                                            (torch.float32, torch.float64), (torch.float32, torch.uint8)])
def test_patch_projection_raises_what_conv2d_raises(weights, images):
    """Images the convolution refuses get PyTorch's own error (conv1 runs Conv2d's forward for them)."""
    tower = _randomize(_vision_tower()).to(DEVICE, weights).eval()
    fast = vitfast.optimize(copy.deepcopy(tower))
    x = (torch.rand(2, 3, IMG, IMG, device=DEVICE) * 255).to(images)
    errors = []
    for model in (tower, fast):
        with torch.no_grad(), pytest.raises(Exception) as caught:  # noqa: PT011: whatever PyTorch raises
            model(x)
        errors.append((type(caught.value), str(caught.value)))
    assert errors[0] == errors[1]


def test_autocast_keeps_the_patch_projection_dtype():
    """Under autocast, Conv2d computes in the autocast dtype; conv1 and the tokens after it keep it."""
    require_triton_path()
    tower = _randomize(_vision_tower(output_tokens=True)).to(DEVICE).eval()
    fast = vitfast.optimize(copy.deepcopy(tower))
    x = torch.randn(2, 3, IMG, IMG, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        expected = [t.dtype for t in tower(x)] + [tower.conv1(x).dtype]
        got = [t.dtype for t in fast(x)] + [fast.conv1(x).dtype]
    assert got == expected
