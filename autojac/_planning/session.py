"""What a plan's first call (`first_call.py`) and its later calls (`later_calls.py`) share: the call being made,
its progress bar, and the bookkeeping both keep on a plan. These three modules are the only impure part of
planning.

NOTE: [Planning that pays for itself]
A first call does real work from the start. It evaluates `f` once with a plain
autograd graph (to learn the output shapes; timed, and measured when the budget
could bind), takes one reference VJP on that graph for the safety net, picks the
first method by rules (`choose.first_chain`), and computes the Jacobian with it
in chunks that grow only while the measurements say the next one fits the budget
and pays. Those chunks are the answer. A method that fails on them hands over to
the next in the chain.

Later calls run the incumbent. While the plan is not settled, each call adds a
share of the incumbent's fastest call to an exploration credit, and each trial is
charged what it cost beyond an incumbent call; when the credit covers a first
slice of the next alternative (priced pessimistically), that call runs the
alternative on that slice first, projects its whole time, and either finishes the
call with it (a real, whole measurement) or hands the rest to the incumbent. The
fastest whole call wins; once every alternative has been tried (close ones twice)
the plan is settled and calls cost nothing extra.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

import torch

from .._core.errors import AutojacError, MemoryBudgetError, NotBatchAwareError, UnsupportedFunctionError
from .._core.options import Options
from .._core.problem import Problem, Signature
from .._execute.assemble import Assembler
from .._execute.layout import collector
from .._execute.run import RunLog, is_out_of_memory, push
from .._execute.verify import VerificationError, reference_product
from .._measure.meter import PeakMeter
from .._methods import METHODS
from .._methods.base import PlainGraph, check_batch_aware, evaluate_plain, plain_inputs
from .._methods.forward import dual_pass
from .choose import MethodId
from .cost_model import GROWTH, fitting_size, paying_cap, projected_seconds
from .entry import PlanEntry
from .plan import RunReport
from .sizing import Sizer

logger = logging.getLogger("autojac")

PROGRESS_AFTER_SECONDS = 10.0
MEASURE_WHEN_PRIOR_ABOVE = 0.25
"""Chunks are measured when the prior peak of the whole basis exceeds this share of the room the budget leaves."""
PRIOR_FACTOR = 2.0
"""Bytes per basis vector before anything is measured: this times (forward pass + one input + one output)."""


def _method(m: MethodId):
    return METHODS[(m.mode, m.vectorize, m.engine)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PROGRESS_EVIDENCE_SECONDS = 1.0
"""A run's first chunk alone opens the bar only once this much has passed (see `Progress.projected`)."""


