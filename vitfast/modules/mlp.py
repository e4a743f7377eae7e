from __future__ import annotations

import functools
from typing import Callable, Optional, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import runtime
from ..ops.linear import mlp
from ._drops import live
from ._fused import bypass_reason
from ._share import share_as

# timm's, open_clip's and Hugging Face's activation modules, matched by class name so none need be
# installed.
_NAMED_ACTIVATIONS = {
    "timm.layers.activations.GELU": "gelu",
    "timm.layers.activations.GELUTanh": "gelu_tanh",
    "timm.layers.activations.QuickGELU": "quick_gelu",
    "open_clip.transformer.QuickGELU": "quick_gelu",
    "transformers.activations.GELUActivation": "gelu",
    "transformers.activations.GELUTanh": "gelu_tanh",
    "transformers.activations.PytorchGELUTanh": "gelu_tanh",
    "transformers.activations.NewGELUActivation": "gelu_tanh",
    "transformers.activations.QuickGELUActivation": "quick_gelu",
    "transformers.activations.SiLUActivation": "silu",
    "timm.layers.activations.Swish": "silu",
}
_FUNCTIONS = {F.gelu: "gelu", F.relu: "relu", torch.relu: "relu", F.silu: "silu"}
_STRINGS = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu",
            "relu": "relu", "silu": "silu", "swish": "silu"}


def activation_name(act: Union[str, Callable, nn.Module, None]) -> Optional[str]:
    """The fused kernels' name ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu") for ``act``, or None
    if they lack it.

    Takes what transformer layers hold: a string, ``F.gelu``/``F.relu``/``F.silu``, ``nn.GELU()``
    (either ``approximate``), ``nn.ReLU()``, ``nn.SiLU()``, timm's and Hugging Face's GELU modules
    (``ACT2FN["gelu"]``, ``"gelu_pytorch_tanh"``, ``"gelu_new"``), CLIP's QuickGELU as timm, open_clip
    and Hugging Face (``ACT2FN["quick_gelu"]``) define it, or SiLU as timm (``Swish``) and Hugging
    Face (``ACT2FN["silu"]``, ``"swish"``) define it.

    >>> activation_name(nn.GELU(approximate="tanh"))
    'gelu_tanh'
    >>> activation_name(nn.SiLU())
    'silu'
    >>> activation_name(nn.Tanh()) is None
    True
    """
    if isinstance(act, str):
        return _STRINGS.get(act)
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.SiLU):
        return "silu"
    if isinstance(act, nn.Module):
        return _NAMED_ACTIVATIONS.get(f"{type(act).__module__}.{type(act).__qualname__}")
    try:
        return _FUNCTIONS.get(act)
    except TypeError:  # unhashable
        return None


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class Mlp(nn.Module):
    """Drop-in for ``timm.layers.Mlp`` on vitfast's fused GEMMs: same constructor, submodules
    (``fc1``, ``act``, ``drop1``, ``norm``, ``fc2``, ``drop2``) and ``state_dict``.

    ``forward(x)`` returns ``fc2(act(fc1(x)))``; ``forward(x, residual)`` adds ``residual`` in fc2's
    epilogue. GELU (exact or tanh), QuickGELU, ReLU and SiLU are fused, and in training ``drop1`` and
    ``drop2`` drop inside fc1's and fc2's epilogues; another activation, a ``norm_layer``, or
    ``use_conv`` (1×1 convolutions over NCHW) runs the PyTorch path, with one warning per configuration.

    >>> block_mlp = Mlp(768, 3072)
    >>> y = block_mlp(torch.randn(2, 197, 768), residual=torch.randn(2, 197, 768))
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Optional[Type[nn.Module]] = None,
        bias: Union[bool, tuple[bool, bool]] = True,
        drop: Union[float, tuple[float, float]] = 0.0,
        use_conv: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        bias, drop = _pair(bias), _pair(drop)
        layer = functools.partial(nn.Conv2d, kernel_size=1) if use_conv else nn.Linear
        self.fc1 = layer(in_features, hidden_features, bias=bias[0], **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop[0])
        self.norm = norm_layer(hidden_features, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = layer(hidden_features, out_features, bias=bias[1], **dd)
        self.drop2 = nn.Dropout(drop[1])

    def _unfused_reason(self) -> Optional[str]:
        if activation_name(self.act) is None:
            return f"activation {type(self.act).__name__}"
        if not isinstance(self.norm, nn.Identity):
            return f"norm_layer {type(self.norm).__name__}"
        if not (type(self.drop1) is nn.Dropout and type(self.drop2) is nn.Dropout):
            return f"dropouts {type(self.drop1).__name__}/{type(self.drop2).__name__}"
        bypassed = bypass_reason(self, tuple(self._modules))
        if bypassed is not None:
            return bypassed
        # Exact type: a Linear subclass (LoRA, quantised) may compute something else.
        if not (type(self.fc1) is nn.Linear and type(self.fc2) is nn.Linear):
            return f"layers {type(self.fc1).__name__}/{type(self.fc2).__name__}"
        return None

    def _torch_forward(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        y = self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))
        return y if residual is None else y + residual

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        reason = self._unfused_reason()
        if reason is not None:
            runtime.warn_once(f"Mlp:{reason}", f"vitfast.Mlp: {reason} is not fused; using PyTorch")
            return self._torch_forward(x, residual)
        return mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                   activation_name(self.act), residual=residual, hidden_dropout_p=live(self.drop1, self.drop1.p),
                   dropout_p=live(self.drop2, self.drop2.p))

    @classmethod
    def from_timm(cls, mlp: nn.Module) -> "Mlp":
        """A vitfast Mlp sharing the parameters of ``mlp`` (a ``timm.layers.Mlp``; no copy)."""
        missing = [k for k in ("fc1", "act", "drop1", "norm", "fc2", "drop2") if not hasattr(mlp, k)]
        if missing:
            raise TypeError(f"from_timm expects a timm.layers.Mlp; {type(mlp).__name__} lacks {missing}")
        return share_as(mlp, cls)

    # The name every vitfast module's converter uses.
    from_torch = from_timm
