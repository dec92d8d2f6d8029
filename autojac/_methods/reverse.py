"""Reverse mode: rows of the Jacobian from vector-Jacobian products, one per output element."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import final

import torch

from .base import (
    BatchState, FuncGraph, Graph, Method, Parts, PlainGraph, call_on_copies, evaluate_func, evaluate_plain, grad_inputs,
    stack_parts, vjp,
)
from .._core.problem import Problem

logger = logging.getLogger("autojac")


class _ReverseOnGraph(Method):
    """Abstract: one forward pass builds the graph; every chunk is a backward pass over it."""

    mode = "reverse"
    evaluates_once = True

    def prepare(self, f: Callable, xs: Sequence[torch.Tensor], problem: Problem, create_graph: bool) -> PlainGraph:
        return evaluate_plain(f, xs, create_graph)

    def adopt(self, graph: Graph) -> PlainGraph | None:
        return graph if isinstance(graph, PlainGraph) else None

    def same_realization_vjp(self, state: PlainGraph, cotangents: Sequence[torch.Tensor]) -> Parts:
        return vjp(state.ys, state.xs, cotangents, create_graph=False)


@final
class ReverseLoop(_ReverseOnGraph):
    """Row by row, reverse mode: one `torch.autograd.grad` call per output element (torch's own loop)."""

    vectorize = "loop"

    def chunk(self, state: PlainGraph, basis: Sequence[torch.Tensor]) -> Parts:
        k = basis[0].shape[0]
        return stack_parts([
            vjp(state.ys, state.xs, [b[r] for b in basis], create_graph=state.create_graph)
            for r in range(k)
        ])


# NOTE: [Two engines for vmap]
# `torch.func.vjp` + `vmap` (what `jacrev` does) was 1.1x to 2.4x faster than
# `torch.autograd.grad(..., is_grads_batched=True)` (what
# `torch.autograd.functional.jacobian(vectorize=True)` does) on most benchmark
# problems, but 2x slower on a small convolutional classifier, and 8x faster on a
# grid residual; torch.func refuses old-style `autograd.Function`s (no
# `setup_context`), which `is_grads_batched` handles. So the vmap methods come in
# two engines, "func" and "autograd", which the planner tries as two candidates.
@final
class ReverseVmap(Method):
    """Rows in chunks, reverse mode: one vectorized backward pass per chunk.

    Engine "func": `torch.func.vjp` + `vmap`; engine "autograd":
    `torch.autograd.grad(..., is_grads_batched=True)` on a plain graph.
    """

    mode = "reverse"
    vectorize = "vmap"
    evaluates_once = True
    ENGINES = ("func", "autograd")

    def __init__(self, engine: str = "func") -> None:
        if engine not in self.ENGINES:
            raise ValueError(f"reverse/vmap has no engine {engine!r}")
        self.engine = engine

    def prepare(self, f: Callable, xs: Sequence[torch.Tensor], problem: Problem, create_graph: bool) -> Graph:
        return evaluate_func(f, xs, create_graph) if self.engine == "func" else evaluate_plain(f, xs, create_graph)

    def adopt(self, graph: Graph) -> Graph | None:
        return graph if isinstance(graph, FuncGraph if self.engine == "func" else PlainGraph) else None

    def same_realization_vjp(self, state: Graph, cotangents: Sequence[torch.Tensor]) -> Parts:
        if isinstance(state, FuncGraph):
            return tuple(state.vjp_fn(tuple(cotangents)))
        return vjp(state.ys, state.xs, cotangents, create_graph=False)

    def chunk(self, state: Graph, basis: Sequence[torch.Tensor]) -> Parts:
        single = basis[0].shape[0] == 1  # a single vector needs no vmap, so vmap's limits don't apply
        if isinstance(state, FuncGraph):
            if single:
                return stack_parts([state.vjp_fn(tuple(b[0] for b in basis))])
            return tuple(torch.func.vmap(state.vjp_fn)(tuple(basis)))
        if single:
            return stack_parts([vjp(state.ys, state.xs, [b[0] for b in basis], create_graph=state.create_graph)])
        return vjp(state.ys, state.xs, basis, create_graph=state.create_graph, batched=True)


@final
class ReverseRepeat(Method):
    """Rows in chunks, reverse mode: `f` runs once on k copies of the input, then one backward pass.

    This is the seed thread's repeat trick; it needs `f` to treat a leading
    dimension as independent batch rows (the safety net checks the result).
    """

    mode = "reverse"
    vectorize = "repeat"

    def prepare(self, f: Callable, xs: Sequence[torch.Tensor], problem: Problem, create_graph: bool) -> BatchState:
        return BatchState(f, grad_inputs(xs, create_graph), problem, create_graph)

    def chunk(self, state: BatchState, basis: Sequence[torch.Tensor]) -> Parts:
        copies, ys = call_on_copies(state, basis[0].shape[0])
        return vjp(ys, copies, basis, create_graph=state.create_graph)
