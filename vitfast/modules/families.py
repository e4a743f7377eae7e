"""Fused stand-ins for the ViT blocks of timm, torchvision and Hugging Face.

Each stand-in holds the very same child modules and parameters as the block it replaces (so
``state_dict`` keys and weights are unchanged) and runs vitfast's fused block in its forward. When a
call asks for something the fused path does not do (dropout or drop-path active in training, an
attention mask, attention weights), it runs the original class's own forward on the same modules.
None of these import timm, torchvision or transformers: ``vitfast.convert`` recognises the blocks.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import ops
from ._block import BlockWeights, DerivedWeights, layer_scaled, pre_norm_block
from ._share import share_as
from .mlp import activation_name
from .patch_embed import _check_patch_conv


def _norm(m: nn.Module) -> tuple[Tensor | None, Tensor | None, float]:
    return m.weight, m.bias, m.eps


def _is_layer_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _drop_p(m: nn.Module | None) -> float:
    """Dropout or drop-path probability of a module (0 for Identity/None)."""
    if m is None or isinstance(m, nn.Identity):
        return 0.0
    return float(getattr(m, "p", getattr(m, "drop_prob", 0.0)))


class Adopted(nn.Module):
    """Base of the stand-ins: built by ``adopt(original)``, falls back to the original's forward."""

    _original_cls: type

    @classmethod
    def adopt(cls, original: nn.Module):
        reason = cls.unsupported_reason(original)
        if reason is not None:
            raise ValueError(f"{type(original).__name__} cannot be fused: {reason}")
        new = share_as(original, cls)
        new._original_cls = type(original)
        return new

    @staticmethod
    def unsupported_reason(original: nn.Module) -> str | None:
        raise NotImplementedError

    def original_forward(self, *args, **kwargs):
        return self._original_cls.forward(self, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"fused stand-in for {self._original_cls.__module__}.{self._original_cls.__qualname__}"


class TimmBlock(Adopted):
    """timm ``Block`` (pre-norm; ``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1``/``ls2``, ``mlp``, ``norm2``)."""

    @staticmethod
    def unsupported_reason(block: nn.Module) -> str | None:
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if attn is None or not isinstance(getattr(attn, "qkv", None), nn.Linear) or not hasattr(attn, "proj"):
            return "attn has no packed qkv/proj Linear"
        if not (_is_identity(getattr(attn, "q_norm", None)) and _is_identity(getattr(attn, "k_norm", None))):
            return "qk_norm is not fused"
        if not _is_identity(getattr(attn, "norm", None)) or getattr(attn, "gate", None) is not None:
            return "attention scale-norm or gating is not fused"
        if not (_is_layer_norm(block.norm1) and _is_layer_norm(block.norm2)):
            return "norm1/norm2 are not LayerNorm"
        if mlp is None or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("fc1", "fc2")):
            return "mlp is not fc1/act/fc2"
        if not _is_identity(getattr(mlp, "norm", None)):
            return "mlp has a norm layer"
        if activation_name(getattr(mlp, "act", None)) is None:
            return f"mlp activation {getattr(mlp, 'act', None)!r} is not fused"
        for name in ("ls1", "ls2"):
            ls = getattr(block, name, None)
            if not _is_identity(ls) and not isinstance(getattr(ls, "gamma", None), Tensor):
                return f"{name} is not LayerScale"
        if attn.qkv.out_features != 3 * attn.proj.in_features:
            return "attention width differs from the qkv width"
        return None

    @classmethod
    def adopt(cls, original: nn.Module):
        new = super().adopt(original)
        new._derived = DerivedWeights()
        return new

    def _layer_scaled(self) -> tuple[tuple[Tensor, Tensor | None], tuple[Tensor, Tensor | None]]:
        """proj and fc2 with ls1/ls2 folded in (cached: no per-call rescale of the weights)."""
        pairs = ((self.attn.proj, self.ls1), (self.mlp.fc2, self.ls2))
        if all(_is_identity(ls) for _, ls in pairs):
            return tuple((lin.weight, lin.bias) for lin, _ in pairs)
        sources = [t for lin, ls in pairs for t in (lin.weight, lin.bias, getattr(ls, "gamma", None)) if t is not None]
        return self._derived.get(sources, lambda: tuple(
            (lin.weight, lin.bias) if _is_identity(ls) else layer_scaled(lin.weight, lin.bias, ls.gamma)
            for lin, ls in pairs))

    def _dropping(self) -> bool:
        if not self.training:
            return False
        ps = (self.attn.attn_drop, getattr(self.attn, "proj_drop", None), self.drop_path1, self.drop_path2,
              getattr(self.mlp, "drop1", None), getattr(self.mlp, "drop2", None))
        return any(_drop_p(m) > 0 for m in ps)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal or self._dropping():
            kwargs = {} if attn_mask is None and not is_causal else dict(attn_mask=attn_mask, is_causal=is_causal)
            return self.original_forward(x, **kwargs)
        attn, mlp = self.attn, self.mlp
        (proj_w, proj_b), (fc2_w, fc2_b) = self._layer_scaled()
        w = BlockWeights(
            num_heads=attn.num_heads, qkv_weight=attn.qkv.weight, qkv_bias=attn.qkv.bias,
            proj_weight=proj_w, proj_bias=proj_b,
            norm1=_norm(self.norm1), norm2=_norm(self.norm2),
            fc1_weight=mlp.fc1.weight, fc1_bias=mlp.fc1.bias, fc2_weight=fc2_w, fc2_bias=fc2_b,
            activation=activation_name(mlp.act), scale=getattr(attn, "scale", None),
        )
        return pre_norm_block(x, w)


