"""Patch-embedding backward on the kernels: every gradient against PyTorch's Conv2d composite
(conv2d, flatten, transpose, cat CLS, add positions) under autograd, three ways."""
import pytest
import torch
from timm.layers import resample_abs_pos_embed

from vitfast import reference, runtime
from vitfast.checks.patch_embed import composite
from vitfast.modules.patch_embed import PatchEmbeddingStage
from vitfast.ops.patch_embed import patch_embed
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, require_triton_path
from test_patch_embed import _inputs as forward_inputs, parameter_layouts

NAMES = ("images", "weight", "bias", "cls_token", "pos_embed")


def _torch_patch_embed(images, weight, bias, cls_token, pos_embed):
    """PyTorch's composite in the images' dtype; extras of another dtype are cast into it (differentiably)."""
    extras = [None if t is None else t.to(images.dtype) for t in (bias, cls_token, pos_embed)]
    return composite(images, weight, *extras)


def _inputs(batch, channels, size, patch, width, dtype, cls=True, pos_rows="n+1", layout="nchw",
            extras_dtype=None, grad=NAMES):
    """The forward tests' inputs; bias, class token and positions in ``extras_dtype``, and the
    arguments named in ``grad`` requiring gradients."""
    args = forward_inputs(batch, channels, size, patch, width, dtype, cls, pos_rows, layout=layout)
    for k in ("bias", "cls_token", "pos_embed"):
        if args[k] is not None:
            args[k] = args[k].to(extras_dtype or dtype)
    return {k: None if v is None else v.requires_grad_(k in grad) for k, v in args.items()}


def _grads(fn, args, upstream, dtype=None, **kwargs):
    """Gradients of sum(fn(args) · upstream) w.r.t. the args that require grad, each arg first
    cast to ``dtype`` (None: kept as it is, strides included)."""
    leaves = {k: None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)
              for k, t in args.items()}
    out = fn(**leaves, **kwargs)
    wrt = [leaves[k] for k in NAMES if leaves[k] is not None and leaves[k].requires_grad]
    return torch.autograd.grad(out, wrt, upstream.to(out.dtype))


def _check(args):
    """Three-way parity of every gradient; the GEMM kernel runs only when images or weight need one."""
    with torch.no_grad():
        upstream = torch.randn_like(_torch_patch_embed(**args))
    with runtime.count_launches() as launches, runtime.poison_outputs():
        out = _grads(patch_embed, args, upstream)
    gemm = args["images"].requires_grad or args["weight"].requires_grad
    assert launches == {"patch_embed": 1, **({"patch_embed_bwd": 1} if gemm else {})}
    pt = _grads(_torch_patch_embed, args, upstream)
    ref = _grads(_torch_patch_embed, args, upstream, torch.float64)
    names = [k for k in NAMES if args[k] is not None and args[k].requires_grad]
    for name, o, p, r in zip(names, out, pt, ref, strict=True):
        assert o.dtype == args[name].dtype, name
        assert_parity(o, p, r, what=f"grad of {name}")
    return dict(zip(names, out))


