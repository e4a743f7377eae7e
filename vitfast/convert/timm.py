"""timm: ``PatchEmbed``, the ViT ``Block`` and ``LayerNorm``, matched by exact class (timm need not be
installed for this file to import; it is never imported here)."""
from __future__ import annotations

from torch import Tensor, nn

from ..modules._block import BlockWeights, linear_params, norm_params, param, pre_norm_block
from ..modules._drops import Drops, live
from ..modules._fused import Fused, Unfusable
from ..modules.layer_norm import FusedLayerNorm
from ..modules.mlp import activation_name
from ..modules.patch_embed import fusable_images, patch_conv_reason
from ..ops.patch_embed import patch_embed
from .pytorch import is_layer_norm, layer_norm_reason
from .rules import Rule, head_dim_reason, is_exactly, location

BLOCK = ("timm.models.vision_transformer", "Block")
ATTENTION = (("timm.layers.attention", "Attention"), ("timm.models.vision_transformer", "Attention"))
MLP = ("timm.layers.mlp", "Mlp")
SWIGLU = ("timm.layers.mlp", "SwiGLU")  # fc1_g (gate) and fc1_x (value) apart
GLU_MLP = ("timm.layers.mlp", "GluMlp")  # one fc1, chunked in two (SwiGLUPacked)
LAYER_SCALE = (("timm.layers.layer_scale", "LayerScale"), ("timm.models.vision_transformer", "LayerScale"))
DROP_PATH = ("timm.layers.drop", "DropPath")
LAYER_NORM = ("timm.layers.norm", "LayerNorm")
PATCH_EMBED = ("timm.layers.patch_embed", "PatchEmbed")
_LINEAR, _DROPOUT, _IDENTITY = location(nn.Linear), location(nn.Dropout), location(nn.Identity)
_NORMS = (location(nn.LayerNorm), LAYER_NORM)


def _identity_or(m: nn.Module | None, *locations) -> bool:
    return m is None or is_exactly(m, _IDENTITY, *locations)


def _drop_p(m: nn.Module) -> float:
    """A Dropout's p, a DropPath's drop_prob, 0 for an Identity."""
    state = m.__dict__
    return float(state.get("p", state.get("drop_prob", 0.0)))


def site(m: nn.Module) -> float:
    """The probability a timm dropout or DropPath module (or an Identity) applies now."""
    return live(m, _drop_p(m))


def _path_draw(path: nn.Module) -> str:
    """How a timm DropPath draws its per-sample mask: divided by keep unless ``scale_by_keep`` is off."""
    return "bernoulli" if path.__dict__.get("scale_by_keep", True) else "bernoulli_unscaled"


def block_drops(attn: nn.Module, mlp: nn.Module, drop_path1: nn.Module, drop_path2: nn.Module) -> Drops:
    """Dropout and stochastic depth of a timm block (``Block``, ``EvaBlock``) in effect now. With
    ``fused_attn`` timm drops attention probabilities by the attention module's training flag
    (SDPA's dropout_p), otherwise through ``attn_drop`` itself."""
    a, m = attn._modules, mlp._modules
    attn_p = live(attn, _drop_p(a["attn_drop"])) if attn.fused_attn else site(a["attn_drop"])
    return Drops(attn=attn_p, proj=site(a["proj_drop"]), hidden=site(m["drop1"]), mlp=site(m["drop2"]),
                 path1=site(drop_path1), path2=site(drop_path2),
                 path_draws=(_path_draw(drop_path1), _path_draw(drop_path2)))


