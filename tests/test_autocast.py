"""Under ``torch.autocast`` every op follows PyTorch's policy for what it replaces: GEMMs, attention and
the patch embedding compute in the autocast dtype (the kernels receive half-precision operands),
LayerNorm as autocast treats ``layer_norm`` on the device, and outputs have eager's dtypes.

CPU runs fp16 autocast in Triton's interpreter (its fp16 dots are exact, its bf16 ones are not);
the GPU runs bf16, as people train."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

import vitfast
from vitfast import reference, runtime, train_check
from vitfast.testing import ATOL
from vitfast.ops import attention, gated_linear, layer_norm, linear, mlp, patch_embed
from helpers import DEVICE, assert_parity, require_triton_path

HALF = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
# What autocast computes in half precision, forward and backward; LayerNorm keeps the stream's fp32.
HALF_OPS = {"linear", "mlp", "attention", "patch_embed", "linear_bwd", "attention_bwd", "patch_embed_bwd"}


def _autocast(enabled: bool = True):
    return torch.autocast(DEVICE.type, dtype=HALF, enabled=enabled)


def _no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    return model.to(DEVICE).train()


def _run(model: nn.Module, x: torch.Tensor, upstream: torch.Tensor, amp: bool):
    """Output and the gradients of <model(x), upstream> wrt x and every parameter (by name)."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with _autocast(amp):
        y = model(x)
    (y.double() * upstream).sum().backward()
    return y, [x.grad] + [p.grad for _, p in sorted(model.named_parameters())]


def _timm_block(layer_scale):
    return Block(32, 2, mlp_ratio=2.0, init_values=0.1 if layer_scale else None), torch.randn(2, 17, 32)


def _reference_vit():
    model = reference.VisionTransformer(img_size=16, patch_size=4, in_channels=3, embed_dim=32, n_layers=2,
                                       n_heads=2, mlp_ratio=2.0, n_classes=10)
    return model, torch.randn(2, 3, 16, 16)


def _timm_vit():
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                              num_classes=10)
    return model, torch.randn(2, 3, 16, 16)


def _open_clip_vit():
    """open_clip's tower makes its residual stream half under autocast (the CLS token and positions
    cast to conv1's dtype): every block then meets half input and fp32 weights."""
    model = OpenClipVisionTransformer(image_size=16, patch_size=4, width=32, layers=2, heads=2, mlp_ratio=2.0,
                                      output_dim=16)
    return model, torch.randn(2, 3, 16, 16)


def _open_clip_block():
    return ResidualAttentionBlock(32, 2, mlp_ratio=2.0, ls_init_value=0.1, batch_first=True), torch.randn(2, 9, 32)


class _SelfAttention(nn.Module):
    """nn.MultiheadAttention as a ViT calls it: batch-first self-attention without the weights."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


MODELS = {
    "multihead-attention": lambda: (_SelfAttention(), torch.randn(2, 17, 32)),
    "timm-block": lambda: _timm_block(False),
    "timm-block-layerscale": lambda: _timm_block(True),
    "reference-vit": _reference_vit,
    "timm-vit": _timm_vit,
    "open_clip-block": _open_clip_block,
    "open_clip-vit": _open_clip_vit,
    "timm-block-half-input": lambda: (Block(32, 2, mlp_ratio=2.0), torch.randn(2, 17, 32).to(HALF)),
}


@pytest.mark.parametrize("name", MODELS)
def test_optimized_model_under_autocast_matches_eager(name):
    """Forward and every gradient within the three-way bound of eager autocast (float64 without
    autocast the reference), the output in eager's dtype, the kernels fed half-precision operands."""
    _check_against_eager(*MODELS[name](), name)


@pytest.mark.gpu
def test_vit_training_step_under_cuda_bf16_autocast():
    """As people train: a ViT with 64-wide heads and 224 px images' 197 tokens under CUDA bf16 autocast."""
    if DEVICE.type != "cuda":
        pytest.skip("needs a CUDA device")
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=256, depth=2, num_heads=4, num_classes=10,
                              init_values=0.1)
    _check_against_eager(model, torch.randn(4, 3, 224, 224))


def _check_against_eager(model: nn.Module, x: torch.Tensor, name: str = "") -> None:
    require_triton_path()
    model, x = _no_dropout(model), x.to(DEVICE)
    fast = vitfast.optimize(copy.deepcopy(model))
    with torch.no_grad(), _autocast():
        upstream = torch.randn_like(model(x), dtype=torch.float64)
    y_ref, g_ref = _run(copy.deepcopy(model).double(), x.double(), upstream, amp=False)
    y_pt, g_pt = _run(model, x, upstream, amp=True)
    with runtime.launch_dtypes() as dtypes, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a stand-in stepping aside warns: fail on it
        y_out, g_out = _run(fast, x, upstream, amp=True)
    # Computed in the autocast dtype, fp32 tensors included: its floor.
    atol = ATOL[HALF]
    assert y_out.dtype == y_pt.dtype
    assert_parity(y_out, y_pt, y_ref, atol, what="output")
    names = ["input"] + [n for n, _ in sorted(fast.named_parameters())]
    for what, o, p, r in zip(names, g_out, g_pt, g_ref):
        assert o.dtype == p.dtype, what
        assert_parity(o, p, r, atol, what=f"grad of {what}")
    assert {"attention", "attention_bwd", "linear_bwd"} <= dtypes.keys(), dtypes
    assert all(dtypes[op] == {HALF} for op in HALF_OPS & dtypes.keys()), dtypes
    # LayerNorm keeps the stream's dtype on CPU; on CUDA autocast computes it in fp32.
    stream = {torch.float32 if DEVICE.type == "cuda" else x.dtype}
    if name != "open_clip-vit":  # its stream turns half after conv1
        assert dtypes.get("layer_norm", stream) == dtypes.get("layer_norm_bwd", stream) == stream, dtypes