class Progress:
    """A tqdm bar on stderr, opened only once a run is expected to take over 10 s (or when asked).

    NOTE: [A first call's progress estimate]
    The run's time is projected from the pace of its latest chunk: the time so far, plus the vectors left at
    the seconds per vector the latest chunk took. Not from the first chunk: it carries the run's one-time
    costs (a first batch of 2 vectors of a wide MLP under a 4-6 MiB budget projected 16-19 s for runs of
    9.5-9.9 s), and chunks grow after it while a vector can cost more in a larger chunk (a 60-step RK4
    rollout of 3000 unknowns: 31 vectors in 0.3 s projected 33.6 s, and the run took 80 s). A first chunk that
    is itself slow (PROGRESS_EVIDENCE_SECONDS) still opens the bar at once.
    """

    def __init__(self, wanted: bool | None, total: int, label: str) -> None:
        self.wanted, self.total, self.label = wanted, total, label
        self.bar = None
        self.done = 0
        self.began = time.perf_counter()
        self.updates = 0
        self.last = self.began  # when the latest chunk ended
        if wanted:
            self.expect(None)

    def projected(self, k: int, now: float) -> float | None:
        """The whole run's expected time after a chunk of `k` vectors ended at `now` (None: not known yet)."""
        elapsed = now - self.began
        if self.updates <= 1:  # the first chunk: all of the run's one-time costs
            return projected_seconds(0.0, elapsed, self.done, self.total) if elapsed >= PROGRESS_EVIDENCE_SECONDS else None
        return projected_seconds(elapsed, now - self.last, k, self.total - self.done)

    def expect(self, seconds: float | None) -> None:
        """Open the bar if the whole run is expected to take over PROGRESS_AFTER_SECONDS."""
        if self.bar is not None or self.wanted is False:
            return
        if self.wanted or (seconds is not None and seconds > PROGRESS_AFTER_SECONDS and sys.stderr.isatty()):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.done, desc=f"autojac {self.label}", unit="vec", file=sys.stderr)

    def already(self, k: int) -> None:
        """`k` vectors computed before the run began (the engine probe's rows): counted, but no chunk's pace."""
        self.done += k
        self.last = time.perf_counter()
        if self.bar is not None:
            self.bar.update(k)

    def update(self, k: int) -> None:
        self.done += k
        self.updates += 1
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(k)
        elif self.wanted is None and self.done < self.total:
            self.expect(self.projected(k, now))
        self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Call:
    """One call of `jacobian`: the evaluator standing in for `f`, the inputs, the options, and what happened."""

    def __init__(self, evaluator, xs: Sequence[torch.Tensor], signature: Signature, options: Options, who: str) -> None:
        self.f = evaluator
        self.xs = xs
        self.signature = signature
        self.options = options
        self.who = who
        self.device = signature.device
        self._meter: PeakMeter | None = None
        self.events: list[str] = []
        self.chunks: list[int] = []
        self.trial: str | None = None
        self.verified = False
        self.method_name = ""
        self.captures: tuple = (None, (), ())
        """(`f`, its key, the modules it uses): what it holds, for a forward method's fixed memory."""
        self.work_seconds: float | None = None
        """The chosen method's time in this call: prepare, push, assemble (not checks, not autojac's own work)."""
        self.must_verify = False
        """Check this call's Jacobian whatever the method: the values a sparsity pattern was found for changed."""
        self.values_now = None
        self.recheck_seconds: float | None = None
        """What the check that `must_verify` asked for took (a repeat method's, on new captured values)."""
        self.tangent_checks = False
        """Plan with checks by tangents: `f`'s backward failed under the check's VJP (NOTE: [Checks by tangents])."""
        self.vjp_failure: BaseException | None = None

    @property
    def meter(self) -> PeakMeter:
        """Made when first needed: a cached call of a settled plan measures nothing."""
        if self._meter is None:
            self._meter = PeakMeter(self.device)
        return self._meter

    def collect(self, assembler) -> tuple[object, float]:
        """The assembled result and the seconds assembling it took (part of a method's time: a dense
        result is allocated there, a sparse one decompressed)."""
        _sync(self.device)
        began = time.perf_counter()
        result = assembler.result()
        _sync(self.device)
        return result, time.perf_counter() - began

    def report(self, seconds: float | None, planned: bool) -> RunReport:
        return RunReport(self.method_name, tuple(self.chunks), seconds, self.f.count, planned, self.verified,
                         self.trial, tuple(self.events))

    # --- pieces ----------------------------------------------------------------------------------

    def reference(self, problem: Problem, w, graph: PlainGraph | None = None):
        """w^T J by one plain VJP: on `graph` if given, else on a fresh plain evaluation of `f`."""
        return self.references(problem, graph)(w)

    def references(self, problem: Problem, graph: PlainGraph | None = None):
        """`reference` for one check's products (the random one, and the balanced one where rows differ widely):
        on `graph` if given, else on one fresh plain evaluation of `f` that they share (a second evaluation
        for the balanced product was one more side effect of `f`, and its time)."""
        if problem.tangent_checks:
            return self._tangent_products(problem)
        held = [graph]

        def product(w):
            if held[0] is None:
                held[0] = evaluate_plain(self.f, self.xs, False)
                self._check_shapes(held[0].ys, problem)
            try:
                return reference_product(held[0].ys, held[0].xs, w)
            except Exception as exc:
                if (is_out_of_memory(exc) or isinstance(exc, AutojacError)
                        or self.options.mode not in ("auto", "forward")):
                    raise
                raise NeedsTangents() from exc  # `f`'s backward failed: NOTE: [Checks by tangents]
        return product

    def _tangent_products(self, problem: Problem):
        """J v for tangents v (one per input), each by one plain forward-AD pass of `f` on dual numbers on a fresh
        evaluation, unbatched: the check's reference where `f` has no backward (NOTE: [Checks by tangents])."""

        def product(v):
            xs = plain_inputs(self.xs, False)
            v = tuple(torch.zeros_like(x) if t is None else t for x, t in zip(xs, v))  # None: left out of this check
            ys, tangents = dual_pass(self.f, xs, v)
            self._check_shapes(ys, problem)
            return tuple(None if t is None else t.detach() for t in tangents)
        return product

    def _check_shapes(self, ys, problem: Problem) -> None:
        if tuple(tuple(y.shape) for y in ys) != problem.out_shapes or tuple(y.dtype for y in ys) != problem.out_dtypes:
            raise OutputsChanged(tuple(tuple(y.shape) for y in ys), problem.out_shapes)

    def run(self, m: MethodId, problem: Problem, sizer: Sizer, *, state=None, start: int = 0, stop: int | None = None,
            assembler: Assembler | None = None, progress: Progress | None = None, after_chunk=None):
        """Prepare `m` (unless `state` is given) and push basis vectors start..stop; (assembler, log, position, seconds)."""
        method = _method(m)
        n = m.passes(problem.col_passes, problem.row_passes)
        stop = n if stop is None else stop
        log = RunLog()
        began = time.perf_counter()
        if state is None:
            state = method.prepare(self.f, self.xs, problem, self.options.create_graph)
        assembler = assembler or collector(problem, m.by_rows)
        position = push(method, state, assembler, problem, start, stop, sizer, log,
                        self.meter if sizer.measured else None, None if progress is None else progress.update,
                        after_chunk)
        if sizer.timed:
            _sync(self.device)
        seconds = time.perf_counter() - began
        self.chunks += [c.size for c in log.chunks]
        self.events += log.events
        return assembler, log, position, seconds, state


