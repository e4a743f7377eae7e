"""Hugging Face encoder layers (pre-norm; q, k and v projected apart) as one fused block: ViT, DeiT,
CLIP, SigLIP (and SigLIP 2), DINOv2 (with and without registers). Each is matched by its exact class
and read through a ``Layout`` naming where its forward finds each part; transformers 4's ``ViTLayer``
(self-attention and output modules nested a level deeper) is read as well, and so is DINOv2's layer
as transformers kept it nested until 5.17 at least (``_nested_dinov2_parts``). DINOv2's SwiGLU MLP
runs its gate product in fc1's epilogue."""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from ...modules._block import BlockWeights, linear_params, norm_params, pre_norm_block
from ...modules._drops import Drops, live
from ...modules._fused import Fused, Unfusable, original_class
from ...modules.mlp import activation_name
from ..pytorch import is_layer_norm
from ..rules import Location, Rule, head_dim_reason, is_exactly, location
from .capture import (asks_more, custom_attention, kernel_mask, mask_and_rest, reads_mask_as_kernel, recorder_key,
                      returns_tuple)

_LINEAR, _DROPOUT, _IDENTITY = location(nn.Linear), location(nn.Dropout), location(nn.Identity)


def models(name: str) -> str:
    return f"transformers.models.{name}.modeling_{name}"


@dataclass(frozen=True)
class Layout:
    """Where one transformers 5 layer class keeps what its forward reads. Its parts are the classes
    ``<prefix>Attention``, ``<prefix>MLP`` (and ``<prefix>LayerScale``, ``<prefix>DropPath``) of the
    same module."""

    module: str
    prefix: str
    norms: tuple[str, str]  # the pre-norms of the attention and the MLP
    attention: str  # the layer's attribute holding the attention
    out_proj: str  # the attention's output projection
    dropouts: tuple[str, ...] = ()  # nn.Dropout on the layer, applied to each branch's output
    layer_scales: tuple[str, str] | None = None  # per-channel branch scales (``lambda1``)
    drop_path: str | None = None  # stochastic depth on both branches

    def part(self, kind: str) -> Location:
        return self.module, self.prefix + kind


_VIT = models("vit")
_HF_VIT = Layout(_VIT, "ViT", ("layernorm_before", "layernorm_after"), "attention", "o_proj", ("dropout",))
_CLIP_LIKE = dict(norms=("layer_norm1", "layer_norm2"), attention="self_attn", out_proj="out_proj")
_DINO_LIKE = dict(norms=("norm1", "norm2"), attention="attention", out_proj="o_proj",
                  layer_scales=("layer_scale1", "layer_scale2"), drop_path="drop_path")
LAYOUTS: dict[Location, Layout] = {
    (_VIT, "ViTLayer"): _HF_VIT,
    (models("deit"), "DeiTLayer"): Layout(models("deit"), "DeiT", _HF_VIT.norms, "attention", "o_proj", ("dropout",)),
    (models("clip"), "CLIPEncoderLayer"): Layout(models("clip"), "CLIP", **_CLIP_LIKE),
    (models("siglip"), "SiglipEncoderLayer"): Layout(models("siglip"), "Siglip", **_CLIP_LIKE),
    (models("siglip2"), "Siglip2EncoderLayer"): Layout(models("siglip2"), "Siglip2", **_CLIP_LIKE),
    (models("dinov2"), "Dinov2Layer"): Layout(models("dinov2"), "Dinov2", **_DINO_LIKE),
    (models("dinov2_with_registers"), "Dinov2WithRegistersLayer"):
        Layout(models("dinov2_with_registers"), "Dinov2WithRegisters", **_DINO_LIKE),
}
_V4_SELF_ATTENTION = ((_VIT, "ViTSelfAttention"), (_VIT, "ViTSdpaSelfAttention"))


def _field(module: nn.Module, *names: str):
    """The first of ``names`` that ``module`` has as a plain attribute (the classes name them apart)."""
    state = module.__dict__
    return next((state[n] for n in names if n in state), None)


def _v5_parts(layer: nn.Module, layout: Layout) -> dict | None:
    m = layer._modules
    a, mlp = m.get(layout.attention), m.get("mlp")
    gated = is_exactly(mlp, layout.part("SwiGLUFFN"))  # DINOv2's: down(silu(gate(x)) * up(x))
    if not (is_exactly(a, layout.part("Attention")) and (gated or is_exactly(mlp, layout.part("MLP")))):
        return None
    am = a._modules
    scales = [m.get(n) for n in layout.layer_scales or ()]
    if not all(is_exactly(s, layout.part("LayerScale")) for s in scales):
        return None
    drop_path = m.get(layout.drop_path) if layout.drop_path else None
    if layout.drop_path and not is_exactly(drop_path, _IDENTITY, layout.part("DropPath")):
        return None
    heads, head_dim = _field(a, "num_attention_heads", "num_heads"), _field(a, "head_dim")
    mm = mlp._modules
    if gated:
        fc1, fc2 = (mm.get("gate_proj"), mm.get("up_proj")), mm.get("down_proj")
    else:
        fc1, fc2 = mm.get("fc1"), mm.get("fc2")
    return dict(q=am.get("q_proj"), k=am.get("k_proj"), v=am.get("v_proj"), o=am.get(layout.out_proj),
                fc1=fc1, fc2=fc2, act=getattr(mlp, "act_fn" if gated else "activation_fn", None),
                heads=heads, head_dim=head_dim, scale=_field(a, "scaling", "scale"), attn=a,
                attn_drop=_field(a, "attention_dropout", "dropout"), norms=tuple(m.get(n) for n in layout.norms),
                drops=tuple(m.get(n) for n in layout.dropouts), scales=scales, drop_path=drop_path)


