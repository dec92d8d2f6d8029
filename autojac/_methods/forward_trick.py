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

from .base import BatchState, Method, Parts, call, call_on_copies, grad_inputs, stack_parts, vjp
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
        xs = grad_inputs(xs, create_graph)
        with torch.enable_grad():
            return _linearize(call(f, xs), xs, create_graph)

    def same_realization_vjp(self, state: _Linear, cotangents: Sequence[torch.Tensor]) -> Parts:
        return vjp(state.ys, state.xs, cotangents, create_graph=False)


@final
class ForwardTrickLoop(_TrickOnGraph):
    """Column by column, double-VJP trick: one backward pass over g per input element."""

    vectorize = "loop"

    def chunk(self, state: _Linear, basis: Sequence[torch.Tensor]) -> Parts:
        return stack_parts([_jvp(state, [b[r] for b in basis], batched=False) for r in range(basis[0].shape[0])])


@final
class ForwardTrickVmap(_TrickOnGraph):
    """Columns in chunks, double-VJP trick: the backward pass over g vectorized with vmap."""

    vectorize = "vmap"

    def chunk(self, state: _Linear, basis: Sequence[torch.Tensor]) -> Parts:
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
