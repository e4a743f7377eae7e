"""Hugging Face image encoders after vitfast.optimize: every output option and input the fused path
does not compute is handed to transformers' own code, never dropped; masks and causal text towers
run on the kernels."""
import copy

import pytest
import torch

import vitfast
from vitfast import runtime
from helpers import DEVICE, assert_parity, require_triton_path
from test_optimize_models import DEPTH, HEADS, IMG, PATCH, WIDTH, _hf, _hf_clip_model, randomize

F32 = torch.float32


def _three(build, run, dtype=F32):
    """(vitfast's result, PyTorch's, float64 reference, launches) of ``run(model)`` on one random model."""
    require_triton_path()
    model = randomize(build()).to(DEVICE).eval()
    with torch.no_grad():
        ref = run(copy.deepcopy(model).double(), torch.float64)
        pt = run(copy.deepcopy(model).to(dtype), dtype)
        fast = vitfast.optimize(copy.deepcopy(model).to(dtype))
        with runtime.count_launches() as launches:
            out = run(fast, dtype)
    return out, pt, ref, launches


def _pixels(dtype, size=IMG, batch=2):
    return torch.randn(batch, 3, *((size, size) if isinstance(size, int) else size), device=DEVICE,
                       generator=torch.Generator(DEVICE).manual_seed(0)).to(dtype)


