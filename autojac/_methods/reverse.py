"""Reverse mode: rows of the Jacobian from vector-Jacobian products, one per output element."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import final

import torch

from .base import BatchState, Method, Parts, call, call_on_copies, grad_inputs, stack_parts, vjp
from .._core.problem import Problem

logger = logging.getLogger("autojac")


@dataclass
class _Graph:
    xs: tuple[torch.Tensor, ...]
    ys: tuple[torch.Tensor, ...]
    create_graph: bool


class _ReverseOnGraph(Method):
    """Abstract: one forward pass builds the graph; every chunk is a backward pass over it."""

    mode = "reverse"
    evaluates_once = True

    def prepare(self, f: Callable, xs: Sequence[torch.Tensor], problem: Problem, create_graph: bool) -> _Graph:
        xs = grad_inputs(xs, create_graph)
        with torch.enable_grad():
            ys = call(f, xs)
        return _Graph(xs, ys, create_graph)

    def same_realization_vjp(self, state: _Graph, cotangents: Sequence[torch.Tensor]) -> Parts:
        return vjp(state.ys, state.xs, cotangents, create_graph=False)


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


@dataclass
class _FuncVjp:
    vjp_fn: Callable


# NOTE: [Two engines for reverse/vmap]
# `torch.func.vjp` + `vmap` (what `jacrev` does) was 1.1x to 2.4x faster than
# `torch.autograd.grad(..., is_grads_batched=True)` (what
# `torch.autograd.functional.jacobian(vectorize=True)` does) on most benchmark
# problems, but 2x slower on a small convolutional classifier; and torch.func
# refuses old-style `autograd.Function`s (no `setup_context`), which
# `is_grads_batched` handles. So reverse/vmap comes in two engines, probed and
# timed as two candidates: the default prepares with torch.func (and, only if
# torch.func refuses `f`, builds a plain autograd graph instead); "autograd"
# always builds the graph. Both push the same chunk of cotangents through one
# vectorized backward pass.
@final
class ReverseVmap(Method):
    """Rows in chunks, reverse mode: one vectorized backward pass per chunk.

    Engine "" (default): `torch.func.vjp` + `vmap`; engine "autograd":
    `torch.autograd.grad(..., is_grads_batched=True)` on a plain graph.
    """

    mode = "reverse"
    vectorize = "vmap"
    evaluates_once = True
    ENGINES = ("", "autograd")

    def __init__(self, engine: str = "") -> None:
        if engine not in self.ENGINES:
            raise ValueError(f"reverse/vmap has no engine {engine!r}")
        self.engine = engine

    def prepare(self, f: Callable, xs: Sequence[torch.Tensor], problem: Problem, create_graph: bool) -> _FuncVjp | _Graph:
        if not self.engine:
            primals = tuple(x.view_as(x) if (create_graph and x.requires_grad) else x.detach() for x in xs)
            try:
                return _FuncVjp(torch.func.vjp(lambda *a: call(f, a), *primals)[1])
            except Exception as exc:  # torch.func refuses f (e.g. an old-style autograd.Function)
                logger.debug("reverse/vmap: torch.func.vjp refused f (%s); using is_grads_batched", exc)
        xs = grad_inputs(xs, create_graph)
        with torch.enable_grad():
            return _Graph(xs, call(f, xs), create_graph)

    def same_realization_vjp(self, state: _FuncVjp | _Graph, cotangents: Sequence[torch.Tensor]) -> Parts:
        if isinstance(state, _FuncVjp):
            return tuple(state.vjp_fn(tuple(cotangents)))
        return vjp(state.ys, state.xs, cotangents, create_graph=False)

    def chunk(self, state: _FuncVjp | _Graph, basis: Sequence[torch.Tensor]) -> Parts:
        single = basis[0].shape[0] == 1  # a single vector needs no vmap, so vmap's limits don't apply
        if isinstance(state, _FuncVjp):
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
    dimension as independent batch rows (checked by the capability probe).
    """

    mode = "reverse"
    vectorize = "repeat"

    def prepare(self, f: Callable, xs: Sequence[torch.Tensor], problem: Problem, create_graph: bool) -> BatchState:
        return BatchState(f, grad_inputs(xs, create_graph), problem, create_graph)

    def chunk(self, state: BatchState, basis: Sequence[torch.Tensor]) -> Parts:
        copies, ys = call_on_copies(state, basis[0].shape[0])
        return vjp(ys, copies, basis, create_graph=state.create_graph)