def _v4_vit_parts(layer: nn.Module) -> dict | None:
    m = layer._modules
    a = m.get("attention")
    if not is_exactly(a, (_VIT, "ViTAttention")):
        return None
    s, out = a._modules.get("attention"), a._modules.get("output")
    inter, output = m.get("intermediate"), m.get("output")
    if not (is_exactly(s, *_V4_SELF_ATTENTION) and is_exactly(out, (_VIT, "ViTSelfOutput"))
            and is_exactly(inter, (_VIT, "ViTIntermediate")) and is_exactly(output, (_VIT, "ViTOutput"))):
        return None
    return dict(q=s.query, k=s.key, v=s.value, o=out.dense, fc1=inter.dense, fc2=output.dense,
                act=inter.intermediate_act_fn, heads=s.num_attention_heads, head_dim=s.attention_head_size,
                scale=1.0 / math.sqrt(s.attention_head_size), attn=s, attn_drop=getattr(s.dropout, "p", s.dropout),
                norms=(m.get("layernorm_before"), m.get("layernorm_after")), drops=(out.dropout, output.dropout),
                scales=[], drop_path=None)


def _nested_dinov2_parts(layer: nn.Module, layout: Layout) -> dict | None:
    """DINOv2's layer as transformers 5.17 builds it (4's eager classes use the same names; checked on
    5.17 only): ``attention.attention`` projects q, k and v (``query``, ``key``, ``value``),
    ``attention.output`` is ``dense`` then a dropout on the attention branch only; the MLP is ``fc1``,
    ``activation``, ``fc2``, or SwiGLU packed in ``weights_in`` (gate rows, then up rows: ``silu(x1) * x2``
    of its two chunks) and ``weights_out``."""
    m = layer._modules
    a, mlp = m.get(layout.attention), m.get("mlp")
    if not is_exactly(a, layout.part("Attention")):
        return None
    s, out = a._modules.get("attention"), a._modules.get("output")
    gated = is_exactly(mlp, layout.part("SwiGLUFFN"))
    if not (is_exactly(s, layout.part("SelfAttention")) and is_exactly(out, layout.part("SelfOutput"))
            and (gated or is_exactly(mlp, layout.part("MLP")))):
        return None
    scales, drop_path = [m.get(n) for n in layout.layer_scales], m.get(layout.drop_path)
    if not (all(is_exactly(x, layout.part("LayerScale")) for x in scales)
            and is_exactly(drop_path, _IDENTITY, layout.part("DropPath"))):
        return None
    sm, mm, head_dim = s._modules, mlp._modules, _field(s, "attention_head_size")
    drop = out._modules.get("dropout")
    scale = _field(s, "scaling")  # transformers 4: none, its forward divides by sqrt(head size)
    if scale is None and isinstance(head_dim, int):
        scale = head_dim ** -0.5
    attn_drop = _field(s, "dropout_prob")  # transformers 4: an nn.Dropout named dropout
    if attn_drop is None:
        attn_drop = getattr(sm.get("dropout"), "p", 0.0)
    if gated:  # the activation is F.silu in the forward
        fc1, fc2, act = mm.get("weights_in"), mm.get("weights_out"), "silu"
    else:
        fc1, fc2, act = mm.get("fc1"), mm.get("fc2"), getattr(mlp, "activation", None)
    return dict(q=sm.get("query"), k=sm.get("key"), v=sm.get("value"), o=out._modules.get("dense"), fc1=fc1,
                fc2=fc2, act=act, packed_glu=gated, heads=_field(s, "num_attention_heads"), head_dim=head_dim,
                scale=scale, attn=s, attn_drop=attn_drop, norms=tuple(m.get(n) for n in layout.norms), drops=(drop,),
                branch_drops=(drop, None), scales=scales, drop_path=drop_path)


def _parts(layer: nn.Module) -> dict | None:
    """The modules and settings a layer's forward reads, when each is the exact class transformers puts there."""
    layout = LAYOUTS[location(original_class(layer))]
    a = layer._modules.get(layout.attention)
    if a is not None and "q_proj" not in a._modules:  # the projections a level deeper
        if layout is _HF_VIT:
            return _v4_vit_parts(layer)
        if layout.layer_scales:
            return _nested_dinov2_parts(layer, layout)
    return _v5_parts(layer, layout)