def mlp_reason(mlp: nn.Module | None) -> str | None:
    """Why a timm MLP cannot run on the kernels: ``Mlp``, ``SwiGLU`` or ``GluMlp`` with nn.Linear layers,
    an activation the epilogue has, nn.Dropout and no norm or a LayerNorm (EVA's sub-LN)."""
    if not is_exactly(mlp, MLP, SWIGLU, GLU_MLP):
        return f"mlp is a {type(mlp).__name__}, not timm's Mlp, SwiGLU or GluMlp"
    layers = ("fc1_g", "fc1_x", "fc2") if is_exactly(mlp, SWIGLU) else ("fc1", "fc2")
    if not all(is_exactly(getattr(mlp, n, None), _LINEAR) for n in layers):
        return f"mlp.{'/'.join(layers)} are not nn.Linear"
    if not (_identity_or(mlp.norm) or is_layer_norm(mlp.norm, *_NORMS)):
        return "mlp.norm is not a LayerNorm over the last dimension"
    if activation_name(mlp.act) is None:
        return f"mlp activation {type(mlp.act).__name__} is not fused"
    if not all(is_exactly(m, _DROPOUT) for m in (mlp.drop1, mlp.drop2)):
        return "a dropout is not nn.Dropout"
    if is_exactly(mlp, GLU_MLP) and (mlp.chunk_dim != -1 or mlp.fc1.out_features % 2):
        return "GluMlp does not split fc1's output in two halves along the last dimension"
    return None


def mlp_weights(mlp: nn.Module) -> dict:
    """The MLP fields of ``BlockWeights`` for a module ``mlp_reason`` accepts."""
    m = mlp._modules
    if is_exactly(mlp, SWIGLU):
        (gate_w, gate_b), (value_w, value_b) = linear_params(m["fc1_g"]), linear_params(m["fc1_x"])
        fc1_w, fc1_b = (gate_w, value_w), (gate_b, value_b)
    elif is_exactly(mlp, GLU_MLP):  # views of the halves: the kernel reads them in place
        w, b = linear_params(m["fc1"])
        halves = (w.chunk(2), (None, None) if b is None else b.chunk(2))
        fc1_w, fc1_b = (h[::-1] if mlp.gate_last else h for h in halves)
    else:
        fc1_w, fc1_b = linear_params(m["fc1"])
    fc2_w, fc2_b = linear_params(m["fc2"])
    return dict(fc1_weight=fc1_w, fc1_bias=fc1_b, fc2_weight=fc2_w, fc2_bias=fc2_b,
                activation=activation_name(m["act"]), mlp_norm=norm_or_none(m["norm"]))


def norm_or_none(norm: nn.Module) -> tuple | None:
    return None if is_exactly(norm, _IDENTITY) else norm_params(norm)


def attention_norm_reason(attn: nn.Module) -> str | None:
    """qk-norm and gating are not fused; an attention scale-norm is, when it is a LayerNorm."""
    qk_norm = not all(_identity_or(getattr(attn, n, None)) for n in ("q_norm", "k_norm"))
    if qk_norm or getattr(attn, "gate", None) is not None:
        return "qk-norm or gated attention is not fused"
    norm = getattr(attn, "norm", None)
    if not (_identity_or(norm) or is_layer_norm(norm, *_NORMS)):
        return "the attention's scale-norm is not a LayerNorm over the last dimension"
    return None


def block_reason(block: nn.Module) -> str | None:
    """Why a timm ``Block`` cannot run fused: every submodule its forward reads must be the exact timm
    or torch class the fused path reproduces (differential attention, qk-norm and the like are not)."""
    attn = getattr(block, "attn", None)
    if not is_exactly(attn, *ATTENTION):
        return f"attn is a {type(attn).__name__}, not timm's Attention"
    if not (is_exactly(attn.qkv, _LINEAR) and is_exactly(attn.proj, _LINEAR)):
        return "attn.qkv or attn.proj is not an nn.Linear"
    reason = attention_norm_reason(attn) or mlp_reason(getattr(block, "mlp", None))
    if reason is not None:
        return reason
    if not all(is_exactly(m, _DROPOUT) for m in (attn.attn_drop, attn.proj_drop)):
        return "a dropout is not nn.Dropout"
    if not all(_identity_or(getattr(block, n, None), *LAYER_SCALE) for n in ("ls1", "ls2")):
        return "ls1/ls2 are not timm's LayerScale"
    if not all(_identity_or(getattr(block, n, None), DROP_PATH) for n in ("drop_path1", "drop_path2")):
        return "drop_path1/drop_path2 are not timm's DropPath"
    if not (is_layer_norm(block.norm1, *_NORMS) and is_layer_norm(block.norm2, *_NORMS)):
        return "norm1/norm2 are not a LayerNorm over the last dimension"
    inner = attn.proj.in_features
    if attn.qkv.out_features != 3 * inner or attn.num_heads * attn.head_dim != inner:
        return "attention width differs from the qkv width"
    return head_dim_reason(inner, attn.num_heads)