def _dtypes_under_autocast(fn, *args, **kwargs):
    with torch.no_grad(), _autocast():
        out = fn(*args, **kwargs)
    return [t.dtype for t in (out if isinstance(out, tuple) else (out,))]


def _eager_linear(x, w, b, activation=None, residual=None, scale=None):
    y = F.linear(x, w, b)
    y = F.gelu(y) if activation == "gelu" else y
    y = y if scale is None else y * scale
    return y if residual is None else y + residual


def test_op_output_dtypes_follow_eager_and_mixed_inputs_pass():
    """Inputs eager autocast accepts (half activations meeting fp32 weights, an fp32 residual stream
    meeting a half branch) do not raise, and each op's outputs have the dtypes eager gives."""
    require_triton_path()
    x, xh = torch.randn(2, 5, 16, device=DEVICE), torch.randn(2, 5, 16, device=DEVICE).to(HALF)
    w, b, s = (torch.randn(16, 16, device=DEVICE), torch.randn(16, device=DEVICE), torch.rand(16, device=DEVICE))
    for args in ((xh, w, b), (x, w.to(HALF), b)):
        assert _dtypes_under_autocast(linear, *args) == _dtypes_under_autocast(_eager_linear, *args) == [HALF]
    for residual in (None, x, xh):
        for scale in (None, s, s.to(HALF)):
            got = _dtypes_under_autocast(linear, xh, w, b, "gelu", residual=residual, scale=scale)
            eager = _dtypes_under_autocast(_eager_linear, xh, w, b, "gelu", residual=residual, scale=scale)
            assert got == eager, (residual, scale)
    assert _dtypes_under_autocast(mlp, x, w, b, w, b, residual=x) == [torch.float32]
    assert _dtypes_under_autocast(gated_linear, xh, w, b, w, b) == [HALF]
    assert _dtypes_under_autocast(attention, torch.randn(2, 5, 96, device=DEVICE), 2) == [HALF]

    ones, zeros = torch.ones(16, device=DEVICE), torch.zeros(16, device=DEVICE)
    for inp, residual in ((x, None), (xh, None), (x, xh), (xh, x), (xh, xh)):
        fused = _dtypes_under_autocast(layer_norm, inp, ones, zeros, residual=residual)
        total = inp if residual is None else inp + residual
        eager = _dtypes_under_autocast(F.layer_norm, total, (16,), ones, zeros)
        assert fused == eager + ([] if residual is None else [total.dtype]), (inp.dtype, residual)

    images, conv = torch.randn(2, 3, 8, 8, device=DEVICE), nn.Conv2d(3, 16, 4, stride=4).to(DEVICE)
    cls, pos = torch.randn(1, 1, 16, device=DEVICE), torch.randn(1, 5, 16, device=DEVICE)
    assert _dtypes_under_autocast(patch_embed, images.to(HALF), conv.weight, conv.bias) == [HALF]
    assert _dtypes_under_autocast(patch_embed, images, conv.weight, conv.bias, cls, pos) == [torch.float32]


def test_patch_embed_and_linear_values_under_autocast():
    """The fused results within the three-way bound of eager autocast, its half-precision GEMMs included."""
    require_triton_path()
    images, conv = torch.randn(2, 3, 8, 8, device=DEVICE), nn.Conv2d(3, 16, 4, stride=4).to(DEVICE)
    cls, pos = torch.randn(1, 1, 16, device=DEVICE), torch.randn(1, 5, 16, device=DEVICE)

    def eager(images, weight, bias, cls, pos):
        tokens = F.conv2d(images, weight, bias, stride=4).flatten(2).transpose(1, 2)
        return torch.cat([cls.expand(len(tokens), -1, -1), tokens], 1) + pos

    args = (images, conv.weight.detach(), conv.bias.detach(), cls, pos)
    with torch.no_grad():
        ref = eager(*(a.double() for a in args))
        with _autocast():
            assert_parity(patch_embed(*args), eager(*args), ref, what="patch_embed")
        x, w, r = torch.randn(3, 7, 32, device=DEVICE), torch.randn(24, 32, device=DEVICE) / 6, torch.randn(3, 7, 24)
        ref = _eager_linear(x.double(), w.double(), None, "gelu", r.double().to(DEVICE))
        with _autocast():
            assert_parity(linear(x, w, None, "gelu", residual=r.to(DEVICE)),
                          _eager_linear(x, w, None, "gelu", r.to(DEVICE)), ref, what="linear")


