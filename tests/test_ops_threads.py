"""Ops called from several threads at once give the single-threaded results. On CPU tensors the
kernels run in Triton's interpreter, whose state is global: vitfast serialises those launches."""
import threading

import torch

from vitfast import ops, runtime
from helpers import DEVICE, require_triton_path


def _inputs():
    randn = lambda *shape: torch.randn(*shape, device=DEVICE)  # noqa: E731
    return dict(images=randn(2, 3, 16, 16), conv=randn(48, 3, 8, 8) * 0.1, cls=randn(48), pos=randn(1, 5, 48),
                x=randn(2, 5, 48), ln_w=randn(48), qkv_w=randn(144, 48) * 0.1, proj_w=randn(48, 48) * 0.1,
                scale=randn(96)[::2], fc1_w=randn(96, 48) * 0.1, fc1_b=randn(96), fc2_w=randn(48, 96) * 0.1)


def _forward_and_backward(t):
    """A small encoder block on every op, forward and backward: its output and every gradient."""
    t = {k: v.detach().requires_grad_() for k, v in t.items()}
    tokens = ops.patch_embed(t["images"], t["conv"], None, t["cls"], t["pos"])  # [2, 5, 48]
    h = ops.layer_norm(tokens + t["x"], t["ln_w"], None)
    attn = ops.attention(ops.linear(h, t["qkv_w"]), 3)
    y = ops.linear(attn, t["proj_w"], residual=h, scale=t["scale"])
    out = ops.mlp(y, t["fc1_w"], t["fc1_b"], t["fc2_w"], None, "gelu", residual=y)
    grads = torch.autograd.grad(out.square().sum(), list(t.values()))
    return (out.detach(), *grads)


def test_ops_from_several_threads_match_one_thread():
    require_triton_path()
    inputs = _inputs()
    with runtime.count_launches() as launches:
        expected = _forward_and_backward(inputs)
    assert set(launches) == {"patch_embed", "layer_norm", "linear", "attention", "mlp", "patch_embed_bwd",
                             "layer_norm_bwd", "linear_bwd", "attention_bwd"}
    results, errors = [], []

    def work():
        try:
            for _ in range(2):
                results.append(_forward_and_backward(inputs))
        except Exception as e:  # noqa: BLE001 - reported below, with the others
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 8
    for result in results:
        assert all(torch.equal(a, b) for a, b in zip(result, expected, strict=True))