class TimmPatchEmbed(Adopted):
    """timm ``PatchEmbed`` (Conv2d with kernel = stride, flatten to [B, N, D], no norm)."""

    @staticmethod
    def unsupported_reason(pe: nn.Module) -> str | None:
        reason = patch_conv_reason(getattr(pe, "proj", None))
        if reason is not None:
            return reason
        # timm flattens to [B, N, D] when flatten=True (output_fmt then reads NCHW) or output_fmt is NLC.
        fmt = str(getattr(getattr(pe, "output_fmt", None), "value", getattr(pe, "output_fmt", "")))
        if not getattr(pe, "flatten", False) and fmt != "NLC":
            return f"output format {fmt} is not [B, N, D] tokens"
        if not _is_identity(getattr(pe, "norm", None)):
            return "patch norm is not fused"
        if getattr(pe, "dynamic_img_pad", False):
            return "dynamic image padding is not fused"
        return None

    def forward(self, x: Tensor) -> Tensor:
        img_size = getattr(self, "img_size", None)
        if getattr(self, "strict_img_size", False) and img_size is not None and tuple(x.shape[-2:]) != tuple(img_size):
            raise ValueError(f"images must be {tuple(img_size)} (H, W) for this model, got {tuple(x.shape[-2:])}")
        return ops.patch_embed(x, self.proj.weight, self.proj.bias)


def patch_conv_reason(conv: object) -> str | None:
    """Why ``conv`` is not a patch projection the fused kernel computes, or None when it is."""
    try:
        _check_patch_conv(conv)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


