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
on an input's path (or a graph past WALK_LIMIT, not walked to its end) leaves both out: torch's own loop, the
repeat trick, torch.func's vmap and native forward mode remain. Plain torch ops keep every method: their double
backward formulas are torch's own.
A later create_graph call walks its own plain evaluation too (a branch on values can reach a Function the
first call did not see): a once-differentiable Function there is refused whatever the method, and any custom
Function fails those two methods, so that the next one answers. Limits: graphs beyond WALK_LIMIT nodes are
walked that far; a method that keeps no plain evaluation (torch.func's engine, native forward mode) is not
walked on later calls, and a Function a tensor hook applies in the backward is never seen (hooks cannot be read
off the graph); inside a torch.func transform nothing is walked (torch's own `jacrev(jacrev(f))` returns the
same values there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

_ONCE_CODE = once_differentiable(lambda ctx: None).__code__
WALK_LIMIT = 20_000
"""Nodes any walk of an autograd graph visits at most (this one, and `backward_fallbacks`'s): a longer graph is
walked that far. Each node walked gets a Python wrapper, which takes it out of torch's iterative deletion of a
graph: freeing a chain of some 40,000 walked nodes then recursed past the C stack (a segfault), as 20,000 do not."""


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
    order, children, complete = walk(roots)
    reaches: dict[int, bool] = {}
    if targets is not None:
        # A DFS preorder reversed is not a topological order of a DAG: a post-order settles every child first.
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
        if _once_backward(cls) and cls.__name__ not in once:
            once.append(cls.__name__)
    if not complete:  # whatever lies beyond counts as custom
        custom.append(f"whatever lies past the first {WALK_LIMIT} nodes of its graph")
    return once, custom


def walk(roots) -> tuple[list, dict[int, list], bool]:
    """The nodes of the autograd graph below `roots` (grad_fn nodes), at most WALK_LIMIT of them, depth first:
    (the nodes in the order visited, each visited node's children by id, whether the graph was walked to its
    end)."""
    order, children, seen, stack = [], {}, set(), [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        if len(seen) >= WALK_LIMIT:
            return order, children, False
        seen.add(id(node))
        order.append(node)
        kids = [fn for fn, _ in node.next_functions if fn is not None]
        children[id(node)] = kids
        stack.extend(kids)
    return order, children, True


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
        try:
            value = backward.__closure__[code.co_freevars.index("autograd_function")].cell_contents
        except ValueError:  # an empty cell
            return cls
        if isinstance(value, type) and issubclass(value, torch.autograd.Function):
            return value
    return cls


def _once_backward(cls) -> bool:
    """Whether the backward torch runs for `cls` is `@once_differentiable`: `backward`, or `vjp` where the class
    overrides that alias instead."""
    vjp = getattr(cls, "vjp", None)
    overridden = vjp is not None and getattr(vjp, "__func__", vjp) is not getattr(
        torch.autograd.Function.vjp, "__func__", torch.autograd.Function.vjp)
    return _is_once(getattr(cls, "backward", None)) or (overridden and _is_once(vjp))


def unsafe_under_create_graph(m) -> bool:
    """Whether method `m` can build a Jacobian whose own derivatives are wrong through custom Functions: torch.autograd's
    batched backward, and the forward-trick (NOTE: [Second derivatives through @once_differentiable])."""
    return m.mode == "forward-trick" or (m.mode, m.vectorize, m.engine) == ("reverse", "vmap", "autograd")


def create_graph_once_error(who: str, names: Sequence[str]):
    """The refusal of a create_graph call whose `f` uses @once_differentiable Functions on an input's path."""
    from .errors import UnsupportedFunctionError

    return UnsupportedFunctionError(
        f"{who}: create_graph=True asks for a Jacobian to differentiate again, but `f` uses {', '.join(names)}, a "
        "custom autograd.Function whose backward is @once_differentiable: torch computes that backward without a "
        "graph, so derivatives of the Jacobian would miss every term it contributes (torch's own functions return "
        "them without a word). Write its backward with differentiable torch ops and drop @once_differentiable, or "
        "do not differentiate the Jacobian.")
