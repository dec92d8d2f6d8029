"""A plan's learning state: what each method measured, the incumbent, the exploration credit.

One `PlanEntry` per cache key, shared by every call (and thread) that uses the
plan; its fields change only under its lock. Users see it through `Plan`
snapshots.
"""

from __future__ import annotations

import collections
import math
import threading
from dataclasses import dataclass, field

from .._core.options import Options
from .._core.problem import Problem
from .._core.units import format_bytes
from .._measure.device import untracked_reserve
from . import choose
from .choose import Facts, MethodId
from .cost_model import MEMORY_SAFETY, Line, balanced, fit_line, n_chunks
from .plan import Candidate, Plan, seconds_text

RUNS_KEPT = 8


@dataclass
class ValueChecks:
    """Which of a plan's recent calls were checked on new captured values, and what such a check took (the
    fastest seen: one plain evaluation and one VJP). Shared by the plan's repeat methods: whether calls bring
    new values is the caller's pattern, and the check is the same whichever repeat method would run, so a
    repeat method that never ran as the incumbent is not priced as if its calls needed none (a robot arm's
    closure loop moved from the reverse repeat trick, 0.22 ms + 0.22 ms of checks, to the forward-trick one,
    0.41 ms with none counted yet)."""

    recent: list[bool] = field(default_factory=list)
    seconds: float | None = None
    estimate: float | None = None
    """A check's time before any ran: the first call's plain evaluation and VJP (NOTE: [New values before a repeat
    method runs])."""
    confirmed: bool = False
    """Whether `f` was shown batch-aware for every input at the values the latest call saw: until then every call
    of a repeat method is checked (NOTE: [Batch-aware at every point])."""


@dataclass
class MethodStats:
    """What one method measured within one plan."""

    method: MethodId
    status: str = "untried"
    reason: str = ""
    prior: float | None = None
    runs: list[float] = field(default_factory=list)
    chunk_size: int | None = None
    memory: list[tuple[int, float]] = field(default_factory=list)
    """(chunk size, measured peak bytes of one chunk) points."""
    rates: list[tuple[int, float]] = field(default_factory=list)
    """(chunk size, seconds per vector) points."""
    pays_up_to: int | None = None
    """The chunk size past which larger chunks stopped paying in a run (`cost_model.paying_cap`): kept when the
    points that showed it are no longer among `rates`, so later calls do not grow into it again."""
    verified: bool = False
    checked_sizes: set[int] = field(default_factory=set)
    """Chunk sizes a verified run of a repeat method used (see `unchecked_sizes`)."""
    excluded: str = ""
    """Why this method may not run for this plan at all (a random `f`, evaluations that disagree)."""
    checks: ValueChecks | None = None
    """A repeat method's: the plan's record of checks on new captured values, shared by its repeat methods."""
    stopped_on_slice: bool = False
    """Whether this method is "slower" by a first slice's projection alone (its `prior`), not a whole run."""
    retried: bool = False
    """Whether such a method has had its one whole re-trial."""
    sliced_share: float = 1.0
    """For a method whose only run was a trial cut into more chunks than its plan would run (a first slice the
    credit covered, then the rest): the plan's chunks over the chunks it ran. Each chunk paid the fixed costs
    (a repeat chunk evaluates `f` anew), so the run overstates a whole call, about by this factor."""

    @property
    def best(self) -> float | None:
        return min(self.runs) if self.runs else None

    @property
    def warming(self) -> bool:
        """Whether the latest whole run was the fastest by over 10% (choose.CONFIRM_MAX_RUNS). Read off the kept
        runs: RUNS_KEPT is above CONFIRM_MAX_RUNS, so a contender's are all there."""
        return len(self.runs) > 1 and self.runs[-1] < 0.9 * min(self.runs[:-1])

    def memory_line(self) -> Line | None:
        return fit_line(self.memory)

    def unchecked_sizes(self, sizes) -> bool:
        """Whether a run in chunks of `sizes` needs a check although the method was verified before.

        A repeat method evaluates `f` on a batch of copies, so an `f` that is not batch-aware (it rolls,
        reduces or normalizes over its first dimension) computes a chunk-size-dependent wrong Jacobian,
        and one chunk size can pass by coincidence: a roll over a 64-element input through 64 copies
        gives the right Jacobian, through 16 a wrong one. So each chunk size is checked once."""
        return self.method.vectorize == "repeat" and not set(sizes) <= self.checked_sizes

    @property
    def extra(self) -> float:
        """Seconds a call of this method costs beyond its run: checks on new captured values, at the share of
        the plan's recent calls that needed one (NOTE: [A repeat plan on changing values]); before any check
        was timed, at its estimate (NOTE: [New values before a repeat method runs])."""
        checks = self.checks
        seconds = None if checks is None else (checks.seconds if checks.seconds is not None else checks.estimate)
        if seconds is None:
            return 0.0
        if not checks.confirmed:  # every call is checked (NOTE: [Batch-aware at every point])
            return seconds
        if not checks.recent:
            return 0.0
        return seconds * sum(checks.recent) / len(checks.recent)

    @property
    def cost(self) -> float | None:
        """The fastest run plus `extra`: what the plan compares."""
        return None if self.best is None else self.best + self.extra

    def note_values(self, checked: bool, seconds: float | None) -> None:
        if self.checks is None:
            return
        self.checks.recent.append(checked)
        del self.checks.recent[:-RUNS_KEPT]
        if seconds is not None:
            self.checks.seconds = seconds if self.checks.seconds is None else min(self.checks.seconds, seconds)

    def add_run(self, seconds: float) -> bool:
        """Keep a whole call's time; True if it lowered the fastest by over 10% (predictions from it are stale)."""
        before = self.best
        self.runs.append(seconds)
        if len(self.runs) > RUNS_KEPT:
            del self.runs[0]
        return before is None or seconds < 0.9 * before


