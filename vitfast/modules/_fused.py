"""What every fused stand-in shares.

A stand-in is a subclass of the class it replaces (``_vitfast_original``), so ``isinstance`` checks,
the class's other methods (timm's ``forward_intermediates``, Hugging Face's checkpointing flags) and
hooks on the module itself keep working. Its forward runs vitfast's fused path only when that is
exact for this call, and otherwise runs the original class's forward on the same module:

* a submodule the fused path bypasses carries hooks, has its ``forward`` replaced on the instance, or
  is no longer of a class vitfast knows (a LoRA wrapper, a parametrization): one warning per cause;
* the call asks for something the fused path does not compute (a mask it cannot read, attention
  weights, the embeddings' dropout while training): quietly, as documented;
* ``torch.fx`` is tracing: ``symbolic_trace``'s plain tracer records the stand-in as one
  ``call_module`` (the fused path runs when the graph runs), as it records a ``torch.nn`` module;
  other tracers (feature extraction, Hugging Face's) trace the original forward, so they see the
  structure they would have seen before ``optimize``.

``torch.jit.script`` compiles a stand-in as it compiles the original: its ``forward`` leads to the
original's source and globals, and its class shows the original's annotations; the module scripted is
the user's own, left as it is. Stand-in classes made for third-party classes are named so that pickle finds
them again in a fresh process (``__getattr__`` below).
"""
from __future__ import annotations

import functools
import importlib
import types
from typing import Callable

import torch
from torch import nn

from .. import runtime
from ..ops._trace import first_proxy
from . import _replay
from ._plan import Plan, bypass_reason

_mixins: dict[str, type] = {}
_made: dict[str, type] = {}


# Methods of an original class that its forward does not reach.
_NOT_IN_FORWARD = frozenset({"forward", "extra_repr", "reset_parameters", "_reset_parameters"})


@functools.cache
def override_reason(cls: type) -> str | None:
    """Why a subclass of a stand-in class (a user's subclass of ``FastTransformerEncoderLayer``, say)
    may not run the fused path: it redefines a method of the original that the original's forward may
    call (``_sa_block``), which the fused path would skip. ``forward`` itself is the subclass's to run."""
    base = next(c for c in cls.__mro__ if "_vitfast_original" in c.__dict__)
    original = base._vitfast_original
    methods = {name for c in original.__mro__[:original.__mro__.index(nn.Module)] for name, v in vars(c).items()
               if callable(v) and not name.startswith("__") and name not in _NOT_IN_FORWARD}
    for c in cls.__mro__[:cls.__mro__.index(base)]:
        redefined = sorted(methods.intersection(vars(c)))
        if redefined:
            return f"{c.__name__} redefines {original.__name__}.{redefined[0]}, which the fused path does not call"
    return None


def honours_any(self, hook: Callable) -> bool:
    """A stand-in's ``_vitfast_honours`` when it declines, per call, while its bypassed children have
    hooks (``bypassed_hooks``): its original forward, which calls them, runs quietly."""
    return True


def bypassed_hooks(module: nn.Module) -> bool:
    """Whether any module below the children ``module``'s fused path bypasses has a hook (or a forward
    replaced on it)."""
    plan = module.__dict__.get("_vitfast_plan")
    if plan is not None and plan.children == module._vitfast_bypasses:
        return any(plan.hooks)  # the plan holds (checked just before): its hook dicts are theirs
    return bypass_reason(module, module._vitfast_bypasses) is not None


class Unfusable(Exception):
    """Raised by a fused forward, before it launches anything, for inputs only the original takes."""