class PatchConv2d(nn.Conv2d):
    """``nn.Conv2d`` with kernel = stride (a patch projection) on vitfast's patch-embedding kernel.

    It returns the usual [B, D, H/P, W/P] values as a view of the [B, N, D] token buffer the kernel
    writes (channels-last strides), so code that then flattens and transposes to tokens, like
    torchvision's ``_process_input`` and Hugging Face's ``ViTPatchEmbeddings``, does so without a copy.
    """

    @classmethod
    def from_torch(cls, conv: nn.Conv2d) -> "PatchConv2d":
        _check_patch_conv(conv)
        return share_as(conv, cls)

    def forward(self, x: Tensor) -> Tensor:
        tokens = ops.patch_embed(x, self.weight, self.bias)  # [B, N, D]
        p = self.kernel_size[0]
        b, _, h, w = x.shape
        return tokens.view(b, h // p, w // p, -1).permute(0, 3, 1, 2)


class TorchvisionEncoderBlock(Adopted):
    """torchvision ``EncoderBlock`` (pre-norm; ``ln_1``, ``self_attention``, ``ln_2``, ``mlp``)."""

    @staticmethod
    def unsupported_reason(block: nn.Module) -> str | None:
        attn = getattr(block, "self_attention", None)
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim or not attn.batch_first:
            return "self_attention is not a batch-first packed nn.MultiheadAttention"
        if attn.bias_k is not None or attn.add_zero_attn:
            return "self_attention uses add_bias_kv or add_zero_attn"
        if not (_is_layer_norm(block.ln_1) and _is_layer_norm(block.ln_2)):
            return "ln_1/ln_2 are not LayerNorm"
        mlp = block.mlp
        if not (isinstance(mlp, nn.Sequential) and len(mlp) == 5 and isinstance(mlp[0], nn.Linear)
                and isinstance(mlp[3], nn.Linear) and activation_name(mlp[1]) is not None):
            return "mlp is not Linear/activation/Dropout/Linear/Dropout"
        return None

    def forward(self, input: Tensor) -> Tensor:
        mlp, attn = self.mlp, self.self_attention
        if self.training and any(p > 0 for p in (self.dropout.p, attn.dropout, mlp[2].p, mlp[4].p)):
            return self.original_forward(input)
        if input.dim() != 3:
            raise ValueError(f"input must be (batch_size, seq_length, hidden_dim), got {tuple(input.shape)}")
        w = BlockWeights(
            num_heads=attn.num_heads, qkv_weight=attn.in_proj_weight, qkv_bias=attn.in_proj_bias,
            proj_weight=attn.out_proj.weight, proj_bias=attn.out_proj.bias,
            norm1=_norm(self.ln_1), norm2=_norm(self.ln_2),
            fc1_weight=mlp[0].weight, fc1_bias=mlp[0].bias, fc2_weight=mlp[3].weight, fc2_bias=mlp[3].bias,
            activation=activation_name(mlp[1]),
        )
        return pre_norm_block(input, w)


def _hf_parts(layer: nn.Module) -> dict | None:
    """The linears of a Hugging Face ViTLayer in either layout (transformers 4.x and 5.x)."""
    a = layer.attention
    if hasattr(a, "q_proj"):  # transformers 5: attention.{q,k,v,o}_proj, mlp.{fc1, fc2, activation_fn}
        mlp = layer.mlp
        return dict(q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.o_proj, fc1=mlp.fc1, fc2=mlp.fc2,
                    act=mlp.activation_fn, heads=a.num_attention_heads, head_dim=a.head_dim,
                    attn_drop=a.attention_dropout, drops=(layer.dropout,))
    if hasattr(a, "attention") and hasattr(a.attention, "query"):  # transformers 4
        s = a.attention
        return dict(q=s.query, k=s.key, v=s.value, o=a.output.dense, fc1=layer.intermediate.dense,
                    fc2=layer.output.dense, act=layer.intermediate.intermediate_act_fn,
                    heads=s.num_attention_heads, head_dim=s.attention_head_size,
                    attn_drop=s.dropout.p if isinstance(s.dropout, nn.Dropout) else getattr(s, "dropout_prob", 0.0),
                    drops=(a.output.dropout, layer.output.dropout))
    return None


class HFViTLayer(Adopted):
    """Hugging Face ``ViTLayer`` (pre-norm). Separate query/key/value projections are packed into one
    QKV weight, once, and re-packed only when one of them changes."""

    _returns_tuple: bool = False

    @classmethod
    def adopt(cls, original: nn.Module):
        new = super().adopt(original)
        new._derived = DerivedWeights()
        new._returns_tuple = _returns_tuple(original)
        return new

    @staticmethod
    def unsupported_reason(layer: nn.Module) -> str | None:
        parts = _hf_parts(layer)
        if parts is None:
            return "unknown ViTLayer layout"
        if not (_is_layer_norm(layer.layernorm_before) and _is_layer_norm(layer.layernorm_after)):
            return "layernorms are not LayerNorm"
        if activation_name(parts["act"]) is None:
            return f"activation {parts['act']!r} is not fused"
        return None

    def _qkv(self, parts: dict) -> tuple[Tensor, Tensor | None]:
        q, k, v = parts["q"], parts["k"], parts["v"]
        sources = [t for m in (q, k, v) for t in (m.weight, m.bias) if t is not None]

        def pack():
            return (torch.cat([q.weight, k.weight, v.weight]),
                    None if q.bias is None else torch.cat([q.bias, k.bias, v.bias]))

        return self._derived.get(sources, pack)

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        parts = _hf_parts(self)
        wants_weights = kwargs.get("output_attentions", False) or (len(args) > 1 and args[1])
        extra = any(a is not None for a in args[:1]) or kwargs.get("head_mask") is not None \
            or kwargs.get("attention_mask") is not None
        dropping = self.training and (parts["attn_drop"] > 0 or any(_drop_p(d) > 0 for d in parts["drops"]))
        if wants_weights or extra or dropping:
            return self.original_forward(hidden_states, *args, **kwargs)
        qkv_w, qkv_b = self._qkv(parts)
        w = BlockWeights(
            num_heads=parts["heads"], qkv_weight=qkv_w, qkv_bias=qkv_b,
            proj_weight=parts["o"].weight, proj_bias=parts["o"].bias,
            norm1=_norm(self.layernorm_before), norm2=_norm(self.layernorm_after),
            fc1_weight=parts["fc1"].weight, fc1_bias=parts["fc1"].bias,
            fc2_weight=parts["fc2"].weight, fc2_bias=parts["fc2"].bias,
            activation=activation_name(parts["act"]), scale=1.0 / math.sqrt(parts["head_dim"]),
        )
        out = pre_norm_block(hidden_states, w)
        return (out,) if self._returns_tuple else out


def _returns_tuple(layer: nn.Module) -> bool:
    """transformers 4 layers return (hidden_states, ...), 5 returns the tensor: ask the layer itself."""
    p = next(layer.parameters())
    probe = torch.zeros(1, 1, layer.layernorm_before.normalized_shape[0], device=p.device, dtype=p.dtype)
    was_training = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            return isinstance(layer(probe), tuple)
    finally:
        layer.train(was_training)


class HFViTEmbeddings(Adopted):
    """Hugging Face ``ViTEmbeddings``: patch projection, CLS token and position embedding in one launch."""

    @staticmethod
    def unsupported_reason(emb: nn.Module) -> str | None:
        reason = patch_conv_reason(getattr(getattr(emb, "patch_embeddings", None), "projection", None))
        if reason is not None:
            return reason
        if getattr(emb, "cls_token", None) is None or getattr(emb, "position_embeddings", None) is None:
            return "no CLS token or position embedding"
        return None

    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None,
                interpolate_pos_encoding: bool = False) -> Tensor:
        if bool_masked_pos is not None or interpolate_pos_encoding or (self.training and self.dropout.p > 0):
            return self.original_forward(pixel_values, bool_masked_pos, interpolate_pos_encoding)
        size = tuple(pixel_values.shape[-2:]) if pixel_values.dim() == 4 else None
        if size is not None and size != tuple(self.image_size):
            raise ValueError(f"pixel_values must be {tuple(self.image_size)} (H, W) for this model, got {size}; "
                             "pass interpolate_pos_encoding=True for other sizes")
        proj = self.patch_embeddings.projection
        return ops.patch_embed(pixel_values, proj.weight, proj.bias, cls_token=self.cls_token,
                               pos_embed=self.position_embeddings)
