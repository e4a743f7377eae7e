"""Changes made to a model after optimize, and after it has run: each shows at once, as it does on the
unmodified model (attributes set, dropout modules switched back to train(), another attention
function, a monkeypatched forward, parametrizations, a second optimize)."""
import copy
import inspect

import torch
import torch.nn.functional as F
from torch import nn

import vitfast
from vitfast import runtime
from helpers import DEVICE, assert_parity
from test_optimize import DEPTH, HEADS, IMG, WIDTH, _logits, _randomize, hf_vit, reference_vit, timm_vit


def _pair(model):
    model = _randomize(model).to(DEVICE).eval()
    return model, vitfast.optimize(copy.deepcopy(model))


def _images(batch=2):
    return torch.randn(batch, 3, IMG, IMG, device=DEVICE)


def _same(model, fast, x, run=_logits):
    with torch.no_grad():
        assert_parity(run(fast, x), run(model, x), run(copy.deepcopy(model).double(), x.double()))


def _run_then_edit(model, fast, x, edit):
    """One call of the optimized model (its checks pass and are remembered), then ``edit`` on both."""
    with torch.no_grad():
        _logits(fast, x)
    for m in (model, fast):
        edit(m)


def test_attribute_set_after_a_call_is_seen():
    x = _images()
    cases = [
        (reference_vit, lambda m: setattr(m.encoder.layers[0], "activation", F.mish)),
        (hf_vit, lambda m: setattr(m.vit.layers[0].attention.q_proj, "bias", None)),
        (timm_vit, lambda m: setattr(m.blocks[1].mlp.act, "approximate", "tanh")),
        (timm_vit, lambda m: setattr(m.blocks[0].norm1, "eps", 0.3)),
    ]
    for build, edit in cases:
        model, fast = _pair(build())
        _run_then_edit(model, fast, x, edit)
        _same(model, fast, x)


def test_monte_carlo_dropout_drops_as_the_original():
    """eval(), then the dropout modules back in train(): they drop, by their own flags (inside the
    kernels, so with other masks than the original's: at p = 1 the masks are all-zero, the same);
    back in eval the optimized model is the original again."""
    x = _images()
    for build in (lambda: timm_vit(proj_drop_rate=1.0, attn_drop_rate=1.0), hf_vit):
        model, fast = _pair(build())
        if build is hf_vit:
            for m in (model, fast):
                for layer in m.vit.layers:
                    layer.dropout.p = 1.0
        _run_then_edit(model, fast, x, lambda m: [d.train() for d in m.modules() if isinstance(d, nn.Dropout)])
        with runtime.count_launches() as launches:
            _same(model, fast, x)
        assert launches.get("attention"), launches
        with torch.no_grad():
            assert (_logits(model, x) - _logits(model.eval(), x)).abs().max() > 1e-3, "the original drops"
        fast.eval()
        _same(model, fast, x)


def test_another_attention_function_is_honoured():
    from transformers import AttentionInterface
    from transformers.models.vit.modeling_vit import eager_attention_forward

    def damped(module, query, key, value, attention_mask, **kwargs):
        out, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return 0.5 * out, weights

    AttentionInterface.register("vitfast-test-damped", damped)
    model, fast = _pair(hf_vit())
    x = _images()
    _run_then_edit(model, fast, x, lambda m: m.set_attn_implementation("vitfast-test-damped"))
    _same(model, fast, x, lambda m, x: m(x).logits)


def test_monkeypatched_class_forward_is_honoured():
    from timm.layers.attention import Attention

    model, fast = _pair(timm_vit())
    x = _images()
    stock = Attention.forward
    with torch.no_grad():
        _logits(fast, x)
    try:
        Attention.forward = lambda self, x, attn_mask=None, is_causal=False: 0.5 * stock(self, x)
        _same(model, fast, x)
    finally:
        Attention.forward = stock


def test_parametrizations_on_several_stand_ins():
    """torch's parametrizations subclass each module they touch: stand-ins included, more than once."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model, fast = _pair(reference_vit())
    for m in (model, fast):
        for layer in m.encoder.layers:
            parametrize.register_parametrization(layer.norm1, "weight", Double())
        weight_norm(m.patch_embed.proj)
    _same(model, fast, _images())


def test_names_and_signatures_stay_the_original_ones():
    """Code that finds layer classes by name (FSDP wrapping, device maps) or binds arguments by name
    (torch.fx, tracers) sees the original."""
    from transformers.trainer_pt_utils import get_module_class_from_name

    model, fast = _pair(hf_vit())
    layer_cls = get_module_class_from_name(fast, "ViTLayer")
    assert layer_cls is type(fast.vit.layers[0]) and issubclass(layer_cls, type(model.vit.layers[0]))
    for m, f in ((model.vit.layers[0], fast.vit.layers[0]), (model.vit.embeddings, fast.vit.embeddings)):
        assert type(f).__name__ == type(m).__name__
        assert inspect.signature(f.forward) == inspect.signature(m.forward)


def test_torch_func_transforms_run_the_original_code():
    model, fast = _pair(timm_vit())
    for m in (model, fast):
        for blk in m.blocks:
            blk.attn.fused_attn = False  # SDPA's CPU kernel has no double backward; timm's math path does
    x = _images()
    grads = []
    for m in (model, fast):
        params = dict(m.named_parameters())
        loss = lambda p: torch.func.functional_call(m, p, (x,)).square().mean()  # noqa: E731
        grads.append(torch.func.grad(loss)(params))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


def test_compile_fullgraph_with_a_stepping_aside_block():
    model, fast = _pair(timm_vit())
    x = _images()
    for m in (model, fast):
        m.blocks[0].mlp.fc1.register_forward_hook(lambda mod, args, out: 2 * out)
    torch._dynamo.reset()
    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    with torch.no_grad():
        compiled = torch.compile(fast, fullgraph=True, backend=backend)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_second_optimize_keeps_model_and_report():
    model, fast = _pair(timm_vit())
    first = str(fast.vitfast_report)
    types = [type(m) for m in fast.modules()]
    again = vitfast.optimize(fast)
    assert again is fast and [type(m) for m in fast.modules()] == types
    assert str(fast.vitfast_report) == first


def test_torchvision_conv_proj_output_is_a_plain_conv_output():
    from torchvision.models.vision_transformer import VisionTransformer

    model, fast = _pair(VisionTransformer(image_size=IMG, patch_size=8, num_layers=DEPTH, num_heads=HEADS,
                                          hidden_dim=WIDTH, mlp_dim=2 * WIDTH, num_classes=10))
    x = _images()
    with torch.no_grad(), runtime.count_launches() as launches:
        out = fast.conv_proj(input=x)
    assert launches.get("patch_embed") == 1 and out.is_contiguous()
    assert out.view(x.shape[0], -1).shape == (x.shape[0], WIDTH * (IMG // 8) ** 2)
    _same(model, fast, x, lambda m, x: m.conv_proj(x))
    _same(model, fast, torch.randn(0, 3, IMG, IMG, device=DEVICE))


def test_encoder_takes_nested_tensors_as_pytorch_does():
    layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, dropout=0.0, batch_first=True)
    model, fast = _pair(nn.TransformerEncoder(layer, DEPTH))
    nested = torch.nested.nested_tensor([torch.randn(5, WIDTH), torch.randn(3, WIDTH)], device=DEVICE)
    with torch.no_grad():
        for a, b in zip(fast(nested).unbind(), model(nested).unbind()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
