"""What a stand-in's fused path depends on in the modules below it, and how it finds out that it changed.

``bypass_reason`` says, in full, whether a fused path may skip a module's children (their hooks, a
replaced ``forward``); ``Plan`` keeps what that check and the stand-in's own found, so that a later call
compares it in C instead (``Plan.holds``); ``unit`` extends a plan to the children a fused forward calls
as modules, so that the whole call can be replayed (``_replay.py``).
"""
from __future__ import annotations

import operator
from itertools import chain, repeat
from typing import Callable

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
_FORWARD = operator.attrgetter("forward")
_HOOK_DICTS = operator.itemgetter(*_HOOKS)


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
    if _is_stand_in(cls) or torch.compiler.is_compiling():  # dynamo misreads a function's names
        return False
    forward = cls.forward
    name, module = getattr(forward, "__qualname__", None), getattr(forward, "__module__", None)
    return not any(c.__qualname__ + ".forward" == name and c.__module__ == module for c in cls.__mro__)


def _forward_replaced(m: nn.Module) -> bool:
    """A ``forward`` set on the instance, or on its class by someone else."""
    return "forward" in m.__dict__ or _patched_forward(type(m))


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
        if _forward_replaced(m):
            return f"{path}.forward is replaced"
        if not _no_hooks(state, honours):
            return f"hooks are registered on {path}"
        stack.extend((f"{path}.{k}", c) for k, c in state["_modules"].items())
    return None


def _same_objects(now, then: tuple) -> bool:
    """The same objects, in the same order (identity: a tensor's ``==`` compares its elements)."""
    return len(now) == len(then) and all(map(operator.is_, now, then))


# Attributes every module has that no forward reads: the state-dict and load hooks, the bookkeeping
# of buffers and hooks; and a stand-in's own plan, which its forward checks itself. A plan compares every
# other attribute (the forward hook dicts among them).
_INERT = frozenset(("_non_persistent_buffers_set", "_is_full_backward_hook", "_forward_hooks_with_kwargs",
                    "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
                    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
                    "_vitfast_plan"))


class Plan:
    """A stand-in and its bypassed submodules as they were when the stand-in last checked them in
    full: every object, its class and forward, its children, parameters and buffers, and the
    attribute values of the stand-in and of every module below it (a dropout's p, an eps, an
    activation's kind). While all of that holds and no hook is registered, the fused path stays
    valid without re-running the checks; any change (an attribute set, added or deleted, a
    submodule, parameter or buffer replaced) re-runs them once. A plan also holds the stand-in's
    settled calls (``_replay.py``), dropped with it: where it covers all of the stand-in's children
    (``complete``), or else together with ``below``, the plan of the children its forward calls as
    modules (``unit``): the whole call, what the stand-ins below launch included, is then one replay."""

    def __init__(self, module: nn.Module, children: tuple[str, ...]):
        modules, stack = [], [module._modules.get(name) for name in children]
        while stack:
            m = stack.pop()
            if m is not None:
                modules.append(m)
                stack.extend(m._modules.values())
        # Every stand-in below holds its own plan's key from now on, so that its first call, which stores
        # its plan, adds no attribute (the plan compares their number).
        for m in modules:
            if _is_stand_in(type(m)):
                m.__dict__.setdefault("_vitfast_plan", None)
        self.children = children
        self.modules = tuple(modules)
        # What the fused path depends on, flattened so that holds() builds and compares it in C: the class
        # of every module below the stand-in and each class's forward, how many attributes each has, the
        # stand-in's children, the identities of the parameters, buffers and children of each module and
        # of the stand-in itself (the containers as they are at each check: one may be replaced), and the
        # value of every attribute of the modules below but the inert ones (by key: a getter per module;
        # the counts show a key added).
        self.classes = tuple(dict.fromkeys(map(type, modules)))
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
        # For the settled calls of an incomplete plan (``unit``): the plan of the children the fused forward
        # calls as modules, why the modules below cannot be replayed past (None: they can), the global
        # settings the stand-ins below read (``Fused._vitfast_switches``), and the checked calls that
        # found no replay to record (``_replay.settled`` looks below again now and then).
        self.below: Plan | None = None
        self.unit_reason: str | None = None
        self.switchers: tuple = ()
        self.misses = 0

    def _snapshot(self, module: nn.Module) -> tuple:
        """What the plan compares (see ``__init__``). Containers empty at first are skipped: what a
        forward reads is there from the start (a None bias included), and attributes show a new container."""
        containers = map(dict.__getitem__, self.held_states, self.held_names)
        # A module's class is compared module by module, each class's forward once (a class whose forward
        # is replaced changed for all its modules; a module given another class changed its own item).
        return tuple(chain(map(type, self.modules), map(_FORWARD, self.classes), map(len, self.states),
                           map(module._modules.get, self.children),
                           map(id, chain.from_iterable(map(dict.values, containers))),
                           map(operator.call, self.getters, self.states)))

    def seal(self, module: nn.Module) -> None:
        """Take the stand-in's own attributes, once the plan itself is one of them."""
        self.own = tuple(module.__dict__.values())

    def holds(self, module: nn.Module) -> bool:
        """The stand-in's own attributes and everything below its children as they were, with no hook
        but those the stand-in honours."""
        return _same_objects(module.__dict__.values(), self.own) and self.intact(module, module._vitfast_honours)

    def quiet(self, module: nn.Module) -> bool:
        """Everything below the children as it was and no hook on any of it, nor a global one."""
        return not any(self.hooks) and self.intact(module, _honours_none)

    def intact(self, module: nn.Module, honours: Callable[[Callable], bool]) -> bool:
        if self.children and any(map(getattr, repeat(_torch_module), _GLOBAL_HOOKS)):
            return False
        try:
            # Tuples compare item by item, identical objects at once. An attribute replaced by an equal
            # value (a float, an equal dict) computes the same; a tensor's == raises: changed.
            if self._snapshot(module) != self.snapshot:
                return False
        except (RuntimeError, TypeError, ValueError, KeyError):  # KeyError: an attribute deleted
            return False
        return not any(self.hooks) or all(_no_hooks(m.__dict__, honours) for m in self.modules)

    def switches(self) -> tuple:
        return tuple(f() for f in self.switchers)


