"""The plan: which method, what chunk size, what it should cost, and what else was considered."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ._cache import PlanCache
from ._core.units import format_bytes
from ._methods.base import method_name
from ._core.problem import Problem, Signature


@dataclass(frozen=True)
class Cost:
    """What one method costs on one problem, measured by the probes (None: not measured).

    Time of a whole Jacobian at chunk size c over n vectors:
    seconds_fixed + ceil(n / c) * seconds_per_chunk + n * seconds_per_vector.
    Peak extra memory at chunk size c, besides the result:
    bytes_fixed + c * bytes_per_vector.
    """

    mode: str
    vectorize: str
    n_vectors: int
    dropped: str | None = None
    seconds_fixed: float | None = None
    seconds_per_chunk: float | None = None
    seconds_per_vector: float | None = None
    bytes_fixed: int | None = None
    bytes_per_vector: int | None = None
    note: str = ""
    measured_run: tuple[int, float] | None = None
    """(chunk size, seconds) of a whole Jacobian timed at that chunk size; it beats the model there."""
    engine: str = ""
    """The method's engine, where it has more than one (see `_reverse.ReverseVmap`)."""
    error: BaseException | None = field(default=None, compare=False, repr=False)
    """The exception that dropped this method, kept so errors can chain it."""

    @property
    def name(self) -> str:
        return method_name(self.mode, self.vectorize, self.engine)

    @property
    def measured(self) -> bool:
        return self.seconds_per_vector is not None and self.bytes_per_vector is not None


@dataclass(frozen=True)
class Candidate:
    """One method as the planner saw it: its measured cost and, if it can run, its best chunking."""

    cost: Cost
    chunk_size: int | None = None
    n_chunks: int | None = None
    estimated_seconds: float | None = None
    estimated_peak_bytes: int | None = None
    rejected: str | None = None

    @property
    def name(self) -> str:
        return self.cost.name

    @property
    def feasible(self) -> bool:
        return self.rejected is None and self.cost.dropped is None

    def describe(self) -> str:
        if self.cost.dropped is not None:
            return f"{self.name}: dropped ({self.cost.dropped})"
        if self.rejected is not None:
            return f"{self.name}: rejected ({self.rejected})"
        parts = [f"{self.name}: chunk {self.chunk_size} x {self.n_chunks}"]
        if self.estimated_seconds is not None:
            parts.append(f"~{_seconds(self.estimated_seconds)}")
        if self.estimated_peak_bytes is not None:
            parts.append(f"peak ~{format_bytes(self.estimated_peak_bytes)}")
        if self.cost.note:
            parts.append(self.cost.note)
        return ", ".join(parts)


class RunChecks:
    """What the safety net has learnt, per function, about the methods of one plan.

    A method's first Jacobian of a function is verified (see `_verify`); once it
    passed, later calls of the same function skip the check. A function whose
    evaluations disagree with each other is run only by methods that evaluate it
    once. Functions are held weakly, as by the plan cache.
    """

    def __init__(self) -> None:
        self._table = PlanCache()

    def verified(self, f: Callable, name: str) -> bool:
        return self._table.get(f, ("verified", name)) is not None

    def mark_verified(self, f: Callable, name: str) -> None:
        self._table.put(f, ("verified", name), True)

    def evaluations_disagree(self, f: Callable) -> bool:
        return self._table.get(f, ("disagree",)) is not None

    def mark_evaluations_disagree(self, f: Callable) -> None:
        self._table.put(f, ("disagree",), True)


@dataclass(frozen=True)
class Plan:
    """A reusable decision for one function and one input signature.

    Make one with `autojac.plan(f, inputs, ...)`, read it with `str(plan)`, run it
    with `autojac.jacobian(f, inputs, plan=plan)`. `history` records what happened
    when it ran (out-of-memory retries, fallbacks, failed verifications) and
    `checks` which methods the safety net has verified on which functions; they
    are its only mutable parts.
    """

    mode: str
    vectorize: str
    chunk_size: int
    n_chunks: int
    estimated_peak_bytes: int | None
    estimated_seconds: float | None
    budget_bytes: int | None
    candidates: tuple[Candidate, ...]
    reason: str
    problem: Problem
    engine: str = ""
    """For reverse/vmap: "" (torch.func) or "autograd" (is_grads_batched); see `_reverse.ReverseVmap`."""
    history: list[str] = field(default_factory=list, compare=False, repr=False)
    checks: RunChecks = field(default_factory=RunChecks, compare=False, repr=False)

    @property
    def name(self) -> str:
        return method_name(self.mode, self.vectorize, self.engine)

    @property
    def signature(self) -> Signature:
        return self.problem.inputs

    @property
    def fallbacks(self) -> tuple[Candidate, ...]:
        """The other feasible candidates, fastest first: tried in this order if the chosen one fails."""
        rest = [c for c in self.candidates if c.feasible and c.name != self.name]
        return tuple(sorted(rest, key=lambda c: c.estimated_seconds if c.estimated_seconds is not None else float("inf")))

    def __str__(self) -> str:
        p = self.problem
        head = (
            f"Plan: {self.name} in {self.n_chunks} chunk(s) of {self.chunk_size} "
            f"for a {p.n_out} x {p.n_in} Jacobian"
        )
        facts = []
        if self.estimated_seconds is not None:
            facts.append(f"estimated {_seconds(self.estimated_seconds)}")
        if self.estimated_peak_bytes is not None:
            facts.append(f"peak ~{format_bytes(self.estimated_peak_bytes)}")
        if self.budget_bytes is not None:
            facts.append(f"budget {format_bytes(self.budget_bytes)}")
        text = head + (f" ({', '.join(facts)})" if facts else "") + f". {self.reason}"
        others = [c.describe() for c in self.candidates if c.name != self.name]
        if others:
            text += " Other candidates: " + "; ".join(others) + "."
        if self.history:
            text += " History: " + "; ".join(self.history) + "."
        return text


def _seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"
