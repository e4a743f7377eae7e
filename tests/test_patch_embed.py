import itertools

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from vitfast import reference, runtime
from vitfast.checks.patch_embed import composite
from vitfast.modules.patch_embed import PatchEmbedding, PatchEmbeddingStage
from vitfast.ops.patch_embed import patch_embed
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, layouts, require_triton_path


def _inputs(batch, channels, size, patch, width, dtype, cls=True, pos_rows="n+1", bias=True, layout="nchw"):
    h, w = size
    n = (h // patch) * (w // patch)
    images = torch.randn(batch, channels, h, w + 8 * (layout == "crop"), device=DEVICE, dtype=dtype)
    if layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    elif layout == "crop":
        images = images[..., 3:3 + w]  # a view: row stride wider than the row
    weight = torch.randn(width, channels, patch, patch, device=DEVICE, dtype=dtype) / patch
    rows = {"n+1": n + 1, "n": n, None: 0}[pos_rows]
    return dict(
        images=images, weight=weight,
        bias=torch.randn(width, device=DEVICE, dtype=dtype) if bias else None,
        cls_token=torch.randn(1, 1, width, device=DEVICE, dtype=dtype) if cls else None,
        pos_embed=torch.randn(1, rows, width, device=DEVICE, dtype=dtype) if rows else None,
    )


def _double(args):
    return {k: None if v is None else v.double() for k, v in args.items()}


def _check(args, **kwargs):
    with runtime.count_launches() as launches:
        out = patch_embed(**args, **kwargs)
    assert launches.get("patch_embed") == 1
    assert out.dtype == args["images"].dtype
    assert_parity(out, composite(**args), composite(**_double(args)))
    return out


@pytest.mark.parametrize("cls", [False, True])
def test_patch_embed_channels_first_layout(cls):
    """channels_first stores the tokens as a Conv2d stores its output; values and gradients unchanged."""
    require_triton_path()
    args = _inputs(3, 3, (16, 24), 8, 40, torch.float32, cls=cls, pos_rows="n+1" if cls else None)
    leaves = {k: None if v is None else v.detach().requires_grad_() for k, v in args.items()}
    out = _check(leaves, channels_first=True)
    assert out.transpose(1, 2).is_contiguous()
    expected = patch_embed(**args)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [leaves["images"], leaves["weight"]], grad)
    want = torch.autograd.grad(patch_embed(**leaves), [leaves["images"], leaves["weight"]], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


CASES = {
    # batch, channels, (H, W), P, D, CLS, position rows, layout
    "b3-c3-32x32-p8-cls-pos": (3, 3, (32, 32), 8, 96, True, "n+1", "nchw"),
    "b1-c1-16x40-p4-pos-channels_last": (1, 1, (16, 40), 4, 40, False, "n", "channels_last"),
    "b3-c4-28x28-p14-cls-channels_last": (3, 4, (28, 28), 14, 40, True, None, "channels_last"),
    "b1-c3-32x16-p16-plain-crop": (1, 3, (32, 16), 16, 96, False, None, "crop"),
    "b3-c3-16x40-p8-no_embed_class": (3, 3, (16, 40), 8, 40, True, "n", "nchw"),
    "b3-c3-32x64-p32-cls-pos": (3, 3, (32, 64), 32, 40, True, "n+1", "nchw"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_patch_embed_matches_conv(case, dtype):
    require_triton_path()
    batch, channels, size, patch, width, cls, pos_rows, layout = case
    out = _check(_inputs(batch, channels, size, patch, width, dtype, cls, pos_rows, layout=layout))
    n = (size[0] // patch) * (size[1] // patch)
    assert out.shape == (batch, n + cls, width)


def parameter_layouts(args):
    """(name, args) with weight, bias, class token and positions together in each layout of
    ``helpers.layouts``; the 1-D bias, which has no transposed layout, keeps its own there."""
    names = ("weight", "bias", "cls_token", "pos_embed")
    for pairs in itertools.zip_longest(*(layouts(args[k]) for k in names), fillvalue=(None, None)):
        yield pairs[0][0], {**args, **{k: t for k, (_, t) in zip(names, pairs) if t is not None}}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_patch_embed_parameter_layouts(dtype):
    """Weight, bias, class token and positions are read through their strides: sliced, stride 0
    (one value broadcast along the features), transposed."""
    require_triton_path()
    for name, args in parameter_layouts(_inputs(2, 3, (16, 24), 8, 40, dtype)):
        assert name == "contiguous" or not args["pos_embed"].is_contiguous()
        _check(args)


def test_patch_embed_flat_shapes_mixed_dtypes_no_bias():
    """cls_token [D], pos_embed [N+1, D], fp32 extras on fp16 images, no bias."""
    args = _inputs(2, 3, (16, 16), 8, 40, torch.float16, bias=False)
    args["cls_token"] = args["cls_token"].reshape(40).float()
    args["pos_embed"] = args["pos_embed"][0].float()
    with runtime.count_launches() as launches:
        out = patch_embed(**args)
    assert launches["patch_embed"] == 1 and out.dtype == torch.float16
    pt_args = {k: v if v is None else v.half() for k, v in args.items()}
    assert_parity(out, composite(**pt_args), composite(**_double(args)))


@pytest.mark.gpu
def test_patch_embed_gpu_bf16_vit_b():
    _check(_inputs(256, 3, (224, 224), 16, 768, torch.bfloat16))


def _reference_pe():
    pe = reference.PatchEmbedding(img_size=32, patch_size=8, in_channels=3, embed_dim=40).to(DEVICE)
    with torch.no_grad():
        pe.proj.bias.normal_()
    return pe


def test_patch_embedding_module_drop_in():
    ref_mod = _reference_pe()
    mod = PatchEmbedding(img_size=32, patch_size=8, in_channels=3, embed_dim=40).to(DEVICE)
    assert mod.load_state_dict(ref_mod.state_dict()) is not None
    assert isinstance(mod, reference.PatchEmbedding)
    assert list(mod.state_dict()) == list(ref_mod.state_dict()) == ["proj.weight", "proj.bias"]
    back = reference.PatchEmbedding(img_size=32, patch_size=8, in_channels=3, embed_dim=40).to(DEVICE)
    back.load_state_dict(mod.state_dict())
    torch.testing.assert_close(back.proj.weight, ref_mod.proj.weight, rtol=0, atol=0)

    x = torch.randn(3, 3, 32, 32, device=DEVICE)
    with torch.no_grad(), runtime.count_launches() as launches:
        out = mod(x)
        pt = ref_mod(x)
    assert launches["patch_embed"] == 1
    ref = torch.nn.functional.conv2d(x.double(), ref_mod.proj.weight.double(), ref_mod.proj.bias.double(),
                                     stride=8).flatten(2).transpose(1, 2)
    assert_parity(out, pt, ref)

    shared = PatchEmbedding.from_torch(ref_mod)
    assert shared.proj.weight is ref_mod.proj.weight
    with torch.no_grad():
        torch.testing.assert_close(shared(x), out, rtol=0, atol=0)


def test_patch_embedding_from_torch_rejects_overlapping_conv():
    pe = _reference_pe()
    pe.proj.stride = (4, 4)
    with pytest.raises(ValueError, match=r"proj.stride must be \(8, 8\) for a patch embedding, got \(4, 4\)"):
        PatchEmbedding.from_torch(pe)


def test_patch_embedding_stage_matches_reference_vit():
    vit = reference.VisionTransformer(img_size=32, patch_size=8, embed_dim=40, n_layers=1, n_heads=2,
                                      n_classes=10).to(DEVICE)
    stage = PatchEmbeddingStage(vit.patch_embed.proj, vit.cls_token, vit.pos_embed)
    assert stage.cls_token is vit.cls_token and stage.pos_embed is vit.pos_embed
    assert stage.proj.weight is vit.patch_embed.proj.weight
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad(), runtime.count_launches() as launches:
        out = stage(x)
        pt = torch.cat([vit.cls_token.expand(2, -1, -1), vit.patch_embed(x)], dim=1) + vit.pos_embed
    assert launches["patch_embed"] == 1
    args = dict(images=x, weight=vit.patch_embed.proj.weight, bias=vit.patch_embed.proj.bias,
                cls_token=vit.cls_token, pos_embed=vit.pos_embed)
    assert_parity(out, pt, composite(**_double(args)))
    no_extras = PatchEmbeddingStage(vit.patch_embed.proj)
    assert [name for name, _ in no_extras.named_parameters()] == ["proj.weight", "proj.bias"]


RESAMPLE = {
    # images (H, W), P, position grid (as given to the op, None = square), its rows, CLS
    "up-4x4-to-4x6": ((32, 48), 8, (4, 4), None, True),
    "down-4x4-to-2x3-antialias": ((16, 24), 8, (4, 4), None, True),
    "rect-2x4-to-3x3-no_cls": ((24, 24), 8, (2, 4), (2, 4), False),
    "no_embed_class-3x3-to-4x5": ((32, 40), 8, (3, 3), None, "no_embed_class"),
}


@pytest.mark.parametrize("case", RESAMPLE.values(), ids=RESAMPLE.keys())
def test_patch_embed_resamples_pos_embed_like_timm(case):
    size, patch, old, pos_grid, cls = case
    new = (size[0] // patch, size[1] // patch)
    prefix = int(cls is True)
    args = _inputs(2, 3, size, patch, 40, torch.float32, cls=bool(cls), pos_rows=None)
    pos = torch.randn(1, prefix + old[0] * old[1], 40, device=DEVICE)
    args["pos_embed"] = pos
    with pytest.raises(ValueError, match=f"covers a {old[0]}x{old[1]} patch grid but the images give "
                                         f"{new[0]}x{new[1]}; pass resample_pos_embed=True"):
        patch_embed(**args, pos_grid=pos_grid)
    with runtime.count_launches() as launches:
        out = patch_embed(**args, resample_pos_embed=True, pos_grid=pos_grid)
    assert launches["patch_embed"] == 1
    resampled = resample_abs_pos_embed(pos, new_size=list(new), old_size=list(old), num_prefix_tokens=prefix)
    args["pos_embed"] = resampled
    assert_parity(out, composite(**args), composite(**_double(args)))


def test_patch_embed_gradients_run_on_the_kernels():
    args = _inputs(2, 3, (16, 16), 8, 40, torch.float32)
    for t in args.values():
        t.requires_grad_(True)
    with runtime.count_launches() as launches:
        out = patch_embed(**args)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, list(args.values()), grad)
    assert launches == {"patch_embed": 1, "patch_embed_bwd": 1}
    want = torch.autograd.grad(composite(**args), list(args.values()), grad)
    for name, g, w in zip(args, got, want):
        torch.testing.assert_close(g, w, msg=lambda m: f"grad of {name}: {m}")


def test_patch_embed_pytorch_fallback_without_triton():
    args = _inputs(3, 3, (16, 24), 8, 40, torch.float32)
    with runtime.fallback_only(), runtime.count_launches() as launches:
        out = patch_embed(**args)
    assert not launches
    assert_parity(out, composite(**args), composite(**_double(args)))


def test_patch_embed_fake_tensor_registration():
    args = _inputs(1, 3, (16, 16), 8, 40, torch.float32)
    table = args["pos_embed"][0]
    torch.library.opcheck(torch.ops.vitfast.patch_embed_fwd,
                          (args["images"], args["weight"], args["bias"], args["cls_token"].reshape(40),
                           table[0], table[1:]),
                          test_utils=("test_schema", "test_faketensor"))


def _bad(**overrides):
    args = dict(images=torch.randn(2, 3, 32, 32), weight=torch.randn(64, 3, 8, 8), bias=torch.randn(64),
                cls_token=torch.randn(1, 1, 64), pos_embed=torch.randn(1, 17, 64))
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "args, exc, words",
    [
        (_bad(images=torch.randn(2, 3, 30, 32)), ValueError,
         "images height 30 is not a positive multiple of the patch size 8 (images shape (2, 3, 30, 32))"),
        (_bad(images=torch.randn(2, 3, 32, 36)), ValueError, "images width 36 is not a positive multiple"),
        (_bad(images=torch.randn(2, 4, 32, 32)), ValueError, "images has 4 channels but weight expects 3"),
        (_bad(images=torch.randn(3, 32, 32)), ValueError,
         "images must be 4-D [B, C, H, W], got shape (3, 32, 32)"),
        (_bad(images=torch.ones(2, 3, 32, 32, dtype=torch.uint8)), TypeError,
         "images must be float32, float16, bfloat16 or float64, got torch.uint8"),
        (_bad(weight=torch.randn(64, 192)), ValueError,
         "weight must be 4-D [D, C, P, P] (Conv2d layout), got shape (64, 192)"),
        (_bad(weight=torch.randn(64, 3, 8, 4)), ValueError,
         "weight must have a square P x P kernel with P >= 1, got 8 x 4"),
        (_bad(weight=torch.randn(64, 3, 0, 0)), ValueError,
         "weight must have a square P x P kernel with P >= 1, got 0 x 0"),
        (_bad(weight=torch.randn(64, 3, 8, 8, dtype=torch.float16)), TypeError,
         "weight has dtype torch.float16 but images has dtype torch.float32"),
        (_bad(bias=torch.randn(63)), ValueError, "bias must have shape (64,), got (63,)"),
        (_bad(cls_token=torch.randn(1, 1, 32)), ValueError,
         "cls_token must have shape (1, 1, 64) or (64,), got (1, 1, 32)"),
        (_bad(pos_embed=torch.randn(1, 17, 32)), ValueError,
         "pos_embed must have width 64 (the weight's output features), got 32"),
        (_bad(pos_embed=torch.randn(1, 20, 64)), ValueError,
         "pos_embed has 20 rows: not 16 or 17 for the images' 4x4 grid, nor a square grid"),
        (_bad(pos_embed=torch.randn(2, 17, 64)), ValueError, "pos_embed must have shape [1, R, D] or [R, D]"),
        (_bad(cls_token=None), ValueError,
         "pos_embed has 17 rows, a class position plus a 4x4 grid, but cls_token is None"),
        (_bad(pos_embed=torch.randn(1, 37, 64)), ValueError,
         "pos_embed covers a 6x6 patch grid but the images give 4x4; pass resample_pos_embed=True"),
        (_bad(weight=torch.randn(64, 3, 8, 8, device="meta")), ValueError, "weight is on meta but images is on cpu"),
        (_bad(pos_embed=[0.0] * 17), TypeError, "pos_embed must be a torch.Tensor, got list"),
        (_bad(images=torch.randn(2, 3, 32, 32).to_sparse()), TypeError,
         "images must be a dense (strided) tensor, got layout torch.sparse_coo"),
    ],
    ids=["height", "width", "channels", "images-3d", "int-images", "weight-2d", "weight-rect", "weight-empty-patch",
         "weight-dtype", "bias", "cls-width", "pos-width", "pos-rows", "pos-batch", "pos-cls-without-cls", "pos-grid",
         "device-mix", "pos-type", "sparse-images"],
)
def test_patch_embed_bad_input(args, exc, words):
    with runtime.count_launches() as launches, pytest.raises(exc) as info:
        patch_embed(**args)
    assert words in str(info.value)
    assert not launches