class PatternFailed(Exception):
    """Internal: a plan's sparsity pattern failed the check on a later call (see NOTE: [Patterns and values]), or
    (`failure` None) the tensors `f` holds changed and the plan's pattern follows them (NOTE: [A pattern found
    again]): it is found again before anything is computed. `layout`: the plan's."""

    def __init__(self, failure: BaseException | None, layout) -> None:
        super().__init__(str(failure) if failure is not None else "the tensors `f` holds changed")
        self.failure = failure
        self.layout = layout


class NeedsTangents(Exception):
    """Internal: the check's reference VJP failed (`f` has no backward) where forward mode may answer: the call
    plans again in forward mode, checked by tangents (NOTE: [Checks by tangents])."""


class OutputsChanged(Exception):
    """Internal: `f` now returns outputs of other shapes than the plan was made for."""

    def __init__(self, now, planned):
        super().__init__(f"`f` now returns outputs of shapes {list(now)}, but the plan was made when it returned {list(planned)}")
        self.now, self.planned = now, planned


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _trimming(call: Call, entry: PlanEntry) -> bool:
    """Return free heap memory between chunks: on the CPU under a budget the caller gave (see
    `meter.release_free_heap`; about a millisecond a chunk). The plan's budget: a `plan=` call gives none."""
    return call.device.type == "cpu" and entry.options.budget is not None


def _planned_chunk(entry: PlanEntry, stats) -> int | None:
    """The chunk size later calls run `stats.method` at: None (the whole basis) unless its measured memory
    line says the budget does not fit the whole basis (then the largest chunk that fits), or a run measured
    larger chunks that stopped paying (then no larger than `stats.pays_up_to`)."""
    n = stats.method.passes(entry.problem.col_passes, entry.problem.row_passes)
    if entry.options.chunk_size is not None:
        return None
    fitting = n
    line = stats.memory_line()
    room = entry.room_bytes()
    if line is not None and room is not None:
        # Later calls are not measured: beyond the largest chunk measured the CPU reserve is kept back (NOTE: [A
        # larger chunk meets new workspaces]), and no further than GROWTH times it.
        measured = max((k for k, _ in stats.memory), default=n)
        fitting = min(fitting_size(line, room, n, measured, entry.new_size_reserve),
                      GROWTH * measured)
    if stats.pays_up_to is not None:
        fitting = min(fitting, stats.pays_up_to)
    return None if fitting >= n else max(fitting, 1)


