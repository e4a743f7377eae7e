"""``vitfast.compile_ahead`` runs no kernel and leaves the model as it found it. In the interpreter a
launch's compile is a no-op, so this checks the pass itself: every launch became a compile, and the
parameters, their gradients, the buffers and the random number generator are untouched."""
import torch
from torch import nn
from triton.runtime.interpreter import InterpretedFunction

import vitfast


class _Counting(nn.Module):
    """A block whose forward updates a buffer from its activations, as BatchNorm's statistics do."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.TransformerEncoderLayer(32, 2, 64, dropout=0.1, batch_first=True))
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        y = self.block(x)
        self.seen += y.detach().float().mean()
        return y


def test_compile_ahead_runs_no_kernel_and_leaves_the_model_as_it_was(monkeypatch):
    model = vitfast.optimize(_Counting()).train()
    assert model.vitfast_report.swapped
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    warmups = []
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        warmups.append(warmup)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", recording)
    x = torch.randn(2, 5, 32)
    rng = torch.get_rng_state()
    vitfast.compile_ahead(model, x, backward=True)
    assert len(warmups) >= 8 and all(warmups)  # forward and backward kernels, none run
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.seen.item() == 0
    for name, p in model.named_parameters():
        assert p.grad is None and torch.equal(p, params[name]), name


def test_calls_after_compiling_ahead_in_eval_compute_the_model():
    """The eval pass compiles under no_grad, where a stand-in would record its call for replay: a
    recording of launches that did not run must not be kept."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True).eval()
    fast = vitfast.optimize(nn.Sequential(nn.TransformerEncoderLayer(32, 2, 64, batch_first=True))).eval()
    fast[0].load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 32)
    vitfast.compile_ahead(fast, x)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(fast(x), layer(x), rtol=1e-4, atol=1e-5)
