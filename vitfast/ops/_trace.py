"""Public ops as single nodes of a ``torch.fx.symbolic_trace`` graph."""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, TypeVar

import torch.fx

F = TypeVar("F", bound=Callable[..., Any])


def first_proxy(values: Iterable[Any]) -> torch.fx.Proxy | None:
    """The first ``torch.fx.Proxy`` among ``values`` (looking inside tuples and lists), or None."""
    for v in values:
        if isinstance(v, torch.fx.Proxy):
            return v
        if isinstance(v, (tuple, list)):
            found = first_proxy(v)
            if found is not None:
                return found
    return None


def fx_traceable(op: F) -> F:
    """Let ``op`` be symbolically traced: called with any ``torch.fx.Proxy`` argument, it records
    itself as one ``call_function`` node instead of running, so its checks and its dispatch (kernel
    or fallback) run when the graph runs, on real tensors.

    >>> @fx_traceable
    ... def linear(x, weight, bias=None): ...
    """
    @functools.wraps(op)
    def run_or_record(*args: Any, **kwargs: Any) -> Any:
        proxy = first_proxy((*args, *kwargs.values()))  # never ``or``: a Proxy refuses bool()
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", run_or_record, args, kwargs)
        return op(*args, **kwargs)
    return run_or_record  # type: ignore[return-value]
