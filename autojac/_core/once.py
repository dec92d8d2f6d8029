"""Custom autograd.Functions whose backward is `@once_differentiable`, found in `f`'s graph.

NOTE: [Second derivatives through @once_differentiable]
`torch.autograd.function.once_differentiable` runs a backward under no_grad, and guards a second backward
through it only when the gradient coming in requires grad. A gradient taken with `create_graph=True` from a
scalar starts from a seed that does not, so it holds that backward's result as a constant, and the Hessian
loses every term through it without a word: a cube's Hessian came out off by 60 on entries of about 50, as
`torch.autograd.functional.hessian` returns it too. The safety net cannot see it: its reference VJP runs on
the same graph. So `hessian` walks the graph of `f`'s evaluation inside the gradient (torch.func.grad runs
custom Functions as generated ones whose backward holds the user's class in its closure) and refuses an `f`
with such a Function. Once per function key (code, captured shapes, argnums, has_aux) in a process: the walk
costs about a microsecond a node, and a plan of that key only ever evaluates the same code. An `f` that takes
such a Function only on some branch is walked where it first ran. `jacobian(..., create_graph=True)`, which
asks for a Jacobian to differentiate again (and a Jacobian taken inside an `f` autojac differentiates, which
builds its graph: NOTE: [A Jacobian inside f]), has the same hole: its first call walks the graph of its plain
evaluation and refuses.
"""

from __future__ import annotations

import threading

import torch
from torch.autograd.function import once_differentiable

_ONCE_CODE = once_differentiable(lambda ctx: None).__code__
WALK_LIMIT = 100_000
"""Nodes walked at most (a longer graph is walked that far)."""

_checked: set = set()
_lock = threading.Lock()


def checked(key) -> bool:
    with _lock:
        return key in _checked


def mark_checked(key) -> None:
    with _lock:
        if len(_checked) > 4096:
            _checked.clear()
        _checked.add(key)


def once_differentiable_functions(y: torch.Tensor) -> list[str]:
    """Names of the custom Functions in `y`'s graph whose backward is `@once_differentiable`."""
    found: list[str] = []
    seen, stack = set(), [y.grad_fn]
    while stack and len(seen) < WALK_LIMIT:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        cls = _user_class(getattr(node, "_forward_cls", None))
        if cls is not None and getattr(cls.backward, "__code__", None) is _ONCE_CODE and cls.__name__ not in found:
            found.append(cls.__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def _user_class(cls):
    """The user's Function behind a graph node's class: itself, or the one torch.func generated a Function for."""
    if cls is None:
        return None
    for cell in getattr(cls.backward, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, type) and issubclass(value, torch.autograd.Function) and value is not cls:
            return value
    return cls
