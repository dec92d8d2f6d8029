"""Custom autograd.Functions whose backward is `@once_differentiable`, found in `f`'s graph.

NOTE: [Second derivatives through @once_differentiable]
`torch.autograd.function.once_differentiable` runs a backward under no_grad, and guards a second backward
through it only when the gradient coming in requires grad. A gradient taken with `create_graph=True` from a
scalar starts from a seed that does not, so it holds that backward's result as a constant, and the Hessian
loses every term through it without a word: a cube's Hessian came out off by 60 on entries of about 50, as
`torch.autograd.functional.hessian` returns it too. The safety net cannot see it: its reference VJP runs on
the same graph. So `hessian` walks the graph of `f`'s evaluation inside the gradient on every call (a verdict
kept per function missed branches on shapes or values, swapped globals and submodules, `eval()`: each gave a
wrong Hessian; the walk costs about a microsecond a node, against the gradient's several), and
`jacobian(..., create_graph=True)`, which asks for a Jacobian to differentiate again (also a Jacobian taken
inside an `f` autojac differentiates: NOTE: [A Jacobian inside f]), walks its first call's plain evaluation
(its plans refuse `plan=` calls made without `create_graph`). Both refuse an `f` with such a Function on a
path from the output to an input (one only on a parameter's path is differentiated once: right). A backward is
recognized through decorators above `@once_differentiable` (`functools.wraps`' `__wrapped__` chain, as
`torch.amp.custom_bwd` keeps it), and under torch.func by the user's class its generated Function holds.
The same walk finds the custom Functions on an input's path: under `create_graph=True`, torch.autograd's batched
backward (`is_grads_batched`, the reverse/vmap [autograd] method, and torch.autograd.functional.jacobian with
vectorize=True) gave a Jacobian whose own derivatives were wrong (7.4 off on a cube's) wherever a Function's
backward applies another Function that saves the incoming gradient (the usual way to write a twice
differentiable custom op), while torch's loop and the repeat trick were right, and the check only sees the
Jacobian's values. The forward-trick (vmap or loop) was wrong (0.95 off) where a backward applies a
`@once_differentiable` Function, which the forward graph does not show: it runs that Function's backward for
the first derivatives, so their graph misses its terms. So a create_graph plan of an `f` with custom Functions
leaves both out (torch's own loop, the repeat trick and native forward mode remain).
Limits: graphs beyond WALK_LIMIT nodes are walked that far; a create_graph plan's later calls are not walked
again (a global swapped for a once-differentiable Function after the first call is not seen); inside a
torch.func transform nothing is walked (torch's own `jacrev(jacrev(f))` returns the same values there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

_ONCE_CODE = once_differentiable(lambda ctx: None).__code__
WALK_LIMIT = 1_000_000
"""Nodes walked at most (a longer graph is walked that far)."""


def once_differentiable_functions(ys: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor] | None = None) -> list[str]:
    """Names of the custom Functions in the graphs of `ys` whose backward is `@once_differentiable`; with
    `inputs`, only those on a path to one of them."""
    return custom_functions(ys, inputs)[0]


def custom_functions(ys: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor] | None = None
                     ) -> tuple[list[str], list[str]]:
    """(the custom Functions in the graphs of `ys` whose backward is `@once_differentiable`, every custom
    Function there), by name; with `inputs`, only those on a path to one of them."""
    roots = [y.grad_fn for y in ys if isinstance(y, torch.Tensor) and y.grad_fn is not None]
    if not roots:
        return [], []
    targets = None
    if inputs is not None:
        targets = {id(x.grad_fn) for x in inputs if x.grad_fn is not None}
        leaves = {id(x) for x in inputs if x.grad_fn is None}
    order, children, seen, stack = [], {}, set(), list(roots)
    while stack and len(seen) < WALK_LIMIT:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        order.append(node)
        kids = [fn for fn, _ in node.next_functions if fn is not None]
        children[id(node)] = kids
        stack.extend(kids)
    reaches: dict[int, bool] = {}
    if targets is not None:
        # Reverse of a DFS preorder is not a topological order for a DAG: iterate to a fixed point, cheaply, by
        # resolving children before parents with an explicit post-order pass.
        for node in _post_order(roots, children):
            own = id(node) in targets or (type(node).__name__ == "AccumulateGrad"
                                          and id(getattr(node, "variable", None)) in leaves)
            reaches[id(node)] = own or any(reaches.get(id(k), False) for k in children.get(id(node), ()))
    once: list[str] = []
    custom: list[str] = []
    for node in order:
        if targets is not None and not reaches.get(id(node), False):
            continue
        cls = _user_class(getattr(node, "_forward_cls", None))
        if cls is None:
            continue
        if cls.__name__ not in custom:
            custom.append(cls.__name__)
        if _is_once(getattr(cls, "backward", None)) and cls.__name__ not in once:
            once.append(cls.__name__)
    return once, custom


def _post_order(roots, children) -> list:
    """The walked nodes, every node after all its children."""
    out, done, stack = [], set(), [(r, False) for r in roots]
    while stack:
        node, expanded = stack.pop()
        if id(node) in done:
            continue
        if expanded:
            done.add(id(node))
            out.append(node)
            continue
        stack.append((node, True))
        stack.extend((k, False) for k in children.get(id(node), ()) if id(k) not in done)
    return out


def _is_once(fn) -> bool:
    """Whether `fn`, or a function it wraps (`__wrapped__`), is `once_differentiable`'s wrapper."""
    for _ in range(16):
        if fn is None:
            return False
        if getattr(fn, "__code__", None) is _ONCE_CODE:
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def _user_class(cls):
    """The user's Function behind a graph node's class: itself, or the one torch.func generated a Function for
    (its backward holds it as `autograd_function`)."""
    if cls is None:
        return None
    backward = getattr(cls, "backward", None)
    code = getattr(backward, "__code__", None)
    if code is not None and "autograd_function" in code.co_freevars and backward.__closure__:
        value = backward.__closure__[code.co_freevars.index("autograd_function")].cell_contents
        if isinstance(value, type) and issubclass(value, torch.autograd.Function):
            return value
    return cls