class Fused:
    """Base of every stand-in. A concrete class names ``_vitfast_original`` (vitfast's own drop-in
    modules); ``stand_in`` combines a mixin, or a concrete class, with the exact class it replaces.

    Subclasses define ``_fused_forward`` (the fused path, same signature as the original forward; it
    raises ``Unfusable`` before its first launch for inputs it cannot take) and may override the two
    questions below."""

    _vitfast_original: type
    _vitfast_bypasses: tuple[str, ...] | None = None  # children the fused path skips (None: all)

    def __init_subclass__(cls, **kwargs):
        original = cls.__dict__.get("_vitfast_original")
        if original is not None:
            # Before super(): transformers wraps each layer class's forward for gradient checkpointing.
            cls.forward = _signed_as(original)
            # torch.jit.script types attributes by the annotations an instance finds first in its
            # class's MRO: the original's, not those of Fused (timm's PatchEmbed declares an enum there).
            cls.__annotations__ = _annotations(original)
        super().__init_subclass__(**kwargs)
        # vitfast's own classes, by name, for pickle (not the per-original classes, nor user subclasses).
        if cls.__module__.startswith("vitfast.") and cls.__module__ != __name__:
            if _mixins.setdefault(cls.__name__, cls) is not cls:
                raise TypeError(f"two vitfast stand-in classes are named {cls.__name__}")

    def _vitfast_unsupported(self) -> str | None:
        """Why this module's configuration (classes, attributes) cannot run fused now, or None."""
        return None

    def _vitfast_honours(self, hook: Callable) -> bool:
        """True for a hook on a bypassed submodule that this stand-in honours itself (its declines
        check, per call, whether the hook would do something); any other hook stops the fused path."""
        return False

    def _vitfast_declines(self, *args, **kwargs) -> bool:
        """True when the call asks for what the fused path does not compute (runs the original quietly)."""
        return False

    def _vitfast_memo(self, name: str, compute: Callable[[], object]) -> object:
        """``compute()``, kept while the module's plan holds: for what follows from the module state the
        plan compares alone (a layer's dropout settings), which a forward would otherwise derive per call.
        Call it where the plan has just been checked (``_vitfast_declines``, the fused forward)."""
        plan = self.__dict__.get("_vitfast_plan")
        if plan is None or torch.compiler.is_compiling():  # compiling: the plan is not checked
            return compute()
        memo = plan.memo
        if name not in memo:
            memo[name] = compute()
        return memo[name]

    def _vitfast_switches(self) -> tuple:
        """The global settings the fused forward reads beyond those every op reads (``_replay._key``):
        a settled call replays only under the same values."""
        return ()

    def forward(self, *args, **kwargs):
        """Every concrete stand-in's forward, under the original forward's signature (``_signed_as``)."""
        # A settled call: its checks in one place, cheapest first. torch.compile traces the checked path
        # (asked first, so that dynamo guards on none of the plan's replays).
        if not torch.compiler.is_compiling():
            plan = self.__dict__.get("_vitfast_plan")
            if plan is not None and plan.replays:
                out = _replay.replayed(self, plan, args, kwargs)
                if out is not _replay.NOT_SETTLED:
                    return out
        proxy = first_proxy((*args, *kwargs.values()))
        if proxy is not None:
            return self._vitfast_trace(proxy.tracer, args, kwargs)
        reason = "a torch.func transform is active" if _functorch_level() is not None else self._vitfast_check()
        if reason is None:
            if self._vitfast_declines(*args, **kwargs):
                return self._vitfast_fallback(*args, **kwargs)
            try:
                # torch.compile traces the checked path (its guards stand for a settled call's checks).
                out = _replay.NOT_SETTLED if torch.compiler.is_compiling() else _replay.settled(self, args, kwargs)
                return self._fused_forward(*args, **kwargs) if out is _replay.NOT_SETTLED else out
            except Unfusable as e:
                reason = str(e)
        name = type(self).__name__
        runtime.warn_once(f"stand-in:{type(self).__qualname__}:{reason}",
                          f"vitfast {name}: {reason}; running {self._vitfast_original.__name__}'s own forward")
        return self._vitfast_fallback(*args, **kwargs)

    def _vitfast_check(self) -> str | None:
        """Why the fused path may not run now, whatever the inputs; None when it may."""
        children = tuple(self._modules) if self._vitfast_bypasses is None else self._vitfast_bypasses
        if torch.compiler.is_compiling():  # checked once while tracing; the compiler guards on what it read
            return (bypass_reason(self, children, self._vitfast_honours) or override_reason(type(self))
                    or self._vitfast_unsupported())
        plan = self.__dict__.get("_vitfast_plan")
        if plan is not None and plan.children == children and plan.holds(self):
            return None
        reason = (bypass_reason(self, children, self._vitfast_honours) or override_reason(type(self))
                  or self._vitfast_unsupported())
        plan = self.__dict__["_vitfast_plan"] = None if reason is not None else Plan(self, children)
        if plan is not None:
            plan.seal(self)
        return reason

    def _vitfast_fallback(self, *args, **kwargs):
        """The original class's forward on this module (PyTorch's, timm's, Hugging Face's own code)."""
        _replay.left_fused()
        return self._vitfast_original.forward(self, *args, **kwargs)

    def _vitfast_trace(self, tracer, args: tuple, kwargs: dict):
        records = type(tracer) is torch.fx.Tracer or self._vitfast_original.__module__.startswith("torch.nn")
        if records and tracer.root is not self:
            return tracer.create_proxy("call_module", tracer.path_of_module(self), args, kwargs)
        return self._vitfast_fallback(*args, **kwargs)

    def __getstate__(self):
        # The cached plan holds the forward functions of classes made at run time, which pickle
        # cannot name; a copy checks in full on its first call instead.
        state = dict(super().__getstate__())
        state.pop("_vitfast_plan", None)
        return state


