"""A user module that calls vitfast's ops traces: ``torch.fx.symbolic_trace`` records each public op
as one node that checks and dispatches when the graph runs, and ``torch.export`` captures the
``vitfast::`` custom ops."""
import operator

import pytest
import torch
from torch import nn

from vitfast import ops, runtime
from helpers import DEVICE, require_triton_path

OPS = {ops.patch_embed, ops.layer_norm, ops.linear, ops.attention, ops.attention_qkv, ops.mlp}


class EveryOp(nn.Module):
    """A one-block ViT written directly on vitfast.ops, every public op once or more."""

    def __init__(self, width=48, heads=3):
        super().__init__()
        p = lambda *shape: nn.Parameter(torch.randn(*shape, device=DEVICE) * 0.1)  # noqa: E731
        self.heads = heads
        self.conv, self.cls, self.pos = p(width, 3, 8, 8), p(1, 1, width), p(1, 5, width)
        self.ln_w, self.ln_b = p(width), p(width)
        self.qkv, self.proj, self.gamma = p(3 * width, width), p(width, width), p(width)
        self.fc1, self.fc1_b, self.fc2, self.fc2_b = p(2 * width, width), p(2 * width), p(width, 2 * width), p(width)

    def forward(self, images):
        tokens = ops.patch_embed(images, self.conv, None, self.cls, self.pos)
        h, s = ops.layer_norm(tokens, self.ln_w, self.ln_b, residual=tokens)
        qkv = ops.linear(h, self.qkv)
        x = ops.linear(ops.attention(qkv, self.heads), self.proj, residual=s, scale=self.gamma)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        x = x + ops.attention_qkv(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        return ops.mlp(x, self.fc1, self.fc1_b, self.fc2, self.fc2_b, "gelu", residual=x, scale=self.gamma)


def _images():
    return torch.randn(2, 3, 16, 16, device=DEVICE)


def test_fx_symbolic_trace_records_each_op_once_and_runs_the_kernels():
    require_triton_path()
    model, images = EveryOp(), _images()
    graph_module = torch.fx.symbolic_trace(model)
    calls = [n.target for n in graph_module.graph.nodes if n.op == "call_function" and n.target in OPS]
    assert sorted(c.__name__ for c in calls) == ["attention", "attention_qkv", "layer_norm", "linear", "linear",
                                                  "mlp", "patch_embed"]
    # Only the ops themselves, the getitems unpacking layer_norm's pair and the user's own tensor code.
    others = {n.target for n in graph_module.graph.nodes if n.op == "call_function" and n.target not in OPS}
    assert others <= {operator.getitem, operator.add}
    with torch.no_grad():
        eager = model(images)
        with runtime.count_launches() as launches:
            traced = graph_module(images)
    assert launches == {"patch_embed": 1, "layer_norm": 1, "linear": 2, "attention": 2, "mlp": 1}
    assert torch.equal(traced, eager)


def test_fx_traced_graph_checks_inputs_when_it_runs():
    """The checks run on the real tensors when the graph runs, not at trace time."""
    graph_module = torch.fx.symbolic_trace(EveryOp())
    bad = torch.randn(2, 3, 12, 16, device=DEVICE)
    with runtime.count_launches() as launches, pytest.raises(ValueError, match="images height 12 is not a positive"):
        graph_module(bad)
    assert not launches


def test_fx_traced_graph_trains_on_the_kernels():
    require_triton_path()
    model, images = EveryOp(), _images()
    graph_module = torch.fx.symbolic_trace(model)
    with runtime.count_launches() as launches:
        traced = torch.autograd.grad(graph_module(images).square().sum(), list(model.parameters()))
    assert launches["linear_bwd"] == 4 and launches["attention_bwd"] == 2
    eager = torch.autograd.grad(model(images).square().sum(), list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(traced, eager, strict=True))


def test_torch_export_holds_the_custom_ops():
    require_triton_path()
    model, images = EveryOp(), _images()
    exported = torch.export.export(model, (images,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {f"vitfast.{op}.default" for op in ("patch_embed_fwd", "layer_norm_fwd", "linear_fwd",
                                                 "attention_packed_fwd", "attention_fwd")} <= targets
    with torch.no_grad():
        assert torch.equal(exported.module()(images), model(images))
