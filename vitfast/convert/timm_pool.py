"""timm's ``AttentionPoolLatent``: the attention-pooling ("MAP") head of SigLIP and Perception
Encoder ViTs, on the short-query attention kernel and the GEMM epilogues (``modules/attention_pool.py``)."""
from __future__ import annotations

from torch import Tensor, nn

from ..modules._block import linear_params, param
from ..modules._drops import Drops
from ..modules._fused import Fused, Unfusable
from ..modules.attention_pool import PoolWeights, attention_pool
from .pytorch import is_layer_norm
from .rules import Rule, head_dim_reason, is_exactly
from .timm import _DROPOUT, _IDENTITY, _LINEAR, _NORMS, _identity_or, mlp_reason, mlp_weights, norm_or_none, site

ATTENTION_POOL = ("timm.layers.attention_pool", "AttentionPoolLatent")


def attention_pool_reason(pool: nn.Module) -> str | None:
    """Why timm's ``AttentionPoolLatent`` cannot run fused: linear q (or none) and kv projections, no
    qk-norm, and an out-projection, LayerNorm and timm ``Mlp`` (or none of them, ``out_features=0``)."""
    if not (is_exactly(pool.kv, _LINEAR) and (is_exactly(pool.q, _LINEAR) or _identity_or(pool.q))):
        return "q or kv is not an nn.Linear"
    if not (_identity_or(pool.q_norm) and _identity_or(pool.k_norm)):
        return "qk-norm is not fused"
    if pool.mlp is None:
        if not (_identity_or(pool.proj) and _identity_or(pool.norm)):
            return "a projection or norm without an MLP is not fused"
    elif not (is_exactly(pool.proj, _LINEAR) and (_identity_or(pool.norm) or is_layer_norm(pool.norm, *_NORMS))):
        return "proj is not an nn.Linear or norm not a LayerNorm over the last dimension"
    else:
        reason = mlp_reason(pool.mlp)
        if reason is not None:
            return reason
    if not is_exactly(pool.proj_drop, _DROPOUT):
        return "proj_drop is not nn.Dropout"
    width = pool.kv.in_features
    q_width = pool.q.out_features if is_exactly(pool.q, _LINEAR) else pool.latent.shape[-1]
    if pool.kv.out_features != 2 * width or q_width != width:
        return "the q and kv widths differ from the tokens' width"
    if pool.pos_embed is not None and tuple(pool.pos_embed.shape[1:]) != (width,):
        return "the position embedding does not match the tokens' width"
    return head_dim_reason(width, pool.num_heads)


class FusedTimmAttentionPool(Fused):
    """timm ``AttentionPoolLatent`` (SigLIP's and Perception Encoder's MAP head) on the kernels: the
    learned queries attend on the short-query attention kernel, the MLP on the GEMM epilogues."""

    def _vitfast_unsupported(self) -> str | None:
        return attention_pool_reason(self)

    def _vitfast_declines(self, x: Tensor, attn_mask: Tensor | None = None) -> bool:
        # An attn_mask (SDPA's convention) runs timm's own code.
        return attn_mask is not None

    def _drops(self) -> Drops:
        """timm's pool drops the out-projection's output and, through its Mlp, the MLP's; not the
        attention probabilities."""
        m = self._modules
        mlp = m.get("mlp")  # out_features=0: no MLP (an attribute set to None, not a submodule)
        hidden, out = (0.0, 0.0) if mlp is None else (site(mlp._modules["drop1"]), site(mlp._modules["drop2"]))
        return Drops(proj=site(m["proj_drop"]), hidden=hidden, mlp=out)

    def _weights(self) -> PoolWeights:
        m = self._modules
        q, mlp = m["q"], m.get("mlp")
        q_w, q_b = (None, None) if is_exactly(q, _IDENTITY) else linear_params(q)
        proj_w, proj_b = (None, None) if mlp is None else linear_params(m["proj"])
        parts = dict(fc1_weight=None, fc1_bias=None, fc2_weight=None, fc2_bias=None, activation=None) \
            if mlp is None else mlp_weights(mlp)
        return PoolWeights(
            num_heads=self.num_heads, latent=param(self, "latent"), q_weight=q_w, q_bias=q_b,
            kv_weight=param(m["kv"], "weight"), kv_bias=param(m["kv"], "bias"), proj_weight=proj_w,
            proj_bias=proj_b, norm=None if mlp is None else norm_or_none(m["norm"]), pool=self.pool,
            scale=None if self.fused_attn else self.scale, **parts,
        )

    def _fused_forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        pos = self._parameters.get("pos_embed")
        if pos is not None:
            if x.dim() != 3 or x.shape[1] != pos.shape[0]:
                raise Unfusable(f"tokens of shape {tuple(getattr(x, 'shape', ()))} do not fit the position embedding")
            x = x + pos.unsqueeze(0).to(x.dtype)  # as timm adds it
        return attention_pool(x, self._weights(), drops=self._drops())


RULES = [Rule((ATTENTION_POOL,), attention_pool_reason, FusedTimmAttentionPool)]
