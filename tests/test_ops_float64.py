"""float64, which PyTorch accepts everywhere, takes the PyTorch path in every op: PyTorch's own result
and gradients at float64 precision, one warning per op, never an error and never a kernel."""
import pytest
import torch
import torch.nn.functional as F

from vitfast import ops, runtime
from vitfast.checks.patch_embed import composite
from helpers import DEVICE

F64 = torch.float64


def _randn(*shape, dtype=F64):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _sdpa_packed(qkv, heads, attn_mask=None):
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).flatten(2)


def _mlp(x, w1, b1, w2, b2, residual, scale):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2) * scale + residual


# op: (inputs, vitfast call, PyTorch composite); "main" names the input that sets the output dtype.
# "mixed" cases keep the main input fp32 and make only another argument float64.
def _case(op, mixed=False):
    main = torch.float32 if mixed else F64
    if op == "layer_norm":
        t = dict(x=_randn(2, 9, 40, dtype=main), w=_randn(40), b=_randn(40))
        return t, lambda x, w, b: ops.layer_norm(x, w, b), lambda x, w, b: F.layer_norm(x.double(), (40,), w, b)
    if op == "linear":
        t = dict(x=_randn(17, 40, dtype=main), w=_randn(24, 40, dtype=main), b=_randn(24, dtype=main),
                 s=_randn(24))
        return (t, lambda x, w, b, s: ops.linear(x, w, b, "gelu", scale=s),
                lambda x, w, b, s: F.gelu(F.linear(x.double(), w.double(), b.double())) * s)
    if op == "mlp":
        t = dict(x=_randn(2, 9, 40, dtype=main), w1=_randn(24, 40, dtype=main), b1=_randn(24, dtype=main),
                 w2=_randn(40, 24, dtype=main), b2=_randn(40, dtype=main), s=_randn(40))
        return (t, lambda x, w1, b1, w2, b2, s: ops.mlp(x, w1, b1, w2, b2, "gelu", residual=x, scale=s),
                lambda x, w1, b1, w2, b2, s: _mlp(*(v.double() for v in (x, w1, b1, w2, b2)), x.double(), s))
    if op == "attention":
        t = dict(qkv=_randn(2, 17, 96, dtype=main), m=_randn(17, 17))
        return (t, lambda qkv, m: ops.attention(qkv, 2, attn_mask=m),
                lambda qkv, m: _sdpa_packed(qkv.double(), 2, m))
    if op == "attention_qkv":
        t = dict(q=_randn(2, 2, 17, 16, dtype=main), k=_randn(2, 2, 17, 16, dtype=main),
                 v=_randn(2, 2, 17, 16, dtype=main), kpm=_randn(2, 17))
        return (t, lambda q, k, v, kpm: ops.attention_qkv(q, k, v, key_padding_mask=kpm),
                lambda q, k, v, kpm: F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                                    attn_mask=kpm[:, None, None, :]))
    if op == "patch_embed":
        t = dict(images=_randn(2, 3, 16, 24, dtype=main), w=_randn(40, 3, 8, 8, dtype=main) / 8, b=_randn(40),
                 cls=_randn(1, 1, 40), pos=_randn(1, 7, 40))
        return (t, lambda images, w, b, cls, pos: ops.patch_embed(images, w, b, cls, pos),
                lambda images, w, b, cls, pos: composite(images.double(), w.double(), b, cls, pos))
    raise AssertionError(op)


OPS = ["layer_norm", "linear", "mlp", "attention", "attention_qkv", "patch_embed"]


def _warnings(recwarn, op):
    return [w for w in recwarn if f"vitfast.{op}: float64" in str(w.message)]


@pytest.mark.parametrize("op", OPS)
def test_float64_takes_pytorch_with_one_warning(op, recwarn):
    """Forward and backward in float64: PyTorch's values to float64 rounding, no kernel, one warning."""
    runtime._warned.discard(f"{op.split('_qkv')[0]}:float64")
    inputs, fast, reference = _case(op)
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    with runtime.count_launches() as launches:
        out = fast(**leaves)
        again = fast(**leaves)
    assert not launches
    assert out.dtype == F64
    torch.testing.assert_close(again, out)
    expected = reference(**leaves)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(leaves.values()), upstream)
    expected_grads = torch.autograd.grad(expected, list(leaves.values()), upstream)
    torch.testing.assert_close(grads, expected_grads, rtol=1e-10, atol=1e-10)
    if runtime.interpreter_enabled():
        assert len(_warnings(recwarn, op.split("_qkv")[0])) == 1


@pytest.mark.parametrize("op", OPS)
def test_float64_side_argument_takes_pytorch(op, recwarn):
    """An fp32 call with one float64 argument (a LayerNorm weight, a scale, a mask, a position table):
    PyTorch computes it in float64 and the output keeps the main input's fp32."""
    runtime._warned.discard(f"{op.split('_qkv')[0]}:float64")
    inputs, fast, reference = _case(op, mixed=True)
    with runtime.count_launches() as launches:
        out = fast(**inputs)
    assert not launches
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(**inputs).float(), rtol=1e-5, atol=1e-5)
    if runtime.interpreter_enabled():
        assert len(_warnings(recwarn, op.split("_qkv")[0])) == 1
