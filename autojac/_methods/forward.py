"""Forward mode: columns of the Jacobian from native Jacobian-vector products, one per input element."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import final

import torch
import torch.autograd.forward_ad as fwAD

from .base import (
    BatchState, Method, Parts, batched_copies, call, check_batched_outputs, forward_ad_lock, plain_inputs, stack_parts,
)
from .._core.problem import Problem


def dual_pass(f: Callable, primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor],
               private: bool = False) -> tuple[tuple[torch.Tensor, ...], Parts]:
    """One forward-AD pass with dual numbers; returns the outputs and their tangents."""
    with forward_ad_lock, fwAD.dual_level():
        ys = call(f, [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)], private=private)
        unpacked = [fwAD.unpack_dual(y) for y in ys]
        return tuple(u.primal for u in unpacked), tuple(u.tangent for u in unpacked)


class _ForwardOnInputs(Method):
    """Abstract: forward mode reruns `f` for every pass, so preparing only fixes the inputs."""

    mode = "forward"

    def prepare(self, f: Callable, xs: Sequence[torch.Tensor], problem: Problem, create_graph: bool) -> BatchState:
        return BatchState(f, plain_inputs(xs, create_graph), problem, create_graph)

    def _single(self, state: BatchState, tangents: Sequence[torch.Tensor]) -> Parts:
        return dual_pass(state.f, state.xs, tangents)[1]


@final
class ForwardLoop(_ForwardOnInputs):
    """Column by column, forward mode: one dual-number pass of `f` per input element."""

    vectorize = "loop"

    def chunk(self, state: BatchState, basis: Sequence[torch.Tensor]) -> Parts:
        return stack_parts([self._single(state, [b[r] for b in basis]) for r in range(basis[0].shape[0])])


@final
class ForwardVmap(_ForwardOnInputs):
    """Columns in chunks, forward mode: `torch.func.jvp` vectorized with `torch.func.vmap`."""

    vectorize = "vmap"

    def chunk(self, state: BatchState, basis: Sequence[torch.Tensor]) -> Parts:
        if basis[0].shape[0] == 1:
            return stack_parts([self._single(state, [b[0] for b in basis])])

        def push(*tangents: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.func.jvp(lambda *a: call(state.f, a), state.xs, tangents)[1]

        with forward_ad_lock:
            return tuple(torch.func.vmap(push)(*basis))


@final
class ForwardRepeat(_ForwardOnInputs):
    """Columns in chunks, forward mode: one dual-number pass of `f` on k copies of the input."""

    vectorize = "repeat"

    def chunk(self, state: BatchState, basis: Sequence[torch.Tensor]) -> Parts:
        k = basis[0].shape[0]
        ys, tangents = dual_pass(state.f, batched_copies(state.xs, k), basis, private=True)
        check_batched_outputs(ys, state.problem, k)
        return tangents