def _is_stand_in(cls: type) -> bool:
    return hasattr(cls, "_vitfast_bypasses")  # defined by _fused.Fused


def _stand_in_forward(cls: type) -> bool:
    """Whether a stand-in class runs the stand-in's own forward (not a subclass's override of it)."""
    owner = next(c for c in cls.__mro__ if "forward" in c.__dict__)
    return "_vitfast_original" in owner.__dict__


# Classes whose forward only calls its children in order, or hands back its input (a dropout in eval
# or with p = 0, which the recorder accepts only as such): a replay that skips them skips nothing. And
# containers, which have no forward: their children are called by the module above.
_PASSIVE = (nn.Sequential, nn.Identity, nn.Dropout)
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def unit_reason(module: nn.Module, children: tuple[str, ...]) -> str | None:
    """Why a replay of ``module``'s fused forward may not skip the forwards of the ``children`` it calls
    as modules, or None: each module such a call reaches must be a stand-in running its own forward
    (its fused path's dependencies are in its checks: plans, the call's key, its switches) or one of
    the passive classes above, none with a forward replaced. Hooks are the plan's to check."""
    stack = [(name, module._modules.get(name)) for name in children]
    while stack:
        path, m = stack.pop()
        if m is None:
            continue
        cls = type(m)
        if cls not in _CONTAINERS and _forward_replaced(m):
            return f"{path}.forward is replaced"
        if _is_stand_in(cls):
            if not _stand_in_forward(cls):
                return f"{path} is a {cls.__name__} with a forward of its own"
            skipped = m._vitfast_bypasses
            called = () if skipped is None else tuple(k for k in m._modules if k not in skipped)
        elif cls in _PASSIVE or cls in _CONTAINERS:
            called = tuple(m._modules)
        else:
            return f"{path} is a {cls.__name__}, whose forward a replay would skip"
        stack.extend((f"{path}.{k}", m._modules[k]) for k in called)
    return None


def unit(module: nn.Module, plan: Plan) -> bool:
    """Whether ``module``'s settled calls may be recorded now, its plan incomplete (its fused forward
    calls some children as modules): ``plan.below``, the plan of those children, holds, with no hook on
    any module below them, and ``unit_reason`` finds nothing there that a replay would skip. Built, or
    built again when what it compares changed (the replays recorded under the old state are dropped)."""
    below = plan.below
    if below is not None:
        if any(below.hooks) or _global_hooks():
            return False  # checked again on a later call: hooks come and go
        if below.quiet(module):
            return plan.unit_reason is None
    plan.replays.clear()
    rest = tuple(name for name in module._modules if name not in plan.children)
    plan.unit_reason = unit_reason(module, rest)
    below = plan.below = Plan(module, rest)
    plan.switchers = tuple(m._vitfast_switches for m in below.modules if _is_stand_in(type(m))
                           and type(m)._vitfast_switches.__qualname__ != "Fused._vitfast_switches")
    return below.quiet(module) and plan.unit_reason is None