class PlanEntry:
    """The mutable side of a plan (see the module docstring)."""

    def __init__(self, problem: Problem, options: Options, budget_bytes: int | None, fixed_bytes: int,
                 facts: Facts, candidates: list[MethodId], once_only: bool, tangent_copy_bytes: int = 0,
                 once_why: str = "`f` draws random numbers") -> None:
        self.problem = problem
        self.options = options
        self.budget_bytes = budget_bytes
        self.fixed_bytes = fixed_bytes
        """Bytes every call holds besides the chunks: the result, the workspace reserve, the forward pass."""
        self.facts = facts
        self.once_only = once_only
        checks = ValueChecks()
        self.stats: dict[str, MethodStats] = {
            m.name: MethodStats(m, checks=checks if m.vectorize == "repeat" else None) for m in candidates}
        if once_only:
            for s in self.stats.values():
                if not s.method.evaluates_once:
                    s.status, s.excluded = "not tried", f"{once_why}, and this method evaluates it more than once"
                    s.reason = s.excluded
        self.tangent_copy_bytes = tangent_copy_bytes
        """The largest tensor `f` holds: forward-mode AD may copy it whole as a zero tangent (see `fixed_prior`)."""
        self.new_size_reserve = untracked_reserve(problem.inputs.device)
        """Kept back by a chunk larger than any measured (NOTE: [A larger chunk meets new workspaces]): the CPU
        reserve, lowered by `first_call` to the largest operand it knows when that is smaller."""
        room = self.room_bytes()
        if room is not None and options.mode == "auto" and MEMORY_SAFETY * tangent_copy_bytes > room:
            for s in self.stats.values():
                if s.method.mode == "forward" and not s.excluded:
                    s.status, s.excluded = "not tried", (
                        f"its products would copy a {format_bytes(tangent_copy_bytes)} tensor `f` holds as a zero "
                        f"tangent, more than the budget leaves ({format_bytes(room)})")
                    s.reason = s.excluded
        layout = problem.layout
        if room is not None and layout is not None and layout.output != "dense":
            # A sparse result's bytes count the smaller side's stacked products (NOTE: [Structure first when only
            # a sparse result fits]); a side whose products would take more than the budget leaves is not run.
            counted = layout.products_bytes(problem)
            for s in self.stats.values():
                extra = layout.products_bytes(problem, s.method.by_rows) - counted
                if extra > room and not s.excluded:
                    s.status, s.excluded = "not tried", (
                        f"its colours' products would take {format_bytes(extra)} more than the budget leaves "
                        f"({format_bytes(room)})")
                    s.reason = s.excluded
        self.incumbent: str | None = None
        self.credit = 0.0
        self.batch_aware_checked = False
        """Whether `f` passed `check_batch_aware` (before a repeat method's first check in this plan)."""
        self.function_key = None
        """The key part of the function the plan was made for: a `plan=` call on another is checked."""
        self.copies_values = None
        """The tensors `f` held when a trace on two copies showed it batch-aware for every input (NOTE: [Batch-aware
        at every point]); None: not shown."""
        self.copies_next = 0.0
        """The exploration credit the next such trace waits for beyond its estimate (math.inf: not again)."""
        self.checks_paid = 0.0
        """Seconds a repeat incumbent's calls spent on checks while it was not shown batch-aware everywhere."""
        self.calls = 0
        self.settled = False
        self.effort = "measure"
        self.warm = True
        """False until the plan's method has run a call of its own after the first (a trial's run does not count)."""
        self.cold_trial = False
        """Whether a trial ran before that (NOTE: [No warm wait behind a looping engine]): one at most."""
        self.needs_reorder = False
        """Priors of the alternatives not worked out yet (a first call leaves it to the next call)."""
        self.structure = ""
        """What was decided about sparsity (found, colours, not looked for, and why)."""
        self.structure_open = False
        """Sparsity "auto", dense, and not looked for yet: a later call looks when the credit covers a trace."""
        self.bounds_pending = False
        """Structure open and its bounds not read yet: the next exploring call reads them off its Jacobian (NOTE:
        [Structure bounds on the second call])."""
        self.structure_share: float | None = None
        """Where the first call's Jacobian looked sparse enough for a colouring to save most passes: the least
        share of the dense passes its sampled rows and columns allow; the look comes before any trial (NOTE:
        [Structure before trials])."""
        self.values_first = None
        """The tensors `f` held on the call whose Jacobian made a plan promising (NOTE: [Structure before trials])."""
        self.layout_found = None
        """(layout, note): a pattern a later call found that pays; the next call makes the plan again with it."""
        self.dense_plan: PlanEntry | None = None
        """The dense plan a pattern found by a later call replaced, kept until this plan's time is weighed
        against it (NOTE: [A found pattern measured against the dense plan])."""
        self.reverify = False
        """Verify every call (a sparsity pattern valid at the first call's point only)."""
        self.confirm_trace = False
        """A first call's real-trace pattern awaits a fake trace's confirmation (NOTE: [A real trace first])."""
        self.pattern_reads_captured = True
        """Whether the plan's pattern may depend on the values of tensors `f` holds: False once a trace on fake
        tensors that read none of them found it or confirmed it (NOTE: [A pattern that read no captured values])."""
        self.values_seen = None
        """The tensors a sparsity pattern was last checked with (see NOTE: [Patterns and values])."""
        self.values_last = None
        """The tensors `f` held on the plan's latest call, while a repeat method waits untried behind another
        incumbent (NOTE: [New values before a repeat method runs]); None: not watched."""
        self.follows_values = False
        """The pattern changed with the tensors `f` holds: a call on new ones plans again first (NOTE: [A pattern
        found again])."""
        self.events: collections.deque[str] = collections.deque(maxlen=12)
        self.lock = threading.RLock()

    # --- reading ---------------------------------------------------------------------------------

    def chosen(self) -> MethodStats:
        assert self.incumbent is not None
        return self.stats[self.incumbent]

    def fixed_prior(self, m: MethodId) -> int:
        """Bytes a method holds whatever its chunk size, known before it runs: forward-mode AD's copy of the
        largest tensor `f` holds (see NOTE: [Copies inside matrix kernels]); 0 for the other modes."""
        return self.tangent_copy_bytes if m.mode == "forward" else 0

    def room_bytes(self) -> float | None:
        """What the budget leaves to one chunk, or None if there is no budget to keep."""
        if self.budget_bytes is None:
            return None
        return max(self.budget_bytes - self.fixed_bytes, 0)

    def chunk_size(self, name: str) -> int:
        """The chunk size `name` runs at: its own, or the whole basis."""
        s = self.stats[name]
        n = s.method.passes(self.problem.col_passes, self.problem.row_passes)
        if self.options.chunk_size is not None:
            return balanced(n, min(self.options.chunk_size, max(n, 1)))
        return s.chunk_size or max(n, 1)

    def estimated_peak(self, name: str) -> int | None:
        line = self.stats[name].memory_line()
        if line is None:
            return None
        return int(self.fixed_bytes + line.at(self.chunk_size(name)))

    # --- learning --------------------------------------------------------------------------------

    def reorder(self) -> None:
        """Priors and prune reasons for every untried method, from the incumbent's time so far."""
        self.needs_reorder = False
        inc = self.chosen()
        if inc.best is None:
            return
        order = choose.exploration_order([s.method for s in self.stats.values()], inc.method, inc.best, self.facts)
        for m, prior, why in order:
            s = self.stats[m.name]
            if s.status in ("untried", "not tried") and not s.excluded:
                s.prior = prior
                s.status, s.reason = ("not tried", why) if why else ("untried", "")

    def next_trial(self) -> choose.Trial | None:
        """The next alternative to try on this call, if the credit covers its first slice."""
        if self.settled or self.incumbent is None:
            return None
        if self.needs_reorder:
            self.reorder()
        inc = self.chosen()
        if not inc.runs:
            return None  # not run yet (NOTE: [Torch's loop for a first call of a few rows]): it runs first
        if not self.warm and (self.cold_trial or not self.loops_slow_incumbent()):
            return None  # its only run was a first call's (cold caches, first vmap of f): wait for a warm one
        trial = self._next_trial(inc)
        if trial is not None and not self.warm:
            self.cold_trial = True  # one trial before the incumbent's warm run (NOTE: [No warm wait ...])
        return trial

    def _next_trial(self, inc: MethodStats) -> choose.Trial | None:
        waiting = [s for s in self.stats.values() if s.status == "untried"]
        inc_cost = inc.cost  # read once: `cost` takes the fastest of the kept runs and the checks' share
        close = [s for s in self.stats.values()
                 if s.status == "measured" and s.runs and s.method.name != self.incumbent
                 and s.cost < choose.CONFIRM_WITHIN * inc_cost]
        confirm = [s for s in close if len(s.runs) < choose.CONFIRM_RUNS]
        if not confirm and not waiting:
            # Runs for a contender still warming up come after every untried method's trial: taken first, they
            # held a per-sample CNN (B=4096) on the autograd engine's 1.37 s past call 10, where its
            # reverse/loop, tried next, takes 0.37 s.
            confirm = [s for s in close if s.warming and len(s.runs) < choose.CONFIRM_MAX_RUNS]
        if confirm:  # a close contender gets more whole runs (noise and warm-up only add time: keep the fastest)
            s = confirm[0]
            n = s.method.passes(self.problem.col_passes, self.problem.row_passes)
            # What the second run is expected to cost beyond an incumbent call: a sliced first run counts its
            # chunks' fixed costs once per chunk (RK4 rollout, repeat trick: 30.2 ms in chunks of 8 and 8,
            # 10.8 ms in one chunk of 16, against 23.8 ms for the incumbent).
            # Expected no slower than the incumbent's call, it runs on the next call whatever the credit (a trial
            # just charged may have left it in debt for many calls: the RK4 rollout's repeat trick, 8.2 against
            # 12.0 ms once confirmed, waited from call 3 to call 12 and the plan after 10 calls was 1.6x slower).
            expected = s.best * s.sliced_share + s.extra - inc.best  # with a repeat method's checks
            if expected <= 0.0 or self.credit >= expected:
                return choose.Trial(s.method, n)
            return None
        if not waiting:
            # A slice's projection can overstate a batched method many times (a few vectors are mostly fixed
            # cost): one stopped within RETRY_PROJECTED of the incumbent gets one whole run, once the credit
            # covers what that run would cost beyond an incumbent call by the projection.
            retry = [s for s in self.stats.values() if s.status == "slower" and s.stopped_on_slice and not s.retried
                     and s.prior is not None and s.prior + s.extra < choose.RETRY_PROJECTED * inc_cost]
            if retry:
                s = min(retry, key=lambda s: s.prior)
                if self.credit >= s.prior + s.extra - inc_cost:
                    s.retried = True
                    return choose.Trial(s.method, s.method.passes(self.problem.col_passes, self.problem.row_passes))
                return None
            if self.structure_open or self.confirm_trace or not self.warm or self.copies_pending():
                # not settled before structure is looked for, a pattern confirmed, the incumbent timed warm, or a
                # repeat method that would win shown batch-aware everywhere (NOTE: [Batch-aware at every point])
                return None
            self.settled = True
            self.events.append(f"settled after {self.calls} calls")
            return None
        # With the checks a repeat method would pay on new captured values (NOTE: [New values before a repeat
        # method runs]).
        waiting.sort(key=lambda s: s.prior + s.extra if s.prior is not None else math.inf)
        s = waiting[0]
        # Predicted faster than the incumbent, a whole run of the incumbent's mode pays some of that back on this
        # call (NOTE: [No warm wait behind a looping engine]: an alternative at half a looping incumbent's time).
        saving = max(inc.best - s.prior, 0.0) if s.prior is not None and s.method.by_rows == inc.method.by_rows else 0.0
        slice_vectors = choose.slice_for(s.method, inc.method, inc.best, self.facts, self.credit, self.trial_fixed(s),
                                         saving)
        return choose.Trial(s.method, slice_vectors) if slice_vectors else None

    # NOTE: [What a trial costs before its first vector]
    # A trial's slice was priced as its vectors' share of the incumbent's time plus one evaluation of `f`. On
    # small problems that is a fraction of what trials took: over the first 20 calls of the suite's sub-2 ms
    # problems (a warm process, peers run before), first trials cost 1.4x to 5.6x an incumbent call beyond it
    # (a torch.func slice of 2 rows on a 3 -> 3 map 1.16-1.6 ms against 0.29 ms; the repeat trick on a gated layer
    # of two inputs (128 each) 2.75-3.1 ms against 1.2 ms; forward mode on the robot arm 1.85 ms against 0.67 ms), on
    # credits of 0.24-1.3 ms: the credit went 1.2-5 ms into debt, and exploration took 20-60% of those 20 calls
    # against the documented 10%. What a slice did not count: its first run's check (reference products on its
    # own graph, or an evaluation and a VJP of their own), a repeat method's check on two different rows or on
    # new captured values, and the trial's own machinery (TRIAL_FIXED_SECONDS: set-up, the slice's projection,
    # the incumbent taking over). A trial now starts once the credit covers those too; it is still charged what
    # it took. A whole run of the incumbent's mode predicted faster than it counts what it is predicted to save on
    # that call against those costs; a slice does not (a small slice of a batched method is mostly fixed cost).
    def trial_fixed(self, s: MethodStats) -> float:
        """What a trial of `s` is expected to cost before its first vector (NOTE: [What a trial costs before its
        first vector])."""
        eval_seconds = self.facts.eval_seconds or 0.0
        vjp_seconds = self.facts.vjp_seconds or 0.0
        fixed = choose.TRIAL_FIXED_SECONDS + eval_seconds  # on a later call, the alternative evaluates `f` itself
        if not s.verified:  # its first run is checked: reference products on its own graph, or on a fresh one
            fixed += vjp_seconds + (0.0 if s.method.on_plain_graph else eval_seconds)
        if s.method.vectorize == "repeat":
            # The check on new captured values (at its share of calls), and before a plan's first repeat run `f`
            # on two different rows.
            fixed += s.extra + (0.0 if self.batch_aware_checked else eval_seconds + vjp_seconds)
        return fixed

    def loops_slow_incumbent(self) -> bool:
        """Whether the incumbent is torch.autograd's vmap and the first call counted it looping over ops (NOTE: [No
        warm wait behind a looping engine])."""
        m = self.chosen().method
        return bool(self.facts.autograd_loops) and (m.vectorize, m.engine) == ("vmap", "autograd")

    def repeat_waiting(self) -> MethodStats | None:
        """A repeat method that may still run while a method of another kind is the incumbent of this dense,
        exploring plan (NOTE: [New values before a repeat method runs]), or None."""
        if self.settled or self.incumbent is None or self.problem.layout is not None \
                or self.chosen().method.vectorize == "repeat":
            return None
        return next((s for s in self.stats.values()
                     if s.checks is not None and not s.excluded and s.status != "failed"), None)

    def value_checks(self) -> ValueChecks | None:
        """The record of checks shared by the plan's repeat methods, if it has any."""
        return next((s.checks for s in self.stats.values() if s.checks is not None), None)

    def batch_aware_at(self, values) -> bool:
        """Whether `f` was shown batch-aware for every input at these values (NOTE: [Batch-aware at every point]);
        the repeat methods' price follows."""
        confirmed = self.copies_values is not None and values == self.copies_values
        checks = self.value_checks()
        if checks is not None:
            checks.confirmed = confirmed
        return confirmed

    def repeat_contender(self) -> MethodStats | None:
        """A repeat method worth showing batch-aware everywhere: the incumbent, or a measured one whose runs,
        without the checks it pays until then, beat the incumbent by a switch's margin."""
        if self.incumbent is None:
            return None
        inc = self.chosen()
        if inc.method.vectorize == "repeat":
            return inc if inc.status != "failed" else None
        inc_cost = inc.cost
        if inc_cost is None:
            return None
        return next((s for s in self.stats.values()
                     if s.checks is not None and not s.excluded and s.status == "measured" and s.runs
                     and s.best < choose.SWITCH_BELOW * inc_cost), None)

    def copies_pending(self) -> bool:
        """Whether a trace on two copies is still to come (NOTE: [Batch-aware at every point])."""
        return (self.copies_values is None and self.copies_next != math.inf and self.batch_aware_checked
                and self.repeat_contender() is not None)

    def record_call(self, seconds: float) -> None:
        """Count a call; while exploring, earn EXPLORE_SHARE of a call's worth of credit.

        A call is worth the incumbent's fastest whole call once there is one, not this call's own time: a
        trial call runs slower than the incumbent, and earning a share of its time paid for the next trial
        (exploration cost 20-54% of calls 2..N on sub-millisecond problems, against the documented 10%).
        """
        self.calls += 1
        if not self.settled:
            # With the checks a repeat incumbent pays on new captured values (NOTE: [A repeat plan on changing
            # values]): they are part of what its calls cost.
            cost = self.chosen().cost if self.incumbent is not None else None
            self.credit += choose.EXPLORE_SHARE * (cost if cost is not None else seconds)

    def consider_switch(self) -> None:
        """Make the fastest measured method the incumbent (by its fastest whole call)."""
        inc = self.chosen()
        best = min((s for s in self.stats.values() if s.status in ("measured", "chosen") and s.best is not None),
                   key=lambda s: s.cost, default=None)
        # Against an incumbent with no warm run yet, only by a clear margin (NOTE: [No warm wait behind a looping
        # engine]); so too against one measured once, a trial's run that made it the incumbent: one sample,
        # cold for torch.func (its first calls on a function are its slowest), against the fastest of the other's
        # several (a dense tanh(W x): forward/vmap, 7.2 ms warm, took the plan back from forward-trick/vmap [func],
        # 5.7 ms warm, with a run of 5.84 ms, its best of three, against the other's one run of 6.31 ms).
        # On the torch.func engine, until it has CONFIRM_RUNS runs (it warms up over its first few calls on a
        # function): a grid residual's torch.func incumbent ran its first two calls in 2.12 and 3.24 ms, then
        # 1.0-1.4 ms, and its repeat trick (0.87 ms, plus 0.62 ms of checks a call until shown batch-aware) took
        # the plan at 0.97x of 2.12 ms and held it past call 10.
        warm = self.warm and len(inc.runs) > (choose.CONFIRM_RUNS - 1 if inc.method.engine == "func" else 1)
        below = choose.SWITCH_BELOW if warm else choose.SWITCH_BELOW_COLD
        if best is not None and inc.best is not None and best is not inc and best.cost < below * inc.cost:
            checks = (f" + {seconds_text(inc.extra)} of checks a call on new captured values" if inc.extra else "")
            self.events.append(f"switched from {inc.method.name} ({seconds_text(inc.best)}{checks}) to "
                               f"{best.method.name} ({seconds_text(best.cost)})")
            inc.status = "measured"
            best.status = "chosen"
            self.incumbent = best.method.name
            self.reorder()

    # --- showing ---------------------------------------------------------------------------------

    def snapshot(self) -> Plan:
        with self.lock:
            if self.needs_reorder:
                self.reorder()
            inc = self.chosen()
            n = inc.method.passes(self.problem.col_passes, self.problem.row_passes)
            chunk = self.chunk_size(inc.method.name)
            candidates = tuple(
                Candidate(s.method.name, s.status, s.best, s.prior, len(s.runs),
                          self.chunk_size(s.method.name) if s.runs else None,
                          self.estimated_peak(s.method.name), s.reason)
                for s in self.stats.values()
            )
            return Plan(
                mode=inc.method.mode, vectorize=inc.method.vectorize, engine=inc.method.engine,
                chunk_size=chunk, n_chunks=n_chunks(n, chunk), estimated_seconds=inc.best,
                estimated_peak_bytes=self.estimated_peak(inc.method.name), budget_bytes=self.budget_bytes,
                candidates=candidates, settled=self.settled, reason=self._reason(), problem=self.problem,
                calls=self.calls, entry=self,
            )

    def _reason(self) -> str:
        inc = self.chosen()
        measured = [s for s in self.stats.values() if s.runs]
        if self.effort == "estimate":
            return "Chosen by the rules alone (effort='estimate'): nothing was measured."
        if self.settled:
            text = f"Settled after {self.calls} call(s): the fastest of {len(measured)} measured method(s)"
        else:
            waiting = [s.method.name for s in self.stats.values() if s.status == "untried"]
            pending = "a second run of a close contender, or a whole run of one stopped on its slice"
            text = (f"Still exploring after {self.calls} call(s): the fastest so far of {len(measured)} measured; "
                    f"to try: {', '.join(waiting) if waiting else pending}")
        if self.budget_bytes is not None and inc.chunk_size is not None and inc.chunk_size < inc.method.passes(
                self.problem.col_passes, self.problem.row_passes):
            text += "; its chunk size is the largest whose measured peak fits the budget"
        if self.structure:
            text += f". Structure: {self.structure}"
        if self.events:
            text += ". History: " + "; ".join(self.events)
        return text + "."


