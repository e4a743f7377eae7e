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
import operator
import types
from itertools import chain, repeat
from typing import Callable

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from .. import runtime
from ..ops._trace import first_proxy
from . import _replay

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
_FORWARD = operator.attrgetter("forward")
_CONTAINERS = operator.itemgetter("_parameters", "_buffers", "_modules")
_HOOK_DICTS = operator.itemgetter(*_HOOKS)
_mixins: dict[str, type] = {}
_made: dict[str, type] = {}


def _no_hooks(state: dict, honours: Callable[[Callable], bool]) -> bool:
    """No hook, but those ``honours`` accepts, on the module whose ``__dict__`` is ``state``."""
    for name in _HOOKS:
        hooks = state.get(name)
        if hooks and not all(honours(h) for h in hooks.values()):
            return False
    return True


def _global_hooks() -> bool:
    return any(getattr(_torch_module, name) for name in _GLOBAL_HOOKS)


def _honours_none(hook: Callable) -> bool:
    return False


def _patched_forward(cls: type) -> bool:
    """Whether the ``forward`` that ``cls`` runs was put on it by someone else (a monkeypatch): a
    library's own forward is named ``<one of cls's classes>.forward`` and defined in that class's module."""
    if issubclass(cls, Fused) or torch.compiler.is_compiling():  # dynamo misreads a function's names
        return False
    forward = cls.forward
    name, module = getattr(forward, "__qualname__", None), getattr(forward, "__module__", None)
    return not any(c.__qualname__ + ".forward" == name and c.__module__ == module for c in cls.__mro__)


def bypass_reason(module: nn.Module, children: tuple[str, ...],
                  honours: Callable[[Callable], bool] = _honours_none) -> str | None:
    """Why a fused path may not skip the ``children`` of ``module`` (and all below them), or None:
    hooks on them (but those ``honours`` accepts), or a ``forward`` replaced on an instance or a class."""
    if children and _global_hooks():
        return "global module hooks are registered"
    stack = [(name, module._modules.get(name)) for name in children]
    while stack:
        path, m = stack.pop()
        if m is None:
            continue
        state = m.__dict__
        if "forward" in state or _patched_forward(type(m)):
            return f"{path}.forward is replaced"
        if not _no_hooks(state, honours):
            return f"hooks are registered on {path}"
        stack.extend((f"{path}.{k}", c) for k, c in state["_modules"].items())
    return None


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


def _same_objects(now, then: tuple) -> bool:
    """The same objects, in the same order (identity: a tensor's ``==`` compares its elements)."""
    return len(now) == len(then) and all(map(operator.is_, now, then))


# Attributes every module has that no forward reads: the state-dict and load hooks, the bookkeeping
# of buffers and hooks. A plan compares every other attribute (the forward hook dicts among them).
_INERT = frozenset(("_non_persistent_buffers_set", "_is_full_backward_hook", "_forward_hooks_with_kwargs",
                    "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
                    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"))


class Plan:
    """A stand-in and its bypassed submodules as they were when the stand-in last checked them in
    full: every object, its class and forward, its children, parameters and buffers, and the
    attribute values of the stand-in and of every module below it (a dropout's p, an eps, an
    activation's kind). While all of that holds and no hook is registered, the fused path stays
    valid without re-running the checks; any change (an attribute set, added or deleted, a
    submodule, parameter or buffer replaced) re-runs them once. A plan that covers all of the
    stand-in's children (``complete``) also holds its settled calls (``_replay.py``), dropped with it."""

    def __init__(self, module: nn.Module, children: tuple[str, ...]):
        modules, stack = [], [module._modules.get(name) for name in children]
        while stack:
            m = stack.pop()
            if m is not None:
                modules.append(m)
                stack.extend(m._modules.values())
        self.children = children
        self.modules = tuple(modules)
        # What the fused path depends on, flattened so that holds() builds and compares it in C: the class
        # and class forward of every module below the stand-in, how many attributes each has, the
        # stand-in's children, the identities of the parameters, buffers and children of each module and
        # of the stand-in itself (the containers as they are at each check: one may be replaced), and the
        # value of every attribute of the modules below but the inert ones (by key: a getter per module;
        # the counts show a key added).
        self.states = tuple(m.__dict__ for m in modules)
        self.getters = tuple(operator.itemgetter(*[k for k in state if k not in _INERT] or ["training"])
                             for state in self.states)
        held = [(state, name) for state in (module.__dict__, *self.states)
                for name in ("_parameters", "_buffers", "_modules") if state[name]]
        self.held_states, self.held_names = tuple(s for s, _ in held), tuple(n for _, n in held)
        # The objects themselves, so that no identity the snapshot holds is reused.
        self.tensors = tuple(chain.from_iterable(map(dict.values, map(dict.__getitem__, self.held_states,
                                                                       self.held_names))))
        self.snapshot = self._snapshot(module)
        self.hooks = tuple(chain.from_iterable(map(_HOOK_DICTS, self.states)))  # filled in place by register_*
        self.own: tuple = ()
        self.complete = set(children) >= set(module._modules)
        self.replays: dict = {}
        self.memo: dict = {}  # what the stand-in derives from the state the plan compares (``_vitfast_memo``)

    def _snapshot(self, module: nn.Module) -> tuple:
        """What the plan compares (see ``__init__``). Containers empty at first are skipped: what a
        forward reads is there from the start (a None bias included), and attributes show a new container."""
        types = tuple(map(type, self.modules))
        containers = map(dict.__getitem__, self.held_states, self.held_names)
        return tuple(chain(types, map(_FORWARD, types), map(len, self.states), map(module._modules.get, self.children),
                           map(id, chain.from_iterable(map(dict.values, containers))),
                           map(operator.call, self.getters, self.states)))

    def seal(self, module: nn.Module) -> None:
        """Take the stand-in's own attributes, once the plan itself is one of them."""
        self.own = tuple(module.__dict__.values())

    def holds(self, module: nn.Module) -> bool:
        if self.children and any(map(getattr, repeat(_torch_module), _GLOBAL_HOOKS)):
            return False
        if not _same_objects(module.__dict__.values(), self.own):
            return False
        try:
            # Tuples compare item by item, identical objects at once. An attribute replaced by an equal
            # value (a float, an equal dict) computes the same; a tensor's == raises: changed.
            if self._snapshot(module) != self.snapshot:
                return False
        except (RuntimeError, TypeError, ValueError, KeyError):  # KeyError: an attribute deleted
            return False
        return not any(self.hooks) or all(_no_hooks(m.__dict__, module._vitfast_honours) for m in self.modules)


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
        runtime.warn_once(f"stand-in:{name}:{reason}",
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
