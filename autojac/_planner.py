"""The planner: a pure function from problem facts, measured costs and a budget to a Plan.

It never runs the function and never asks the machine anything; probes and
memory readings are its inputs, so it can be tested with made-up numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._execute.basis import n_chunks as count_chunks
from ._core.errors import MemoryBudgetError
from ._core.units import format_bytes
from ._plan import Candidate, Cost, Plan
from ._core.problem import Problem

SAFETY = 1.15
"""Measured memory is scaled by this before comparing with the budget (allocator slack, noise)."""


def estimate_seconds(cost: Cost, chunk_size: int) -> float | None:
    if cost.measured_run is not None and cost.measured_run[0] == chunk_size:
        return cost.measured_run[1]
    if cost.seconds_per_vector is None:
        return None
    n = cost.n_vectors
    return (cost.seconds_fixed or 0.0) + count_chunks(n, chunk_size) * (cost.seconds_per_chunk or 0.0) + n * cost.seconds_per_vector


def estimate_peak(cost: Cost, chunk_size: int, result_bytes: int) -> int | None:
    if cost.bytes_per_vector is None:
        return None
    return result_bytes + math.ceil(SAFETY * ((cost.bytes_fixed or 0) + max(cost.bytes_per_vector, 0) * chunk_size))


def largest_fitting_chunk(cost: Cost, budget_bytes: int, result_bytes: int) -> int | None:
    """The largest chunk size whose estimated peak fits, balanced across chunks; None if even 1 does not fit."""
    n = max(cost.n_vectors, 1)
    peak_at_one = estimate_peak(cost, 1, result_bytes)
    if peak_at_one is not None and peak_at_one > budget_bytes:
        return None
    if cost.bytes_per_vector is None or cost.bytes_per_vector <= 0:
        chunk = n
    else:
        room = budget_bytes / SAFETY - (result_bytes / SAFETY) - (cost.bytes_fixed or 0)
        chunk = max(1, min(n, int(room // cost.bytes_per_vector)))
    return -(-n // count_chunks(n, chunk))


def assess(cost: Cost, budget_bytes: int | None, result_bytes: int, chunk_size: int | None) -> Candidate:
    """Choose this candidate's chunk size and estimate its time and peak, or say why it cannot run."""
    if cost.dropped is not None:
        return Candidate(cost)
    n = max(cost.n_vectors, 1)
    if chunk_size is not None:
        chunk = -(-n // count_chunks(n, min(chunk_size, n)))
    elif budget_bytes is None or not cost.measured:
        chunk = n
    else:
        fitting = largest_fitting_chunk(cost, budget_bytes, result_bytes)
        if fitting is None:
            need = estimate_peak(cost, 1, result_bytes)
            return Candidate(cost, rejected=f"needs ~{format_bytes(need)} even one vector at a time")
        chunk = fitting
    peak = estimate_peak(cost, chunk, result_bytes)
    candidate = Candidate(
        cost,
        chunk_size=chunk,
        n_chunks=count_chunks(n, chunk),
        estimated_seconds=estimate_seconds(cost, chunk),
        estimated_peak_bytes=peak,
    )
    if budget_bytes is not None and peak is not None and peak > budget_bytes:
        return Candidate(cost, chunk_size=chunk, estimated_peak_bytes=peak,
                         rejected=f"chunk size {chunk} needs ~{format_bytes(peak)}")
    return candidate


def choose(
    problem: Problem,
    costs: Sequence[Cost],
    budget_bytes: int | None,
    chunk_size: int | None = None,
    reserve_bytes: int = 0,
) -> Plan:
    """Pick the candidate with the lowest estimated time whose estimated peak fits the budget.

    `reserve_bytes` is memory the device needs that the probes cannot see (see
    `_memory.untracked_reserve`); like the result, it is added to every estimate.

    Candidates are listed in the caller's order of preference, which breaks ties
    and orders unmeasured candidates. Raises MemoryBudgetError if something
    could run but nothing fits; UnsupportedFunctionError is the caller's job.
    """
    fixed_bytes = problem.result_bytes + reserve_bytes
    candidates = tuple(assess(c, budget_bytes, fixed_bytes, chunk_size) for c in costs)
    feasible = [c for c in candidates if c.feasible]
    if not feasible:
        runnable = [c for c in candidates if c.cost.dropped is None]
        if runnable:
            smallest = min(runnable, key=lambda c: estimate_peak(c.cost, 1, fixed_bytes) or 0)
            need = estimate_peak(smallest.cost, 1, fixed_bytes) or 0
            raise MemoryBudgetError(
                f"jacobian: the memory budget is {format_bytes(budget_bytes or 0)}, but the smallest plan "
                f"({smallest.name}, one vector at a time) needs ~{format_bytes(need)}, of which the result "
                f"itself is {format_bytes(problem.result_bytes)} and the workspace reserve {format_bytes(reserve_bytes)}. "
                "Raise `memory_budget` or free memory."
            )
        raise NoMethodError(candidates)
    order = {id(c): i for i, c in enumerate(candidates)}
    best = min(feasible, key=lambda c: (c.estimated_seconds if c.estimated_seconds is not None else math.inf, order[id(c)]))
    return Plan(
        mode=best.cost.mode,
        vectorize=best.cost.vectorize,
        chunk_size=best.chunk_size or 1,
        n_chunks=best.n_chunks or 0,
        estimated_peak_bytes=best.estimated_peak_bytes,
        estimated_seconds=best.estimated_seconds,
        budget_bytes=budget_bytes,
        candidates=candidates,
        reason=_reason(best, feasible, budget_bytes),
        problem=problem,
        engine=best.cost.engine,
    )


def _reason(best: Candidate, feasible: Sequence[Candidate], budget_bytes: int | None) -> str:
    if len(feasible) == 1 and best.estimated_seconds is None:
        return "It was the only method allowed by the arguments."
    text = f"It has the lowest estimated time of {len(feasible)} feasible method(s)"
    if budget_bytes is not None and best.n_chunks and best.n_chunks > 1 and best.cost.bytes_per_vector:
        text += "; its chunk size is the largest whose estimated peak fits the budget"
    return text + "."


class NoMethodError(Exception):
    """Internal: every candidate was dropped; the caller turns this into an UnsupportedFunctionError."""

    def __init__(self, candidates: tuple[Candidate, ...]):
        super().__init__("no candidate can run")
        self.candidates = candidates