def layer_reason(layer: nn.Module) -> str | None:
    parts = _parts(layer)
    if parts is None:
        return "not the attention/MLP layout of transformers' own classes"
    fc1 = parts["fc1"] if isinstance(parts["fc1"], tuple) else (parts["fc1"],)
    if not all(is_exactly(m, _LINEAR) for m in (*fc1, *(parts[n] for n in ("q", "k", "v", "o", "fc2")))):
        return "a projection is not an nn.Linear"
    if not all(is_exactly(d, _DROPOUT) for d in parts["drops"]):
        return "a dropout is not nn.Dropout"
    if parts.get("packed_glu") and parts["fc1"].out_features % 2:
        return "the SwiGLU's weights_in does not split into gate and up halves"
    if not all(is_layer_norm(n) for n in parts["norms"]):
        return "the norms are not nn.LayerNorm over the last dimension"
    if activation_name(parts["act"]) is None:
        return f"activation {type(parts['act']).__name__} is not fused"
    if any((parts[n].bias is None) != (parts["q"].bias is None) for n in ("k", "v")):
        return "query, key and value disagree on having a bias"
    if not isinstance(parts["heads"], int) or not isinstance(parts["head_dim"], int):
        return "the attention does not name its heads"
    return head_dim_reason(parts["heads"] * parts["head_dim"], parts["heads"])


def _drop_path_p(m: nn.Module | None) -> float:
    return 0.0 if m is None else float(m.__dict__.get("drop_prob", 0.0))


def layer_drops(p: dict) -> Drops:
    """Dropout and stochastic depth of a layer's parts (``_parts``) in effect now: attention dropout by
    the attention module's training flag (transformers passes ``dropout=0.0 if not self.training``),
    the layer's output dropouts (ViT and DeiT: one module on both branches in transformers 5, one
    per branch in 4; DINOv2 nested: one on the attention branch), DINOv2's drop path (one module on both
    branches, drawn as ``floor(keep + rand)``)."""
    outs, dp = p["drops"], p["drop_path"]
    proj, mlp = p.get("branch_drops") or ((outs[0], outs[-1]) if outs else (None, None))
    path = live(dp, _drop_path_p(dp))
    return Drops(attn=live(p["attn"], p["attn_drop"]), proj=0.0 if proj is None else live(proj, proj.p),
                 mlp=0.0 if mlp is None else live(mlp, mlp.p), path1=path, path2=path, path_draws=("floor", "floor"))


class FusedHFEncoderLayer(Fused):
    """A Hugging Face pre-norm encoder layer as one fused block. q, k and v are concatenated into one
    QKV weight on each call: a copy of 3·D² weights, small next to the block's GEMMs over every token,
    and never stale (no cache key sees writes made through ``.data``). LayerScale (DINOv2) is applied
    in the GEMM epilogues."""

    def _vitfast_unsupported(self) -> str | None:
        return layer_reason(self)

    def _vitfast_honours(self, hook) -> bool:
        return recorder_key(hook) is not None

    def _vitfast_declines(self, hidden_states: Tensor, *args, **kwargs) -> bool:
        if asks_more(self, args, kwargs):
            return True
        p = _parts(self)
        return not reads_mask_as_kernel(p["attn"], mask_and_rest(self, args, kwargs)[0])

    def _weights(self) -> BlockWeights:
        p = _parts(self)
        (q_w, q_b), (k_w, k_b), (v_w, v_b) = (linear_params(p[n]) for n in "qkv")
        (o_w, o_b), (fc2_w, fc2_b) = (linear_params(p[n]) for n in ("o", "fc2"))
        if isinstance(p["fc1"], tuple):  # gate, up: a gated MLP
            fc1_w, fc1_b = zip(*(linear_params(m) for m in p["fc1"]))
        elif p.get("packed_glu"):  # gate rows, then up rows
            w, b = linear_params(p["fc1"])
            fc1_w, fc1_b = w.chunk(2), (None, None) if b is None else b.chunk(2)
        else:
            fc1_w, fc1_b = linear_params(p["fc1"])
        scales = [s._parameters["lambda1"] for s in p["scales"]] or [None, None]
        return BlockWeights(
            num_heads=p["heads"], qkv_weight=(q_w, k_w, v_w), qkv_bias=None if q_b is None else (q_b, k_b, v_b),
            proj_weight=o_w, proj_bias=o_b, norm1=norm_params(p["norms"][0]), norm2=norm_params(p["norms"][1]),
            fc1_weight=fc1_w, fc1_bias=fc1_b, fc2_weight=fc2_w, fc2_bias=fc2_b, activation=activation_name(p["act"]),
            scale=p["scale"], proj_scale=scales[0], fc2_scale=scales[1],
        )

    def _fused_forward(self, hidden_states: Tensor, *args, **kwargs):
        p = _parts(self)
        custom = custom_attention(p["attn"])
        if custom is not None:
            raise Unfusable(f"attention implementation {custom!r} is not transformers' own")
        mask, causal, _ = mask_and_rest(self, args, kwargs)
        out = pre_norm_block(hidden_states, self._weights(), attn_mask=kernel_mask(mask), is_causal=causal,
                             drops=layer_drops(p))
        return (out,) if returns_tuple(self) else out


RULES = [Rule(tuple(LAYOUTS), layer_reason, FusedHFEncoderLayer)]