# NOTE: [No warm wait behind a looping engine]
# A plan's first call is a cold run (caches, the first vmap of `f`), so trials wait for the incumbent's first warm
# call before they are compared with it. Where the first call counted torch.autograd's vmap looping over ops (NOTE:
# [The autograd engine's vmap loops]; most backward formulas loop there, a tanh's among them), the alternatives
# (the torch.func engine, the repeat trick) are predicted at half its time, and the second call may try one: one
# trial only, then the incumbent's warm run, and no plan settles before that run. A robot arm (48 rows, `cumsum`
# and `flip` looped) ran its second call on the autograd engine at 1.5-2 ms and tried the torch.func engine
# (0.5 ms warm) only on the third. Measured on the 2-core CPU, old and new code in alternating processes, 3
# rounds: 20-step closure loops robot_arm large 2.37-2.47x -> 1.91-2.00x of jacrev's loop, small 2.04-2.30x ->
# 1.59-1.97x; ten calls of one function robot_arm large 8.7-9.9 -> 7.8-8.0 ms, transformer small 64-79 -> 51-55
# ms; classifier, tiny, decoder and the RK4 rollout the same within noise, with the same plans.
# Compared with that cold first call, an alternative looks faster than it is (a repeat trick 5-10% slower than
# the autograd engine, frozen, replaced it on a small per-sample MLP): a trial replaces an incumbent with no warm
# run only when it is over 20% faster (SWITCH_BELOW_COLD).