@pytest.mark.parametrize("padding", [False, True])
def test_clip_text_tower_is_causal_on_the_kernels(padding):
    ids = torch.randint(2, 64, (2, 7), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0

    def run(model, dtype):
        out = model.get_text_features(input_ids=ids, attention_mask=mask if padding else None)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    out, pt, ref, launches = _three(_hf_clip_model, run)
    assert launches.get("attention") == DEPTH and launches.get("mlp") == DEPTH, launches
    assert_parity(out, pt, ref)


@pytest.mark.parametrize("model,config,read", [
    ("CLIPVisionModel", "CLIPVisionConfig", "last_hidden_state"),
    ("SiglipVisionModel", "SiglipVisionConfig", "pooler_output"),
    ("DeiTModel", "DeiTConfig", "last_hidden_state"),
    ("ViTModel", "ViTConfig", "last_hidden_state"),
])
def test_interpolated_positions_run_transformers_embeddings(model, config, read):
    """Another image size with interpolate_pos_encoding: the embeddings run transformers' code, the
    layers stay on the kernels."""
    def run(m, dtype):
        return getattr(m(pixel_values=_pixels(dtype, IMG + 2 * PATCH), interpolate_pos_encoding=True), read)

    out, pt, ref, launches = _three(_hf(model, config), run)
    heads = int(model.startswith("Siglip"))  # SigLIP's attention-pooling head runs on the kernels too
    assert "patch_embed" not in launches and launches.get("attention") == DEPTH + heads, launches
    assert_parity(out, pt, ref)


@pytest.mark.parametrize("size", [IMG + PATCH, (IMG, IMG + 2 * PATCH)])
def test_dinov2_other_image_sizes_interpolate_in_transformers(size):
    def run(m, dtype):
        return m(pixel_values=_pixels(dtype, size)).pooler_output

    out, pt, ref, launches = _three(_hf("Dinov2Model", "Dinov2Config"), run)
    assert "patch_embed" not in launches and launches.get("attention") == DEPTH, launches
    assert_parity(out, pt, ref)


@pytest.mark.parametrize("model,config,extra", [
    ("Dinov2Model", "Dinov2Config", {}),
    ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", {}),
])
def test_masked_patches_run_transformers_embeddings(model, config, extra):
    masked = torch.zeros(2, (IMG // PATCH) ** 2, dtype=torch.bool, device=DEVICE)
    masked[:, ::3] = True

    def run(m, dtype):
        return m(pixel_values=_pixels(dtype), bool_masked_pos=masked).last_hidden_state

    out, pt, ref, launches = _three(_hf(model, config, **extra), run)
    assert "patch_embed" not in launches and launches.get("attention") == DEPTH, launches
    assert_parity(out, pt, ref)


def test_hidden_states_and_attentions_are_collected():
    """output_hidden_states is collected around the fused layers; output_attentions (weights computed
    inside the attention) runs transformers' layers for that call, and the next call is fused again."""
    build = _hf("CLIPVisionModel", "CLIPVisionConfig", attn_implementation="eager")

    def run(m, dtype):
        out = m(pixel_values=_pixels(dtype), output_hidden_states=True, output_attentions=True)
        return torch.cat([h.flatten() for h in out.hidden_states] + [a.flatten() for a in out.attentions])

    out, pt, ref, launches = _three(build, run)
    assert "attention" not in launches, launches
    assert_parity(out, pt, ref)

    def hidden(m, dtype):
        return torch.cat([h.flatten() for h in m(pixel_values=_pixels(dtype), output_hidden_states=True).hidden_states])

    out, pt, ref, launches = _three(build, hidden)
    assert launches.get("attention") == DEPTH, launches
    assert_parity(out, pt, ref)


def test_siglip2_padded_patches_run_masked_on_the_kernels():
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    def build():
        return Siglip2VisionModel(Siglip2VisionConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                                      intermediate_size=4 * WIDTH, patch_size=PATCH, num_patches=16))
    patches = torch.randn(2, 16, 3 * PATCH * PATCH, device=DEVICE)
    valid = torch.ones(2, 16, dtype=torch.long, device=DEVICE)
    valid[1, 12:] = 0
    shapes = torch.tensor([[4, 4], [3, 4]], device=DEVICE)

    def run(m, dtype):
        out = m(pixel_values=patches.to(dtype), pixel_attention_mask=valid, spatial_shapes=shapes)
        # The pooling head attends over the valid patches only (its padding mask on the kernel).
        return torch.cat([out.last_hidden_state[valid.bool()].flatten(), out.pooler_output.flatten()])

    out, pt, ref, launches = _three(build, run)
    assert launches.get("attention") == DEPTH + 1 and launches.get("mlp") == DEPTH + 1, launches
    assert_parity(out, pt, ref)


def test_dinov2_gradients_through_layer_scale():
    """Training without dropout or drop-path: forward and backward on the kernels, LayerScale's
    gradient included."""
    require_triton_path()
    model = randomize(_hf("Dinov2Model", "Dinov2Config", layerscale_value=0.5)()).to(DEVICE).train()
    x = _pixels(F32)
    grads = []
    for m in (copy.deepcopy(model).double(), model, vitfast.optimize(copy.deepcopy(model))):
        with runtime.count_launches() as launches:
            m(pixel_values=x.to(next(m.parameters()).dtype)).pooler_output.square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert launches.get("attention") == DEPTH, launches
    assert_parity(grads[2], grads[1], grads[0])


def test_drop_path_while_training_runs_on_the_kernels():
    require_triton_path()
    model = vitfast.optimize(_hf("Dinov2Model", "Dinov2Config", drop_path_rate=0.2)().to(DEVICE))
    for mode in (model.train, model.eval):
        with torch.no_grad(), runtime.count_launches() as launches:
            mode()(pixel_values=_pixels(F32))
        assert launches.get("attention") == DEPTH, launches


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_bool_masks_mean_what_the_attention_function_makes_of_them(implementation):
    """SDPA lets a query attend where a bool mask is True (the kernel's reading, inverted); the eager
    function adds a bool mask to the scores: that runs transformers' layers."""
    n = (IMG // PATCH) ** 2 + 1
    mask = torch.ones(2, 1, n, n, dtype=torch.bool, device=DEVICE)
    mask[1, :, :, -5:] = False

    def run(m, dtype):
        return m(pixel_values=_pixels(dtype), attention_mask=mask).last_hidden_state

    out, pt, ref, launches = _three(_hf("ViTModel", "ViTConfig", attn_implementation=implementation), run)
    assert launches.get("attention", 0) == (DEPTH if implementation == "sdpa" else 0), launches
    assert_parity(out, pt, ref)


@pytest.mark.parametrize("model,config", [("CLIPVisionModel", "CLIPVisionConfig"),
                                          ("SiglipVisionModel", "SiglipVisionConfig")])
def test_position_ids_are_read_on_every_call(model, config):
    require_triton_path()
    original = randomize(_hf(model, config)()).to(DEVICE).eval()
    fast = vitfast.optimize(copy.deepcopy(original))
    x = _pixels(F32)
    with torch.no_grad():
        fast(pixel_values=x)
        for m in (original, fast):
            m.embeddings.position_ids.copy_(m.embeddings.position_ids.flip(-1))
        with runtime.count_launches() as launches:
            out = fast(pixel_values=x).last_hidden_state
        expected = original(pixel_values=x).last_hidden_state
    assert launches.get("patch_embed") == 1, launches
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_jit_trace_of_clip_vision():
    require_triton_path()
    original = randomize(_hf("CLIPVisionModel", "CLIPVisionConfig")()).to(DEVICE).eval()
    fast = vitfast.optimize(copy.deepcopy(original))
    x = _pixels(F32)
    with torch.no_grad():
        traced = torch.jit.trace(fast, (x,), strict=False)
        torch.testing.assert_close(traced(x)["last_hidden_state"], original(x).last_hidden_state,
                                   atol=1e-4, rtol=1e-4)


def test_report_lists_layers_whose_mlp_is_intermediate_and_output():
    """transformers 4's layout (attention, intermediate, output) as other models still use it: a layer
    vitfast has no rule for is listed once, as the layer."""
    from transformers import Data2VecVisionConfig, Data2VecVisionModel

    config = Data2VecVisionConfig(image_size=IMG, patch_size=PATCH, hidden_size=WIDTH, num_hidden_layers=DEPTH,
                                  num_attention_heads=HEADS, intermediate_size=4 * WIDTH)
    report = vitfast.optimize(Data2VecVisionModel(config)).vitfast_report
    assert sorted(e.path for e in report.skipped) == [f"encoder.layer.{i}" for i in range(DEPTH)], str(report)
