"""Hugging Face transformers: ``ViTEmbeddings`` and ``ViTLayer`` (transformers 5's layout, and 4's),
matched by exact class; transformers is imported here only to read its output recorder's state."""
from __future__ import annotations

import functools
import inspect
import math
import sys

import torch
from torch import Tensor, nn

from ..modules._block import BlockWeights, drops, linear_params, norm_params, pre_norm_block
from ..modules._fused import Fused, Unfusable
from ..modules.mlp import activation_name
from ..modules.patch_embed import patch_conv_reason
from ..ops.patch_embed import patch_embed
from .pytorch import is_layer_norm
from .rules import Rule, head_dim_reason, is_exactly, location

_VIT = "transformers.models.vit.modeling_vit"
_LINEAR, _DROPOUT = location(nn.Linear), location(nn.Dropout)
_V4_SELF_ATTENTION = ((_VIT, "ViTSelfAttention"), (_VIT, "ViTSdpaSelfAttention"))


def _parts(layer: nn.Module) -> dict | None:
    """The modules a ViTLayer's forward reads, when each is the exact class transformers puts there."""
    m = layer._modules
    a = m.get("attention")
    if not is_exactly(a, (_VIT, "ViTAttention")):
        return None
    am = a._modules
    if "q_proj" in am:  # transformers 5
        mlp = m.get("mlp")
        if not is_exactly(mlp, (_VIT, "ViTMLP")):
            return None
        return dict(q=am["q_proj"], k=am["k_proj"], v=am["v_proj"], o=am["o_proj"], fc1=mlp._modules["fc1"],
                    fc2=mlp._modules["fc2"], act=mlp.activation_fn, heads=a.num_attention_heads, head_dim=a.head_dim,
                    scale=a.scaling, attn=a, attn_drop=a.attention_dropout, drops=(m["dropout"],))
    s, out, inter, output = am.get("attention"), am.get("output"), m.get("intermediate"), m.get("output")
    if not (is_exactly(s, *_V4_SELF_ATTENTION) and is_exactly(out, (_VIT, "ViTSelfOutput"))
            and is_exactly(inter, (_VIT, "ViTIntermediate")) and is_exactly(output, (_VIT, "ViTOutput"))):
        return None
    return dict(q=s.query, k=s.key, v=s.value, o=out.dense, fc1=inter.dense, fc2=output.dense,
                act=inter.intermediate_act_fn, heads=s.num_attention_heads, head_dim=s.attention_head_size,
                scale=1.0 / math.sqrt(s.attention_head_size), attn=s, attn_drop=getattr(s.dropout, "p", s.dropout),
                drops=(out.dropout, output.dropout))


def layer_reason(layer: nn.Module) -> str | None:
    parts = _parts(layer)
    if parts is None:
        return "not transformers' ViTAttention/ViTMLP layout"
    if not all(is_exactly(parts[n], _LINEAR) for n in ("q", "k", "v", "o", "fc1", "fc2")):
        return "a projection is not an nn.Linear"
    if not all(is_exactly(d, _DROPOUT) for d in parts["drops"]):
        return "a dropout is not nn.Dropout"
    if not (is_layer_norm(layer.layernorm_before) and is_layer_norm(layer.layernorm_after)):
        return "layernorms are not nn.LayerNorm over the last dimension"
    if activation_name(parts["act"]) is None:
        return f"activation {type(parts['act']).__name__} is not fused"
    if any((parts[n].bias is None) != (parts["q"].bias is None) for n in ("k", "v")):
        return "query, key and value disagree on having a bias"
    return head_dim_reason(parts["heads"] * parts["head_dim"], parts["heads"])


def _neutral(value: object) -> bool:
    return value is None or value is False


@functools.cache
def _parameters(cls: type) -> tuple[str, ...]:
    return tuple(inspect.signature(cls.forward).parameters)


