"""torch.compile sees vitfast's ops as custom ops: an optimized model compiles without graph breaks."""
import copy

import pytest
import torch

import vitfast
from helpers import DEVICE, assert_parity
from test_optimize import FAMILIES, IMG, _logits, _randomize


@pytest.mark.parametrize("family", list(FAMILIES))
def test_optimized_model_compiles_fullgraph(family):
    torch._dynamo.reset()
    model = vitfast.optimize(_randomize(FAMILIES[family][0]()).to(DEVICE).eval())
    x = torch.randn(2, 3, IMG, IMG, device=DEVICE)
    with torch.no_grad():
        eager = _logits(model, x)
        # aot_eager traces through dynamo and AOTAutograd exactly as inductor does, without codegen.
        backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        out = _logits(compiled, x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_optimized_model_under_cuda_graphs_bf16():
    model = vitfast.optimize(_randomize(FAMILIES["reference"][0]()).cuda().eval().to(torch.bfloat16))
    static = torch.randn(4, 3, IMG, IMG, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(static)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                model(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(static)
        graph.replay()
    torch.testing.assert_close(captured, expected)


@pytest.mark.gpu
def test_compiled_vit_b_matches_bf16():
    model = _randomize(vitfast.reference.vit_base()).cuda().eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        pt = copy.deepcopy(model).bfloat16()(x.bfloat16())
        fast = torch.compile(vitfast.optimize(model.bfloat16()), fullgraph=True)
        assert_parity(fast(x.bfloat16()), pt, ref)