def _learn(stats, log: RunLog, sizer: Sizer) -> None:
    """Keep what the run measured: chunk peaks and time per vector."""
    for c in log.chunks:
        if c.peak_bytes is not None:
            stats.memory.append((c.size, float(c.peak_bytes)))
        if c.seconds is not None and c.size:
            stats.rates.append((c.size, c.seconds / c.size))
    del stats.memory[:-8], stats.rates[:-8]
    cap = paying_cap(stats.rates)
    if cap is not None:
        stats.pays_up_to = cap


def _record_failure(entry: PlanEntry, stats, failure: BaseException, call: Call, failures: list) -> None:
    if isinstance(failure, NotBatchAwareError):
        _not_batch_aware(entry, failure)
    elif isinstance(failure, VerificationError) and not stats.method.evaluates_once:
        if stats.method.vectorize == "repeat":
            _not_batch_aware(entry, failure)
        elif not entry.problem.tangent_checks:
            # Checked by tangents, every method and the reference evaluate `f` anew in forward mode: a method that
            # disagrees fails alone, and an `f` whose evaluations disagree fails them all.
            _evaluations_disagree(entry, forward=stats.method.mode == "forward")
    stats.status, stats.reason = "failed", _first_line(failure)
    failures.append((stats.method.name, failure))
    call.events.append(f"{stats.method.name} failed ({_first_line(failure)})")
    logger.debug(call.events[-1])


def _batch_aware_once(call: Call, entry: PlanEntry, m: MethodId) -> None:
    """Before a plan's first repeat method runs: `f` on two different rows (NOTE: [Batch-aware, checked on
    different rows]); raises NotBatchAwareError, which drops every repeat method of the plan."""
    if m.vectorize == "repeat" and not entry.batch_aware_checked:
        check_batch_aware(call.f, call.xs, entry.problem)
        entry.batch_aware_checked = True
        if entry.problem.layout is None:  # what the verdict holds for (a pattern's values are its own)
            entry.values_seen = call.f.value_sources()


def _not_batch_aware(entry: PlanEntry, failure: BaseException) -> None:
    """The repeat trick gave a wrong Jacobian: `f` mixes the rows of a batch (or its evaluations disagree)."""
    for s in entry.stats.values():
        if s.method.vectorize == "repeat" and s.status != "failed":
            s.status, s.reason = "failed", ("the repeat trick's Jacobian failed the check: `f` mixes the rows of a "
                                            "batch, or its evaluations disagree")


_FORWARD_DIFFERS = ("or its forward-mode derivatives differ from its reverse-mode ones (`torch.no_grad` inside `f` "
                    "does not stop forward-mode AD; a custom autograd.Function whose jvp disagrees with its backward)")


def _evaluations_disagree(entry: PlanEntry, forward: bool = False) -> None:
    """`f` gives different results on identical evaluations: only methods that evaluate it once may run.

    A forward-mode method's failed check has a second possible cause, which the reason names: forward-mode AD
    ignores `torch.no_grad` (so a value `f` computes under it carries derivatives that reverse mode drops).
    The same methods are dropped either way (the forward-trick computes reverse mode's derivatives)."""
    entry.once_only = True
    why = "`f`'s evaluations disagree (a generator of its own, or state it changes)"
    if forward:
        why += ", " + _FORWARD_DIFFERS
    for s in entry.stats.values():
        if not s.method.evaluates_once and s.status not in ("failed",):
            s.excluded = why
            s.status, s.reason = "not tried", s.excluded


_DIFFERS = "`f` gives different results on identical evaluations (a random generator of its own, or state it changes)"


