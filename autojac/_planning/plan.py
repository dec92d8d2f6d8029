"""What a user sees of a plan: an immutable snapshot of the decision, and a report of one call."""

from __future__ import annotations

from dataclasses import dataclass, field

from .._core.problem import Problem, Signature
from .._core.units import format_bytes


@dataclass(frozen=True)
class Candidate:
    """One method as the plan knows it.

    `status` is "chosen" (the method the plan runs), "measured" (ran whole calls;
    `seconds` is its fastest), "slower" (a trial slice projected it well above
    the chosen one), "untried" (still to be tried), "not tried" (predicted too
    slow, or too many passes; `reason` says which), or "failed" (`reason` says how).
    """

    name: str
    status: str
    seconds: float | None = None
    predicted_seconds: float | None = None
    runs: int = 0
    chunk_size: int | None = None
    peak_bytes: int | None = None
    reason: str = ""

    @property
    def feasible(self) -> bool:
        return self.status in ("chosen", "measured", "slower", "untried")

    def brief(self) -> str:
        """The name and what decided it, without the status (`Plan.__str__` groups by status)."""
        if self.seconds is not None:
            detail = f"{seconds_text(self.seconds)}, fastest of {self.runs}"
        elif self.reason:
            detail = self.reason
        elif self.predicted_seconds is not None:
            detail = f"predicted {seconds_text(self.predicted_seconds)}"
        else:
            detail = ""
        return f"{self.name} ({detail})" if detail else self.name

    def describe(self) -> str:
        parts = [f"{self.name}: {self.status}"]
        if self.seconds is not None:
            parts.append(f"{seconds_text(self.seconds)} fastest of {self.runs}")
        elif self.predicted_seconds is not None:
            parts.append(f"predicted {seconds_text(self.predicted_seconds)}")
        if self.chunk_size is not None:
            parts.append(f"chunk {self.chunk_size}")
        if self.peak_bytes is not None:
            parts.append(f"peak ~{format_bytes(self.peak_bytes)}")
        if self.reason:
            parts.append(self.reason)
        return ", ".join(parts)


@dataclass(frozen=True)
class Plan:
    """A reusable decision for one function and one input signature, as of the moment it was taken.

    Get one with `autojac.plan(f, inputs, ...)` (or `autojac.tune`), read it with
    `str(plan)`, run it with `autojac.jacobian(f, inputs, plan=plan)`: that runs
    exactly this method and chunk size, with no exploration.
    """

    mode: str
    vectorize: str
    engine: str
    chunk_size: int
    n_chunks: int
    estimated_seconds: float | None
    estimated_peak_bytes: int | None
    budget_bytes: int | None
    candidates: tuple[Candidate, ...]
    settled: bool
    reason: str
    problem: Problem
    calls: int = 0
    entry: object = field(default=None, compare=False, repr=False)
    """The plan's learning state (internal); it tells `jacobian(plan=...)` what was verified."""

    @property
    def name(self) -> str:
        return f"{self.mode}/{self.vectorize}" + (f" [{self.engine}]" if self.engine else "")

    @property
    def signature(self) -> Signature:
        return self.problem.inputs

    @property
    def fallbacks(self) -> tuple[Candidate, ...]:
        """The other feasible candidates, fastest first: tried in this order if the chosen one fails."""
        rest = [c for c in self.candidates if c.feasible and c.name != self.name]

        def speed(c: Candidate) -> float:
            value = c.seconds if c.seconds is not None else c.predicted_seconds
            return value if value is not None else float("inf")

        return tuple(sorted(rest, key=speed))

    def __str__(self) -> str:
        p = self.problem
        text = (f"Plan: {self.name} in {self.n_chunks} chunk(s) of {self.chunk_size} "
                f"for a {p.n_out} x {p.n_in} Jacobian")
        facts = []
        if self.estimated_seconds is not None:
            facts.append(f"{seconds_text(self.estimated_seconds)}")
        if self.estimated_peak_bytes is not None:
            facts.append(f"peak ~{format_bytes(self.estimated_peak_bytes)}")
        if self.budget_bytes is not None:
            facts.append(f"budget {format_bytes(self.budget_bytes)}")
        if facts:
            text += " (" + ", ".join(facts) + ")"
        text += f". {self.reason}"
        groups = {"measured": "Measured", "slower": "Stopped early", "untried": "To try", "not tried": "Not tried",
                  "failed": "Failed"}
        for status, label in groups.items():
            items = [c.brief() for c in self.candidates if c.status == status and c.name != self.name]
            if items:
                text += f" {label}: " + "; ".join(items) + "."
        return text


@dataclass(frozen=True)
class RunReport:
    """What one call did: `autojac.last_report()` returns the calling thread's latest."""

    method: str
    chunk_sizes: tuple[int, ...]
    seconds: float | None
    evaluations: int
    planned: bool
    """Whether this call made the plan (a first call), rather than reusing one."""
    verified: bool
    """Whether the safety net checked this call's result."""
    trial: str | None = None
    """The alternative this call tried, if it explored, and how it went."""
    events: tuple[str, ...] = ()
    """Fallbacks, out-of-memory retries, failed checks, in order."""

    def __str__(self) -> str:
        text = f"{self.method}, chunks {list(self.chunk_sizes)}, {self.evaluations} evaluation(s) of f"
        if self.seconds is not None:
            text += f", {seconds_text(self.seconds)}"
        if self.planned:
            text += ", made the plan"
        if self.verified:
            text += ", verified"
        if self.trial:
            text += f"; tried {self.trial}"
        if self.events:
            text += "; " + "; ".join(self.events)
        return text


def seconds_text(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"
