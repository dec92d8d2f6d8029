"""Reverse mode: rows of the Jacobian from vector-Jacobian products, one per output element."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import final

import torch

from ._method import BatchState, Method, Parts, batched_copies, call, check_batched_outputs, grad_inputs, stack_parts, vjp
from ._problem import Problem


@dataclass
class _Graph:
    xs: tuple[torch.Tensor, ...]
    ys: tuple[torch.Tensor, ...]
    create_graph: bool


class _ReverseOnGraph(Method):
    """Abstract: one forward pass builds the graph; every chunk is a backward pass over it."""

    mode = "reverse"

    def prepare(self, f: Callable, xs: Sequence[torch.Tensor], problem: Problem, create_graph: bool) -> _Graph:
        xs = grad_inputs(xs, create_graph)
        with torch.enable_grad():
            ys = call(f, xs)
        return _Graph(xs, ys, create_graph)


@final
class ReverseLoop(_ReverseOnGraph):
    """Row by row, reverse mode: one `torch.autograd.grad` call per output element."""

    vectorize = "loop"

    def chunk(self, state: _Graph, basis: Sequence[torch.Tensor]) -> Parts:
        k = basis[0].shape[0]
        return stack_parts([
            vjp(state.ys, state.xs, [b[r] for b in basis], create_graph=state.create_graph)
            for r in range(k)
        ])


@final
class ReverseVmap(_ReverseOnGraph):
    """Rows in chunks, reverse mode: one backward pass vectorized with vmap (`is_grads_batched`)."""

    vectorize = "vmap"

    def chunk(self, state: _Graph, basis: Sequence[torch.Tensor]) -> Parts:
        if basis[0].shape[0] == 1:  # a single vector needs no vmap, so vmap's limits don't apply
            return stack_parts([vjp(state.ys, state.xs, [b[0] for b in basis], create_graph=state.create_graph)])
        return vjp(state.ys, state.xs, basis, create_graph=state.create_graph, batched=True)


@final
class ReverseRepeat(Method):
    """Rows in chunks, reverse mode: `f` runs once on k copies of the input, then one backward pass.

    This is the seed thread's repeat trick; it needs `f` to treat a leading
    dimension as independent batch rows (checked by the capability probe).
    """

    mode = "reverse"
    vectorize = "repeat"

    def prepare(self, f: Callable, xs: Sequence[torch.Tensor], problem: Problem, create_graph: bool) -> BatchState:
        return BatchState(f, grad_inputs(xs, create_graph), problem, create_graph)

    def chunk(self, state: BatchState, basis: Sequence[torch.Tensor]) -> Parts:
        k = basis[0].shape[0]
        with torch.enable_grad():
            copies = batched_copies(state.xs, k)
            ys = call(state.f, copies)
        check_batched_outputs(ys, state.problem, k)
        return vjp(ys, copies, basis, create_graph=state.create_graph)