def original_class(module: nn.Module) -> type:
    """The class ``module`` had before vitfast swapped it (its own class when it is no stand-in)."""
    return type(module).__dict__.get("_vitfast_original", type(module))


def _functorch_level():
    """The active torch.func transform level, or None: the custom ops have no rules for those transforms."""
    return torch._C._functorch.maybe_current_level()


def _annotations(cls: type) -> dict:
    """The class annotations an instance of ``cls`` sees (those of the first class in its MRO with any)."""
    for c in cls.__mro__:
        if "__annotations__" in c.__dict__ or "__annotate__" in c.__dict__:
            return dict(c.__annotations__)
    return {}


def _signed_as(original: type):
    """``Fused.forward`` under ``original.forward``'s name and signature (``inspect.signature``,
    ``torch.fx`` and tracers that bind arguments by name read it through ``__wrapped__``).
    ``torch.jit.script`` compiles the source it finds there, the original's, in the globals of the
    function it is given: those are the original's, so a stand-in scripts as its original does."""
    fused_forward = Fused.forward

    def forward(self, *args, **kwargs):
        return fused_forward(self, *args, **kwargs)

    forward = types.FunctionType(forward.__code__, original.forward.__globals__, "forward", None,
                                 forward.__closure__)
    return functools.wraps(original.forward)(forward)


def _class_key(original: type, mixin: type) -> str:
    # pickle looks a class up by splitting its qualname on "."; module paths hold no ":" or "/".
    return "/".join((mixin.__name__, original.__module__.replace(".", ":"), original.__qualname__.replace(".", ":")))


def stand_in(original: type, mixin: type) -> type:
    """The stand-in class for ``original``: ``mixin``'s fused forward over ``original``'s everything
    else, under ``original``'s name (code that finds layer classes by name, such as transformers' and
    accelerate's FSDP wrapping and device maps, finds it)."""
    key = _class_key(original, mixin)
    cls = _made.get(key)
    if cls is None:
        bases = (mixin,) if issubclass(mixin, original) else (mixin, original)
        cls = type(original.__name__, bases,
                   {"__module__": __name__, "__qualname__": key, "_vitfast_original": original})
        _made[key] = cls
    return cls


def __getattr__(name: str) -> type:
    """Rebuild a stand-in class by its key (unpickling in a process that has not converted a model)."""
    parts = name.split("/")
    if len(parts) != 3:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module("vitfast.convert")  # defines every mixin
    mixin_name, module_name, qualname = (p.replace(":", ".") for p in parts)
    original = functools.reduce(getattr, qualname.split("."), importlib.import_module(module_name))
    return stand_in(original, _mixins[mixin_name])
