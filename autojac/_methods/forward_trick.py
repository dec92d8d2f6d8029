"""The double-VJP trick: Jacobian-vector products from reverse-mode formulas alone.

g(v) = J^T v is linear in the cotangent v, so the VJP of g with respect to v,
with cotangent u, is J u: a forward-mode product that needs only backward
formulas and double backward (Townsend's trick, from the seed thread).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import final

import torch

from .base import (
    BatchState, FuncGraph, Graph, Method, Parts, PlainGraph, call_on_copies, evaluate_func, evaluate_plain, grad_inputs,
    stack_parts, vjp,
)
from .._core.problem import Problem


@dataclass
class _Linear:
    """The graph of g(v) = J^T v: `gs` per input, built from cotangents `vs` per output."""

    vs: tuple[torch.Tensor, ...]
    gs: tuple[torch.Tensor | None, ...]
    create_graph: bool
    ys: tuple[torch.Tensor, ...]
    xs: tuple[torch.Tensor, ...]


def _linearize(ys: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], create_graph: bool) -> _Linear:
    vs = tuple(torch.zeros_like(y).requires_grad_() for y in ys)
    gs = vjp(ys, xs, vs, create_graph=True)
    return _Linear(vs, gs, create_graph, tuple(ys), tuple(xs))


def _jvp(linear: _Linear, tangents: Sequence[torch.Tensor], batched: bool) -> Parts:
    """J u for tangents u (per input), as the VJP of g with respect to v."""
    # A g that does not require grad has a zero derivative (an input the outputs
    # do not use, or ops like `round` whose backward is constant); it adds nothing.
    return vjp(linear.gs, linear.vs, tangents, create_graph=linear.create_graph, batched=batched)


class _TrickOnGraph(Method):
    """Abstract: one forward and one differentiable backward pass build g; every chunk differentiates g."""

    mode = "forward-trick"
    evaluates_once = True

    def prepare(self, f: Callable, xs: Sequence[torch.Tensor], problem: Problem, create_graph: bool) -> _Linear:
        return self.adopt(evaluate_plain(f, xs, create_graph))

    def adopt(self, graph: Graph) -> _Linear | None:
        if not isinstance(graph, PlainGraph):
            return None
        with torch.enable_grad():
            return _linearize(graph.ys, graph.xs, graph.create_graph)

    def same_realization_vjp(self, state: _Linear, cotangents: Sequence[torch.Tensor]) -> Parts:
        return vjp(state.ys, state.xs, cotangents, create_graph=False)


@final
class ForwardTrickLoop(_TrickOnGraph):
    """Column by column, double-VJP trick: one backward pass over g per input element."""

    vectorize = "loop"

    def chunk(self, state: _Linear, basis: Sequence[torch.Tensor]) -> Parts:
        return stack_parts([_jvp(state, [b[r] for b in basis], batched=False) for r in range(basis[0].shape[0])])


@dataclass
class _FuncTrick:
    """g(v) = J^T v and its VJP u -> J u, both from torch.func (what jacfwd(jacrev) would nest)."""

    ys: tuple[torch.Tensor, ...]
    vjp_fn: Callable
    trick_fn: Callable


@final
class ForwardTrickVmap(Method):
    """Columns in chunks, double-VJP trick: the backward pass over g vectorized with vmap.

    Engine "autograd": g built by a differentiable `torch.autograd.grad`, its VJPs
    batched with `is_grads_batched`; engine "func": g = the `torch.func.vjp`
    function of `f`, differentiated by `torch.func.vjp` and batched by `vmap`.
    See NOTE: [Two engines for vmap].
    """

    mode = "forward-trick"
    vectorize = "vmap"
    evaluates_once = True
    ENGINES = ("func", "autograd")

    def __init__(self, engine: str = "autograd") -> None:
        if engine not in self.ENGINES:
            raise ValueError(f"forward-trick/vmap has no engine {engine!r}")
        self.engine = engine

    def prepare(self, f: Callable, xs: Sequence[torch.Tensor], problem: Problem, create_graph: bool):
        graph = evaluate_func(f, xs, create_graph) if self.engine == "func" else evaluate_plain(f, xs, create_graph)
        return self.adopt(graph)

    def adopt(self, graph: Graph):
        if self.engine == "autograd":
            if not isinstance(graph, PlainGraph):
                return None
            with torch.enable_grad():
                return _linearize(graph.ys, graph.xs, graph.create_graph)
        if not isinstance(graph, FuncGraph):
            return None
        zeros = tuple(torch.zeros_like(y) for y in graph.ys)
        vjp_fn = graph.vjp_fn
        with torch.set_grad_enabled(graph.create_graph):
            _, trick_fn = torch.func.vjp(lambda *v: tuple(vjp_fn(tuple(v))), *zeros)
        return _FuncTrick(graph.ys, vjp_fn, trick_fn)

    def same_realization_vjp(self, state, cotangents: Sequence[torch.Tensor]) -> Parts:
        if isinstance(state, _FuncTrick):
            return tuple(state.vjp_fn(tuple(cotangents)))
        return vjp(state.ys, state.xs, cotangents, create_graph=False)

    def chunk(self, state, basis: Sequence[torch.Tensor]) -> Parts:
        if isinstance(state, _FuncTrick):
            if basis[0].shape[0] == 1:
                return stack_parts([tuple(state.trick_fn(tuple(b[0] for b in basis)))])
            return tuple(torch.func.vmap(lambda *u: tuple(state.trick_fn(tuple(u))))(*basis))
        if basis[0].shape[0] == 1:
            return stack_parts([_jvp(state, [b[0] for b in basis], batched=False)])
        return _jvp(state, basis, batched=True)


@final
class ForwardTrickRepeat(Method):
    """Columns in chunks, double-VJP trick: the repeat trick applied twice (k copies, two backward passes)."""

    mode = "forward-trick"
    vectorize = "repeat"

    def prepare(self, f: Callable, xs: Sequence[torch.Tensor], problem: Problem, create_graph: bool) -> BatchState:
        return BatchState(f, grad_inputs(xs, create_graph), problem, create_graph)

    def chunk(self, state: BatchState, basis: Sequence[torch.Tensor]) -> Parts:
        copies, ys = call_on_copies(state, basis[0].shape[0])
        with torch.enable_grad():
            linear = _linearize(ys, copies, state.create_graph)
        return _jvp(linear, basis, batched=False)
