"""torchvision: the ViT's ``conv_proj`` and ``EncoderBlock``, matched by exact class (torchvision is
never imported here)."""
from __future__ import annotations

from torch import Tensor, nn

from ..modules._block import BlockWeights, packed_block_weights, pre_norm_block
from ..modules._drops import Drops, live
from ..modules._fused import Fused
from ..modules.mlp import activation_name
from ..modules.patch_embed import PatchConv2d, patch_conv_reason
from .pytorch import is_layer_norm
from .rules import Rule, head_dim_reason, is_exactly, location

_VIT = "torchvision.models.vision_transformer"
_LINEAR, _DROPOUT = location(nn.Linear), location(nn.Dropout)
_OUT_PROJ = (_LINEAR, location(nn.modules.linear.NonDynamicallyQuantizableLinear))


def block_reason(block: nn.Module) -> str | None:
    """Why a torchvision ``EncoderBlock`` cannot run fused (each submodule must be the exact class
    torchvision puts there)."""
    attn, mlp = block.self_attention, block.mlp
    if type(attn) is not nn.MultiheadAttention or not is_exactly(attn.out_proj, *_OUT_PROJ):
        return f"self_attention is a {type(attn).__name__}, not nn.MultiheadAttention"
    if not attn._qkv_same_embed_dim or not attn.batch_first:
        return "self_attention is not a batch-first packed nn.MultiheadAttention"
    if attn.bias_k is not None or attn.add_zero_attn:
        return "self_attention uses add_bias_kv or add_zero_attn"
    if not (is_layer_norm(block.ln_1) and is_layer_norm(block.ln_2)):
        return "ln_1/ln_2 are not nn.LayerNorm over the last dimension"
    if not (is_exactly(mlp, (_VIT, "MLPBlock")) and len(mlp) == 5 and activation_name(mlp[1]) is not None
            and all(is_exactly(mlp[i], _LINEAR) for i in (0, 3))
            and all(is_exactly(m, _DROPOUT) for m in (mlp[2], mlp[4], block.dropout))):
        return "mlp is not Linear/activation/Dropout/Linear/Dropout"
    return head_dim_reason(attn.embed_dim, attn.num_heads)


class FusedTorchvisionEncoderBlock(Fused):
    """torchvision ``EncoderBlock`` (pre-norm: ``ln_1``, ``self_attention``, ``ln_2``, ``mlp``) fused."""

    def _vitfast_unsupported(self) -> str | None:
        return block_reason(self)

    def _drops(self) -> Drops:
        """Attention dropout (by the attention's flag), then ``dropout`` on its output and the MLP's two."""
        m = self._modules
        attn, mlp = m["self_attention"], list(m["mlp"]._modules.values())
        return Drops(attn=live(attn, attn.dropout), proj=live(m["dropout"], m["dropout"].p),
                     hidden=live(mlp[2], mlp[2].p), mlp=live(mlp[4], mlp[4].p))

    def _weights(self) -> BlockWeights:
        m = self._modules
        mlp = list(m["mlp"]._modules.values())
        return packed_block_weights(m["self_attention"], mlp[0], mlp[3], m["ln_1"], m["ln_2"], activation_name(mlp[1]))

    def _fused_forward(self, input: Tensor) -> Tensor:
        return pre_norm_block(input, self._weights(), drops=self._drops())


RULES = [
    # The ViT's _process_input reshapes conv_proj's output to tokens, which PatchConv2d's view allows.
    Rule((location(nn.Conv2d),), patch_conv_reason, PatchConv2d, parent=((_VIT, "VisionTransformer"), "conv_proj")),
    Rule(((_VIT, "EncoderBlock"),), block_reason, FusedTorchvisionEncoderBlock),
]