def test_custom_ops_carry_the_policy():
    """The policy is registered with torch.library: the custom ops cast their operands themselves,
    whoever calls them, and leave the residual's dtype (and, on CPU, LayerNorm's inputs) alone."""
    require_triton_path()
    x, w, r = torch.randn(4, 16, device=DEVICE), torch.randn(8, 16, device=DEVICE), torch.randn(4, 8, device=DEVICE)
    with torch.no_grad(), _autocast():
        y, _ = torch.ops.vitfast.linear_fwd(x, w, None, None, "none")
        y_res, _ = torch.ops.vitfast.linear_fwd(x, w, None, r, "none")
        ln = torch.ops.vitfast.layer_norm_fwd(x.to(HALF), torch.ones(16, device=DEVICE), None, 1e-5, None, False)[0]
        eager = F.linear(x, w)
    assert y.dtype == HALF and y_res.dtype == torch.float32
    assert_parity(y, eager, F.linear(x.double(), w.double()), what="linear_fwd")
    assert ln.dtype == (torch.float32 if DEVICE.type == "cuda" else HALF)


def test_compiled_graph_sees_autocast():
    """A graph traced under autocast (AOTAutograd, as torch.compile's) casts as eager does."""
    require_triton_path()
    block = _no_dropout(Block(32, 2, mlp_ratio=2.0)).eval()
    fast = vitfast.optimize(copy.deepcopy(block))
    x = torch.randn(2, 17, 32, device=DEVICE)
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), _autocast():
        expected = fast(x)
        with runtime.launch_dtypes() as dtypes:
            got = compiled(x)
    assert got.dtype == expected.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)
    assert dtypes["attention"] == {HALF}, dtypes


def test_float64_is_not_cast():
    """Autocast leaves float64 alone; so do the ops (which then take PyTorch, in float64)."""
    x, w = torch.randn(3, 8, dtype=torch.float64, device=DEVICE), torch.randn(4, 8, dtype=torch.float64, device=DEVICE)
    with torch.no_grad(), _autocast(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float64 fallback's own warning
        y = linear(x, w)
    assert y.dtype == torch.float64 and torch.allclose(y, x @ w.t())


def test_train_check_under_autocast_stays_near_pytorch():
    """A short fine-tune under autocast: vitfast's loss curve within twice what autocast moves
    PyTorch's own (its fp32 run) plus 1e-3, the loss falling, every kernel fed the autocast dtype."""
    curves = train_check.run(device=DEVICE, img_size=8, patch_size=4, batch=16, steps=20, lr=1e-2, amp=True)
    noise = curves.noise(1)
    assert 0 < noise and curves.max_rel_diff() <= 2 * noise + 1e-3, (curves.reference, curves.vitfast, curves.fp32)
    assert curves.falls() and not curves.missing_kernels(), curves.kernels
    assert not curves.wide_kernels(HALF) and curves.dtypes["linear_bwd"] == {HALF}, curves.dtypes


def test_train_check_command_takes_amp(capsys):
    from vitfast.__main__ import main

    assert main(["train-check", "--amp", "--steps", "2", "--batch", "4"]) in (0, 1)
    out = capsys.readouterr().out
    assert "autocast against its fp32 run" in out and f"attention {str(HALF).replace('torch.', '')}" in out


def test_float64_residual_takes_pytorch():
    """A float64 residual under autocast: eager adds it in float64, and so does vitfast (on PyTorch)."""
    x, w = torch.randn(3, 8, device=DEVICE), torch.zeros(4, 8, device=DEVICE)
    residual = torch.full((3, 4), 1 + 1e-12, dtype=torch.float64, device=DEVICE)
    with torch.no_grad(), _autocast(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = linear(x, w, residual=residual)
    assert y.dtype == torch.float64 and torch.equal(y, residual)


def test_direct_custom_op_calls_get_eager_dtypes_or_a_clear_error():
    """Called directly (as an exported graph calls them), the custom ops promote their result as eager
    would, and on the CPU refuse the bf16 dots Triton's interpreter computes wrongly."""
    require_triton_path()
    x, w, s = torch.randn(4, 16, device=DEVICE), torch.randn(8, 16, device=DEVICE), torch.rand(8, device=DEVICE)
    images, weight = torch.randn(2, 3, 8, 8, device=DEVICE), torch.randn(16, 3, 4, 4, device=DEVICE)
    cls, pos = torch.randn(16, device=DEVICE), torch.randn(4, 16, device=DEVICE)
    with torch.no_grad(), _autocast():
        y, _ = torch.ops.vitfast.linear_fwd(x, w, None, None, "none", False, s)
        tokens = torch.ops.vitfast.patch_embed_fwd(images, weight, None, cls, cls, pos)
    assert y.dtype == tokens.dtype == torch.float32
    if DEVICE.type == "cpu":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            with pytest.raises(RuntimeError, match="bfloat16 dots are wrong"):
                torch.ops.vitfast.linear_fwd(x, w, None, None, "none")
