"""`detect(f, xs)`: the sparsity pattern of f's Jacobian, from one trace of f and per-op dependency rules."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from . import deps as D
from . import rules  # noqa: F401 - fills the op registry now, not inside the first propagation's time limit
from .deps import TooDense  # noqa: F401 - raised here and by the engine; callers catch it from here
from .engine import Engine
from .pattern import Pattern, is_grid, side_grids
from .trace import record

_MODES = ("auto", "fake", "real")


class TooLong(Exception):
    """Internal: detection ran past the caller's `max_seconds` (it would cost more than it was allowed)."""

    def __init__(self, seconds: float, done: int, total: int) -> None:
        super().__init__(f"stopped after {seconds:.2f} s, {done} of {total} ops")
        self.seconds, self.done, self.total = seconds, done, total


def detect(f: Callable, xs: Sequence[torch.Tensor], *, trace: str = "auto", max_nnz: int | None = None,
           max_seconds: float | None = None, max_stored: int | None = None, values: bool = False) -> Pattern:
    """Sparsity pattern of the Jacobian of `f(*xs)` (inputs and outputs flattened and concatenated).

    trace="auto" traces f on fake tensors (the pattern then holds for every input of these shapes)
    and falls back to a trace on the real values when f needs them (data-dependent control flow,
    `.item()`, boolean masks): that pattern has `valid_everywhere=False`. "fake" or "real" forces one.
    The result always contains every nonzero; ops without an exact rule are listed in `dense_ops`.
    With `max_nnz`, a pattern of more nonzeros raises TooDense before it is spelled out (the planner's
    limit beyond which no colouring could pay). With `max_seconds`, propagation that runs longer raises
    TooLong between two ops (the planner's allowance: index sets that grow op after op, as through a long
    rollout, can make propagation cost far more than the trace; the trace itself costs about one
    evaluation of `f`, plus fake-tensor set-up the first time in a process). With `max_stored`, an op
    whose dependency sets store more entries raises TooDense as soon as it is propagated (a memory bound).
    With `values=True` the pattern says which inputs each output's *value* depends on (through detached tensors,
    masks and indices too: `Engine.values`), and the random ops the trace met are listed in its notes
    ("random op: ..."): what the repeat trick's copies must not share (NOTE: [Batch-aware at every point]).
    """
    if trace not in _MODES:
        raise ValueError(f"trace must be one of {_MODES}, got {trace!r}")
    if isinstance(xs, torch.Tensor):
        xs = (xs,)
    xs = tuple(xs)
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input {i} is a {type(x).__name__}; detect needs tensors (pass constants through f's closure)")
        if not x.dtype.is_floating_point:
            raise TypeError(f"input {i} has dtype {x.dtype}; Jacobians need floating-point inputs (convert with .double())")
    start = time.perf_counter()
    notes: list[str] = []
    tape = None
    if trace in ("auto", "fake"):
        try:
            tape = record(f, xs, "fake")
        except Exception as e:  # data-dependent Python control flow, .item(), nonzero, unsupported fake kernels
            if trace == "fake":
                raise
            notes.append(f"fake-tensor trace failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "traced on the actual values instead")
    if tape is None:
        tape = record(f, xs, "real")
    for k, m in enumerate(tape.output_metas):
        if not m.floating:
            raise TypeError(f"output {k} has dtype {m.dtype}; Jacobians need floating-point outputs")
    engine = Engine(tape, values=values)
    if values:
        from .registry import op_info

        notes += [f"random op: {op.func}" for op in tape.ops if op_info(op.func).random]
    propagating = time.perf_counter()  # the limit is on propagation: the trace costs about an evaluation
    try:
        out_deps = engine.run(None if max_seconds is None else propagating + max_seconds, max_stored)
    except TooLong as late:
        raise TooLong(time.perf_counter() - propagating, late.done, late.total) from None
    parts = [(d, m.numel) for d, m in zip(out_deps, tape.output_metas)]
    n_out = sum(n for _, n in parts)
    joined = D.concat(parts)
    if max_nnz is not None and (nnz := D.count(joined)) > max_nnz:
        raise TooDense(nnz)
    full = D.materialize(joined, n_out, engine.n_in)
    return Pattern.from_csr(full, valid_everywhere=tape.mode == "fake", reads_captured=engine.read_captured,
                            dense_ops=tuple(dict.fromkeys(engine.dense_ops)),
                            grids=(grids(tape, tape.output_metas), grids(tape, tape.input_metas)),
                            seconds=time.perf_counter() - start,
                            source=f"{tape.mode} trace", notes=tuple(notes))


def grids(tape, metas) -> tuple[tuple[int, ...], ...]:
    """The shapes the trace saw one side's elements in, row-major (a hint for colourings: NOTE: [Grids the
    trace saw]): for one tensor, every whole view of its storage in the tape (a flat input that `f` reshapes
    to (2, 32, 32)); for several tensors of one shape, that shape stacked. Nothing for other sides."""
    if not metas or not all(m.whole for m in metas):
        return ()
    if len(metas) > 1:
        return side_grids([m.shape for m in metas])
    side = metas[0]
    seen = {side.shape: None}
    for op in tape.ops:  # a view of the storage is some op's output (the side itself is the tape's input or output)
        for m in op.out_metas:
            if m.skey == side.skey and m.shape not in seen and m.whole:
                seen[m.shape] = None
    return tuple(s for s in seen if is_grid(s))