def _gamma(ls: nn.Module) -> Tensor | None:
    return None if isinstance(ls, nn.Identity) else param(ls, "gamma")


class FusedTimmBlock(Fused):
    """timm ``Block`` (pre-norm) as one fused block; LayerScale is applied in the GEMM epilogues."""

    def _vitfast_unsupported(self) -> str | None:
        return block_reason(self)

    def _vitfast_declines(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> bool:
        return attn_mask is not None or bool(is_causal)

    def _weights(self) -> BlockWeights:
        m = self._modules
        attn = m["attn"]._modules
        (qkv_w, qkv_b), (proj_w, proj_b) = linear_params(attn["qkv"]), linear_params(attn["proj"])
        a = m["attn"]
        return BlockWeights(
            num_heads=a.num_heads, qkv_weight=qkv_w, qkv_bias=qkv_b, proj_weight=proj_w, proj_bias=proj_b,
            norm1=norm_params(m["norm1"]), norm2=norm_params(m["norm2"]),
            # SDPA (timm's fused path) scales by 1/sqrt(head_dim) whatever attn.scale holds.
            scale=None if a.fused_attn else a.scale,
            proj_scale=_gamma(m["ls1"]), fc2_scale=_gamma(m["ls2"]),
            attn_norm=norm_or_none(attn["norm"]) if "norm" in attn else None, **mlp_weights(m["mlp"]),
        )

    def _fused_forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        m = self._modules
        return pre_norm_block(x, self._weights(),
                              drops=block_drops(m["attn"], m["mlp"], m["drop_path1"], m["drop_path2"]))


def patch_embed_reason(pe: nn.Module) -> str | None:
    reason = patch_conv_reason(getattr(pe, "proj", None))
    if reason is not None:
        return reason
    if not _identity_or(getattr(pe, "norm", None)) or getattr(pe, "dynamic_img_pad", False):
        return "a norm layer or dynamic padding is not fused"
    # timm flattens to [B, N, D] when flatten=True (output_fmt then reads NCHW) or output_fmt is NLC.
    fmt = str(getattr(pe.output_fmt, "value", pe.output_fmt))
    if not pe.flatten and fmt != "NLC":
        return f"output format {fmt} is not [B, N, D] tokens"
    return None


class FusedTimmPatchEmbed(Fused):
    """timm ``PatchEmbed`` (kernel = stride Conv2d, flattened to [B, N, D] tokens, no norm) in one launch."""

    def _vitfast_unsupported(self) -> str | None:
        return patch_embed_reason(self)

    def _fused_forward(self, x: Tensor) -> Tensor:
        return patch_embed(patch_images(self, x), self.proj.weight, self.proj.bias)


def patch_images(pe: nn.Module, x: Tensor) -> Tensor:
    """``x`` when timm's ``PatchEmbed`` ``pe`` would cut it into patches and the kernel can, else ``Unfusable``."""
    p, size = pe.proj.kernel_size[0], pe.img_size
    if x.dim() != 4 or x.shape[1] != pe.proj.in_channels or x.shape[2] % p or x.shape[3] % p:
        raise Unfusable(f"input of shape {tuple(x.shape)} is not a batch of images cut into whole {p}x{p} patches")
    if pe.strict_img_size and size is not None and tuple(x.shape[-2:]) != tuple(size):
        raise Unfusable(f"images of size {tuple(x.shape[-2:])}, not {tuple(size)}")
    return fusable_images(x, pe.proj.weight)


RULES = [
    Rule((PATCH_EMBED,), patch_embed_reason, FusedTimmPatchEmbed),
    Rule((BLOCK,), block_reason, FusedTimmBlock),
    Rule((LAYER_NORM,), layer_norm_reason, FusedLayerNorm),
]
