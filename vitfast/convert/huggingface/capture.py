"""What a Hugging Face layer's call asks of it beyond its hidden states: transformers 5's output
recorders, attention functions registered by users, and attention masks in the kernel's convention.
transformers is imported here only to read its output recorder's state."""
from __future__ import annotations

import functools
import inspect
import sys

import torch
from torch import Tensor, nn


_FLAGS = ("output_attentions", "output_hidden_states", "return_dict")


def _neutral(value: object) -> bool:
    return value is None or value is False


@functools.cache
def _parameters(cls: type) -> tuple[str, ...]:
    return tuple(inspect.signature(cls.forward).parameters)


def returns_tuple(layer: nn.Module) -> bool:
    """transformers 4's layers return (hidden_states, ...) and take ``output_attentions``; 5's return the tensor."""
    return "output_attentions" in _parameters(layer._vitfast_original)


def mask_and_rest(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[object, bool, list]:
    """A layer call's attention mask (transformers 5's second argument; 4's ViTLayer takes none),
    whether attention is causal, and the values of its other arguments. transformers' text towers
    pass ``is_causal=True`` with their mask, or with no mask where SDPA applies causality itself:
    their attention functions then use the mask when there is one, else a causal mask."""
    rest = dict(kwargs)
    causal = rest.pop("is_causal", None) is True
    if not returns_tuple(layer):
        # transformers 5 forwards the model's output flags to every layer, which ignores them: its
        # outputs are collected by recorders (``recording``), not by the layer.
        for flag in _FLAGS:
            rest.pop(flag, None)
    if "attention_mask" not in _parameters(layer._vitfast_original):
        return None, causal, [*args, *rest.values()]
    mask = args[0] if args else rest.pop("attention_mask", None)
    return mask, causal and mask is None, [*args[1:], *rest.values()]


def asks_more(layer: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether the call asks for what the fused block does not compute: head masks and output flags
    (transformers 4 passes them to the layer), any other keyword transformers forwards set to
    something (position ids), a mask other than a 4-D tensor (flex attention's block masks), or an
    output recorded from inside the layer (transformers 5's attention weights)."""
    if not isinstance(kwargs.get("is_causal", False), bool) and kwargs["is_causal"] is not None:
        return True
    mask, _, rest = mask_and_rest(layer, args, kwargs)
    if not all(_neutral(v) for v in rest) or recording(layer):
        return True
    return mask is not None and not (isinstance(mask, Tensor) and mask.dim() == 4)


def custom_attention(attn: nn.Module) -> str | None:
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


def reads_mask_as_kernel(attn: nn.Module, mask: object) -> bool:
    """Whether the layer's attention function reads ``mask`` as the kernel can: an additive float
    mask (every transformers implementation), or a bool mask under SDPA, where True lets a query
    attend (transformers' eager function adds a bool mask to the scores instead)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        return True
    config = getattr(attn, "config", None)
    return config is not None and config._attn_implementation == "sdpa"


def kernel_mask(mask: Tensor | None) -> Tensor | None:
    """transformers' 4-D mask in the kernel's convention: a bool mask there is True where attention is
    allowed (SDPA's), here True where it is not; an additive float mask means the same in both."""
    return mask.logical_not() if mask is not None and mask.dtype == torch.bool else mask


def recorder_key(hook) -> str | None:
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


def recording(layer: nn.Module) -> bool:
    """Whether this call collects an output that a recorder on one of the layer's submodules records."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return bool(collected) and any(recorder_key(h) in collected for m in layer.modules() if m is not layer
                                   for h in m._forward_hooks.values())