def _no_method(call: Call, failures: list[tuple[str, BaseException]]) -> Exception:
    options = call.options
    if not failures:
        return UnsupportedFunctionError(f"{call.who}: {_DIFFERS}, and " + (
            "with no backward only forward mode can compute its Jacobian, which evaluates it more than once. Keep "
            "that state outside `f`, or give its custom autograd.Functions a backward." if call.tangent_checks else
            "none of the allowed methods evaluates it only once. Use mode='reverse' or mode='forward-trick' with "
            "vectorize='vmap' or 'loop'."))
    name, last = failures[-1]
    # Methods that failed for the same reason are named together (the three repeat methods refused by one
    # batch-aware check read as one sentence, not three).
    reasons: dict[str, list[str]] = {}
    for n, e in failures:
        reasons.setdefault(_first_line(e), []).append(n)
    tried = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in reasons.items())
    if all(is_out_of_memory(e) for _, e in failures):
        error = MemoryBudgetError(
            f"{call.who}: {name} ran out of memory even one basis vector at a time ({tried}). Free memory, "
            "pass a `memory_budget` so autojac sizes chunks to fit, or use mode='reverse' when `f` has fewer "
            "outputs than inputs.")
    elif isinstance(last, UnsupportedFunctionError) and len(failures) == 1:
        if str(last).startswith(f"{call.who}:"):
            return last
        error = type(last)(f"{call.who}: {last}")  # a method's own refusal, named for the function called
    else:
        # One method: what to try instead. Several: they were every method allowed, so the advice is the options'
        # (vectorize='repeat' given: the repeat methods' need), or else that all were tried.
        advice = _advice(options) if len(failures) == 1 or options.vectorize == "repeat" else "Every allowed method was tried."
        if isinstance(last, VerificationError) and call.tangent_checks:
            advice = (f"{_DIFFERS}, or torch.func's vmap disagrees with its forward-mode formulas; with no backward, "
                      "autojac computes it only in forward mode.")
        elif isinstance(last, VerificationError):
            forward = name.startswith("forward/")
            advice = (_DIFFERS + (", " + _FORWARD_DIFFERS if forward else "") + "; use mode='reverse', "
                      "or mode='forward-trick' with vectorize='vmap' or 'loop', which evaluate it once"
                      + (" and compute reverse mode's derivatives" if forward else "") + ".")
        lead = f"{name} could not" if len(failures) == 1 else "none of the allowed methods could"
        error = UnsupportedFunctionError(f"{call.who}: {lead} differentiate `f`: {tried}. {advice}")
    error.__cause__ = last
    return error


def _advice(options: Options) -> str:
    if options.fixed_method or options.mode != "auto" or options.vectorize != "auto":
        if options.vectorize == "repeat":
            return "vectorize='repeat' needs `f` to accept a leading batch dimension with independent rows; try vectorize='vmap' or 'loop', or 'auto'."
        if options.mode == "forward":
            return "mode='forward' needs forward-mode formulas for every op of `f`; try mode='forward-trick' or 'reverse', or 'auto'."
        if options.mode == "forward-trick":
            return "mode='forward-trick' needs backward formulas that are themselves differentiable; try mode='reverse' or 'forward', or 'auto'."
        return "Try mode='auto' and vectorize='auto', which fall back on their own."
    return "Check that `f` is differentiable."


def check_strict(graph: PlainGraph, who: str) -> None:
    """Raise StrictError if some output's graph does not reach some input."""
    from .._core.errors import StrictError

    for i, y in enumerate(graph.ys):
        try:
            reached = (
                torch.autograd.grad(y, graph.xs, torch.ones_like(y), retain_graph=True, allow_unused=True)
                if y.requires_grad else (None,) * len(graph.xs)
            )
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            raise UnsupportedFunctionError(
                f"{who}: strict=True finds outputs independent of an input with a backward pass of `f`, and its "
                f"backward failed ({_first_line(exc)}). Pass strict=False (blocks of zeros for independent "
                "outputs), which also computes a function without a backward in forward mode.") from exc
        for j, g in enumerate(reached):
            if g is None:
                raise StrictError(f"{who}: with strict=True every output must depend on every input, but output {i} is independent of input {j}. Pass strict=False to get zeros for that block.")


def _check_outputs_unchanged(call: Call, problem: Problem, failure: BaseException) -> None:
    if is_out_of_memory(failure) or isinstance(failure, VerificationError):
        return
    graph = evaluate_plain(call.f, call.xs, False)
    call._check_shapes(graph.ys, problem)