CASES = {
    # batch, channels, (H, W), P, D, CLS, position rows, layout
    # 288 tokens: the interpreter cuts the weight gradient's token reduction into two slices.
    "b3-c3-32x48-p4-cls-pos": (3, 3, (32, 48), 4, 40, True, "n+1", "nchw"),
    "b2-c1-32x32-p8-plain": (2, 1, (32, 32), 8, 96, False, None, "nchw"),
    "b2-c3-24x40-p8-cls-channels_last": (2, 3, (24, 40), 8, 40, True, None, "channels_last"),
    "b1-c3-16x16-p4-pos": (1, 3, (16, 16), 4, 96, False, "n", "nchw"),
    "b3-c3-16x40-p8-no_embed_class": (3, 3, (16, 40), 8, 40, True, "n", "nchw"),
    "b1-c1-16x24-p4-cls-pos-crop": (1, 1, (16, 24), 4, 40, True, "n+1", "crop"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_patch_embed_backward_matches_conv(case, dtype):
    require_triton_path()
    batch, channels, size, patch, width, cls, pos_rows, layout = case
    args = _inputs(batch, channels, size, patch, width, dtype, cls, pos_rows, layout)
    grads = _check(args)
    if layout == "channels_last":  # the image gradient is written in the images' own layout
        assert grads["images"].stride() == args["images"].stride()


@pytest.mark.parametrize("grad", [("weight", "bias"), ("images",), ("bias", "cls_token", "pos_embed"),
                                  ("weight", "pos_embed")],
                         ids=["frozen-images", "frozen-params", "extras-only", "weight-pos"])
def test_patch_embed_backward_some_inputs_need_grad(grad):
    _check(_inputs(2, 3, (16, 24), 8, 40, torch.float16, grad=grad))


def test_patch_embed_backward_fp32_extras_on_fp16_images():
    """Bias, class token and positions in fp32 on fp16 images: their gradients come back in fp32."""
    _check(_inputs(2, 3, (16, 16), 4, 40, torch.float16, extras_dtype=torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_patch_embed_backward_parameter_layouts(dtype):
    """Sliced, stride-0 and transposed weight, bias, class token and position leaves: the gradient
    kernels read the weight through its strides and every gradient lands in its leaf's shape."""
    require_triton_path()
    for _, args in parameter_layouts(_inputs(2, 3, (16, 24), 8, 40, dtype)):
        _check(args)


def test_patch_embed_backward_channels_last_weight():
    """A model moved to channels-last holds its conv weight that way; its gradient keeps the layout."""
    args = _inputs(2, 3, (16, 24), 4, 40, torch.float32, layout="channels_last")
    args["weight"] = args["weight"].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    grads = _check(args)
    assert grads["weight"].stride() == args["weight"].stride() != args["weight"].contiguous().stride()


@pytest.mark.parametrize("prefix", [1, 0], ids=["cls-pos", "no_embed_class"])
def test_patch_embed_backward_through_pos_resampling(prefix):
    """Autograd takes the position gradient back through the bicubic resampling of a 3x3 table."""
    args = _inputs(2, 3, (32, 48), 8, 40, torch.float32, cls=True, pos_rows=None)
    args["pos_embed"] = torch.randn(1, prefix + 9, 40, device=DEVICE, requires_grad=True)
    upstream = torch.randn(2, 1 + 4 * 6, 40, device=DEVICE)
    with runtime.count_launches() as launches:
        out = _grads(patch_embed, args, upstream, resample_pos_embed=True)
    assert launches == {"patch_embed": 1, "patch_embed_bwd": 1}

    def timm_resampled(images, weight, bias, cls_token, pos_embed):
        table = resample_abs_pos_embed(pos_embed, new_size=[4, 6], old_size=[3, 3], num_prefix_tokens=prefix)
        return _torch_patch_embed(images, weight, bias, cls_token, table)

    assert_parity(out, _grads(timm_resampled, args, upstream),
                  _grads(timm_resampled, args, upstream, torch.float64), what="grads")


def test_patch_embedding_stage_trains_on_the_kernels():
    """The reference ViT's embedding stage: every parameter's gradient, three ways."""
    vits = {dtype: reference.VisionTransformer(img_size=32, patch_size=8, embed_dim=40, n_layers=1, n_heads=2,
                                               n_classes=10).to(DEVICE, dtype)
            for dtype in (torch.float32, torch.float64)}
    vits[torch.float64].load_state_dict(vits[torch.float32].state_dict())
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    upstream = torch.randn(2, 17, 40, device=DEVICE)

    def grads(vit, fused):
        stage = (PatchEmbeddingStage(vit.patch_embed.proj, vit.cls_token, vit.pos_embed) if fused else
                 lambda im: torch.cat([vit.cls_token.expand(2, -1, -1), vit.patch_embed(im)], dim=1) + vit.pos_embed)
        params = [vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, vit.cls_token, vit.pos_embed]
        dtype = vit.pos_embed.dtype
        return torch.autograd.grad(stage(x.to(dtype)), params, upstream.to(dtype))

    with runtime.count_launches() as launches:
        out = grads(vits[torch.float32], fused=True)
    assert launches == {"patch_embed": 1, "patch_embed_bwd": 1}
    assert_parity(out, grads(vits[torch.float32], fused=False), grads(vits[torch.float64], fused=False),
                  what="grads of (weight, bias, cls_token, pos_embed)")


def test_patch_embed_backward_op_registrations():
    """Schema, fake (meta) kernel and autograd registration agree with the real ops."""
    args = _inputs(1, 3, (16, 24), 8, 40, torch.float32, layout="channels_last")
    table = args["pos_embed"][0]
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.vitfast.patch_embed_fwd,
                          (args["images"], args["weight"], args["bias"], args["cls_token"].reshape(40),
                           table[0], table[1:]), test_utils=tests)
    dtokens = torch.randn(1, 7, 40, device=DEVICE)
    for flags in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(torch.ops.vitfast.patch_embed_bwd,
                              (dtokens, args["images"].detach(), args["weight"].detach(), *flags),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
def test_patch_embed_backward_gpu_bf16_vit_b():
    _check(_inputs(64, 3, (224, 224), 16, 768, torch.bfloat16))
