"""Gradients of the drop-in modules against PyTorch's, and a short fine-tune side by side."""
import copy

import pytest
import torch
from torch import nn

import vitfast
from vitfast import runtime, train_check
from helpers import DEVICE, DTYPE_IDS, DTYPES, assert_parity, require_triton_path

BACKWARD_OPS = ("layer_norm_bwd", "linear_bwd", "attention_bwd")


def _grads(module, x, upstream):
    """(input gradient, parameter gradients by name) of <module(x), upstream>."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x)
    out.backward(upstream.to(out.dtype))
    return [x.grad] + [p.grad for _, p in sorted(module.named_parameters())]


def _three_way_grads(torch_module, fast_module, x, dtype):
    require_triton_path()
    upstream = torch.randn_like(torch_module(x).float())
    ref = _grads(copy.deepcopy(torch_module).double(), x.double(), upstream.double())
    pt = _grads(copy.deepcopy(torch_module).to(dtype), x.to(dtype), upstream)
    with runtime.count_launches() as launches:
        out = _grads(fast_module.to(dtype), x.to(dtype), upstream)
    for op in BACKWARD_OPS:
        assert launches.get(op, 0) >= 1, f"{op} did not run: {launches}"
    names = ["input"] + [n for n, _ in sorted(fast_module.named_parameters())]
    for name, o, p, r in zip(names, out, pt, ref):
        assert_parity(o, p, r, what=f"grad of {name}")


def _layer(norm_first):
    layer = nn.TransformerEncoderLayer(32, 2, 48, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=norm_first).to(DEVICE)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer.train()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
def test_encoder_layer_gradients(dtype, norm_first):
    layer = _layer(norm_first)
    fast = vitfast.FastTransformerEncoderLayer.from_torch(copy.deepcopy(layer))
    _three_way_grads(layer, fast, torch.randn(3, 17, 32, device=DEVICE), dtype)


def test_encoder_gradients_with_final_norm():
    encoder = nn.TransformerEncoder(_layer(False), 2, norm=nn.LayerNorm(32), enable_nested_tensor=False).to(DEVICE)
    fast = vitfast.FastTransformerEncoder.from_torch(copy.deepcopy(encoder))
    _three_way_grads(encoder, fast, torch.randn(2, 9, 32, device=DEVICE), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reference_vit_gradients(dtype):
    model = train_check.small_vit(img_size=16, width=32, layers=2, heads=2).to(DEVICE).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fast = vitfast.optimize(copy.deepcopy(model))
    images = torch.randn(2, 1, 16, 16, device=DEVICE)
    _three_way_grads(model, fast, images, dtype)


def test_train_check_losses_agree_and_fall():
    # The digits at their own 8×8 (4 patches), batch 16: the loss falls within 20 steps, at a fraction
    # of the interpreter time of the command's default (16 px, 16 patches, batch 32, 40 steps).
    curves = train_check.run(device=DEVICE, img_size=8, patch_size=4, batch=16, steps=20, lr=1e-2)
    assert curves.max_rel_diff() <= 1e-3, list(zip(curves.reference, curves.vitfast))
    assert curves.falls(), curves.reference
    for op in BACKWARD_OPS + ("patch_embed_bwd",):
        assert curves.kernels.get(op, 0) > 0, curves.kernels


def test_train_check_command_prints_both_curves(capsys):
    from vitfast.__main__ import main

    assert main(["train-check", "--steps", "2", "--batch", "4", "--tolerance", "1e-3"]) in (0, 1)
    out = capsys.readouterr().out
    assert "PyTorch loss" in out and "vitfast loss" in out and "Triton launches" in out