def _mask_and_rest(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[object, list]:
    """A ViTLayer call's attention mask (transformers 5's second argument; 4 takes none) and the
    values of its other arguments."""
    if "attention_mask" not in _parameters(layer._vitfast_original):
        return None, [*args, *kwargs.values()]
    rest = dict(kwargs)
    mask = args[0] if args else rest.pop("attention_mask", None)
    return mask, [*args[1:], *rest.values()]


def _custom_attention(attn: nn.Module) -> str | None:
    """The name of a non-transformers attention function the layer would call (one registered with
    ``AttentionInterface``), or None when it calls one of transformers' own, which compute softmax
    attention as the kernel does."""
    config = getattr(attn, "config", None)  # transformers 4's layers choose by class, checked already
    if config is None:
        return None
    module = sys.modules[type(attn).__module__]
    name = config._attn_implementation
    fn = module.ALL_ATTENTION_FUNCTIONS.get_interface(name, module.eager_attention_forward)
    return None if getattr(fn, "__module__", "").startswith("transformers.") else str(name)


def _kernel_mask(mask: Tensor | None) -> Tensor | None:
    """transformers' 4-D mask in the kernel's convention: a bool mask there is True where attention is
    allowed (SDPA's), here True where it is not; an additive float mask means the same in both."""
    return mask.logical_not() if mask is not None and mask.dtype == torch.bool else mask


class FusedHFViTLayer(Fused):
    """Hugging Face ``ViTLayer`` (pre-norm) as one fused block. q, k and v are concatenated into one
    QKV weight on each call: a copy of 3·D² weights, small next to the block's GEMMs over every token,
    and never stale (no cache key sees writes made through ``.data``)."""

    def _vitfast_unsupported(self) -> str | None:
        return layer_reason(self)

    def _vitfast_honours(self, hook) -> bool:
        return _recorder_key(hook) is not None

    def _vitfast_declines(self, hidden_states: Tensor, *args, **kwargs) -> bool:
        # Head masks and output flags (transformers 4 passes them here), masks other than a 4-D tensor
        # (flex attention's block masks), and outputs recorded from inside the layer (transformers
        # 5's attention weights) run transformers' own code.
        mask, rest = _mask_and_rest(self, args, kwargs)
        if not all(_neutral(v) for v in rest) or _recording(self):
            return True
        if mask is not None and not (isinstance(mask, Tensor) and mask.dim() == 4):
            return True
        parts = _parts(self)
        return drops((parts["attn"], parts["attn_drop"]), *((d, d.p) for d in parts["drops"]))

    def _weights(self) -> BlockWeights:
        p = _parts(self)
        (q_w, q_b), (k_w, k_b), (v_w, v_b) = (linear_params(p[n]) for n in "qkv")
        (o_w, o_b), (fc1_w, fc1_b), (fc2_w, fc2_b) = (linear_params(p[n]) for n in ("o", "fc1", "fc2"))
        m = self._modules
        return BlockWeights(
            num_heads=p["heads"], qkv_weight=(q_w, k_w, v_w), qkv_bias=None if q_b is None else (q_b, k_b, v_b),
            proj_weight=o_w, proj_bias=o_b, norm1=norm_params(m["layernorm_before"]),
            norm2=norm_params(m["layernorm_after"]), fc1_weight=fc1_w, fc1_bias=fc1_b, fc2_weight=fc2_w,
            fc2_bias=fc2_b, activation=activation_name(p["act"]), scale=p["scale"],
        )

    def _fused_forward(self, hidden_states: Tensor, *args, **kwargs):
        custom = _custom_attention(self.attention)
        if custom is not None:
            raise Unfusable(f"attention implementation {custom!r} is not transformers' own")
        mask, _ = _mask_and_rest(self, args, kwargs)
        out = pre_norm_block(hidden_states, self._weights(), attn_mask=_kernel_mask(mask))
        # transformers 4's layers return (hidden_states, ...); 5's return the tensor.
        return (out,) if "output_attentions" in _parameters(self._vitfast_original) else out


def embeddings_reason(emb: nn.Module) -> str | None:
    pe = getattr(emb, "patch_embeddings", None)
    if not is_exactly(pe, (_VIT, "ViTPatchEmbeddings")):
        return f"patch_embeddings is a {type(pe).__name__}"
    reason = patch_conv_reason(pe.projection)
    if reason is not None:
        return reason
    if getattr(emb, "cls_token", None) is None or getattr(emb, "position_embeddings", None) is None:
        return "no CLS token or position embedding"
    return None if is_exactly(emb.dropout, _DROPOUT) else "dropout is not nn.Dropout"


class FusedHFViTEmbeddings(Fused):
    """Hugging Face ``ViTEmbeddings``: patch projection, CLS token and position embedding in one launch."""

    _vitfast_bypasses = ("patch_embeddings", "dropout")

    def _vitfast_unsupported(self) -> str | None:
        return embeddings_reason(self)

    def _vitfast_declines(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None,
                          interpolate_pos_encoding: bool | None = False) -> bool:
        return bool_masked_pos is not None or bool(interpolate_pos_encoding) or drops((self.dropout, self.dropout.p))

    def _fused_forward(self, pixel_values: Tensor, *args, **kwargs) -> Tensor:
        shape, channels = tuple(pixel_values.shape), self.patch_embeddings.num_channels
        if len(shape) != 4 or shape[1] != channels or shape[2:] != tuple(self.image_size):
            raise Unfusable(f"pixel_values of shape {shape}, not [batch, {channels}, *{tuple(self.image_size)}]")
        proj = self.patch_embeddings.projection
        return patch_embed(pixel_values, proj.weight, proj.bias, cls_token=self.cls_token,
                           pos_embed=self.position_embeddings)


def _recorder_key(hook) -> str | None:
    """The output (``"attentions"``, ...) that a transformers 5 output recorder records, or None for
    any other hook. The recorders are forward hooks that stay installed after the first call that
    asked for an output; they record only while a call collects that output."""
    if getattr(hook, "__module__", "") != "transformers.utils.output_capturing" or \
            getattr(hook, "__qualname__", "").rpartition(".")[2] != "output_capturing_hook":
        return None
    try:
        return dict(zip(hook.__code__.co_freevars, (c.cell_contents for c in hook.__closure__)))["key"]
    except (KeyError, AttributeError, TypeError, ValueError):
        return None  # transformers changed: a hook vitfast does not know, so it steps aside


def _recording(layer: nn.Module) -> bool:
    """Whether this call collects an output that a recorder on one of the layer's submodules records."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return bool(collected) and any(_recorder_key(h) in collected for m in layer.modules() if m is not layer
                                   for h in m._forward_hooks.values())


RULES = [
    Rule(((_VIT, "ViTEmbeddings"),), embeddings_reason, FusedHFViTEmbeddings),
    Rule(((_VIT, "ViTLayer"),), layer_reason, FusedHFViTLayer),
]
