"""A plan's later calls: the incumbent on the whole basis (its fallbacks on failure), the trials that explore the
alternatives on real work, a later look for structure, the checks that follow changing values, calls of a fixed
plan (`plan=`), and `tune`'s exhaustive search."""

from __future__ import annotations

import math
import time

from .._core.problem import Problem
from .._execute.run import FixedChunks, RunLog
from .._execute.sparse import AT_ONE_POINT
from .._execute import verify
from .._execute.verify import VerificationError, blocks_of, check_columns
from .._measure.device import untracked_reserve
from .._methods.base import PlainGraph, grad_mode
from . import choose
from .choose import MethodId
from .cost_model import n_chunks
from .._core.errors import UnsupportedFunctionError
from .._core.once import create_graph_once_error, custom_functions, unsafe_under_create_graph
from .entry import RUNS_KEPT, PlanEntry
from .first_call import _find_layout
from .plan import seconds_text
from .session import (MEASURE_WHEN_PRIOR_ABOVE, PRIOR_FACTOR, PROGRESS_AFTER_SECONDS, Call, NeedsTangents, OutputsChanged,
                      PatternFailed, Progress, _batch_aware_once, _check_outputs_unchanged, _learn, logger, _no_method,
                      _planned_chunk, _record_failure, _sync, _trimming)
from .sizing import Sizer
from .structure import (DETECT_LIMIT, LOOK_PAYBACK_CALLS, LOOK_WAIT_CALLS, confirm_real_trace, copies_independent,
                        promising_share, sampled_bounds, too_dense_to_pay, trace_estimate)


# NOTE: [A pattern you gave is confirmed]
# A pattern you give was checked on the first call only, then trusted: a diagonal pattern for an `f` whose first
# columns are dense but vanished at the first call's point gave 20-28 wrong Jacobians in 37 later calls (an
# adversarial test; with `output="csr"` or `mode="forward"`, all 37). So it is checked on every call until the
# plan's second call traces `f` on fake tensors and finds every dependency within it (then it holds for every
# input of these shapes, as a pattern autojac found does); a trace that fails, runs out of its allowance or
# reaches beyond the pattern leaves every call checked, and a check that fails makes the plan dense.


def _confirm_pattern(call: Call, entry: PlanEntry) -> None:
    """Trace `f` on fake tensors to confirm a first call's real-trace pattern (NOTE: [A real trace first]) or a
    pattern you gave (NOTE: [A pattern you gave is confirmed])."""
    began = time.perf_counter()
    pattern = entry.problem.layout.pattern
    xs = tuple(x.detach() for x in call.xs)
    allowed = max(entry.credit, DETECT_LIMIT * (entry.chosen().best or 0.0))
    why, reads_captured = call.f.isolated(lambda raw: confirm_real_trace(raw, xs, pattern, allowed))
    with entry.lock:
        entry.credit -= time.perf_counter() - began
        if not why:
            entry.reverify = False
            entry.pattern_reads_captured = reads_captured  # the fake pattern within it holds for any it did not read
            entry.structure = entry.structure.replace(
                AT_ONE_POINT, f"; found on a real trace, confirmed on fake tensors on call {entry.calls + 1}")
            entry.events.append(f"pattern confirmed on fake tensors on call {entry.calls + 1}: valid for every input "
                                "of these shapes, calls are no longer checked")
        else:
            entry.events.append(f"pattern not confirmed on call {entry.calls + 1} ({why}): every call is checked")


def _relearn_memory(call: Call, entry: PlanEntry, stats, timed: bool, chunk_size: int | None) -> bool:
    """Whether this call measures the plan's chunks again (see NOTE: [Memory learned again in a warm process]):
    a plan still learning (`timed`), whose chunks the budget holds below the whole basis, with no chunk size
    given by the user or the call."""
    return (timed and stats.chunk_size is not None and chunk_size is None and entry.options.chunk_size is None
            and entry.room_bytes() is not None and call.meter.kind != "none")


# --- later calls ----------------------------------------------------------------------------------

# NOTE: [Patterns and values]
# A sparsity pattern is found for the values `f` holds: a captured index tensor decides where a
# gather reads, a weight's zeros which products vanish. Plans are keyed by shapes, so a closure
# rebuilt with a new permutation every step hits the same plan, and its pattern would put every
# product in the wrong place. So a structured plan remembers the tensors it was checked with (by
# identity and version counter: `Evaluator.value_sources`); a call on other tensors, or on the same
# ones written since, is checked whatever its method, and a pattern that fails there is found again for
# the new values (NOTE: [A pattern found again]; a pattern the caller gave makes the plan dense).


def _values_changed(call: Call, entry: PlanEntry, name: str | None = None) -> None:
    """A call on values other than those the plan was checked on is checked, if the plan's answer depends on
    them beyond what autograd sees: a sparsity pattern (NOTE: [Patterns and values]), or a repeat method
    (whether `f` is batch-aware can depend on a captured weight: `m * y.roll(1, 0)` is, at m = 0): the
    incumbent, or `name`, the method this call runs instead (a `plan=` made when another was the incumbent,
    a trial)."""
    repeat = ((entry.incumbent is not None and entry.chosen().method.vectorize == "repeat")
              or (name is not None and entry.stats[name].method.vectorize == "repeat"))
    if entry.problem.layout is None and not repeat:
        return
    now = call.f.value_sources()
    if now != entry.values_seen and (repeat or not _pattern_holds_for(entry, now)):
        if entry.follows_values and entry.problem.layout is not None:
            raise PatternFailed(None, entry.problem.layout)  # NOTE: [A pattern found again]
        # The call's Jacobian is checked (one plain evaluation and one VJP); the rows check is not made again:
        # it guards against a point where the Jacobian vanishes, and a closure rebuilt every step with a new
        # target would pay its three evaluations every step.
        call.must_verify, call.values_now = True, now
    if repeat:  # NOTE: [Batch-aware at every point]
        with entry.lock:
            everywhere = entry.batch_aware_at(now)
        if not everywhere:
            call.must_verify, call.values_now = True, now


def _pattern_holds_for(entry: PlanEntry, now) -> bool:
    """Whether the plan's pattern holds for the values `now` without a check: found on fake tensors reading no
    value of a tensor `f` holds, with the same numbers and strings (NOTE: [A pattern that read no captured
    values]). A pattern checked on every call (`reverify`) is one that reads them."""
    seen = entry.values_seen
    return not entry.pattern_reads_captured and seen is not None and now.plain == seen.plain


# NOTE: [A pattern that read no captured values]
# A pattern found by a trace on fake tensors holds for every input of these shapes; what it can depend on
# besides is what its rules read: the values of tensors `f` holds (a captured index decides where a gather
# reads, a weight's zeros which products vanish: NOTE: [Patterns and values]) and the numbers and strings it
# holds (a shift, a flag). The replay marks the first: a rule that reads a captured tensor's value (a zero
# count, a constant folded through an op, a position map of an index) loads it, and loading is marked. A
# pattern whose trace loaded none holds for any tensors of the same shapes (and so does a first call's
# real-trace pattern that such a fake trace confirmed: it holds the fake one), so a call that changes only those
# (a residual `f(x) - target` rebuilt around each step's target) is not checked for the pattern: the grid
# residual's structured plan took 1.41 ms a call with a new target against 0.88 ms without (2-core CPU), its
# check, a plain evaluation and a VJP, more than half its call. Numbers and strings that changed still bring
# a check, as does any change for a repeat method (its batch-awareness is a question of values).


# NOTE: [A repeat plan on changing values]
# A repeat plan checks every call made on new captured values (above). A closure rebuilt every step around a
# new target changes them on every call, so such a plan pays a plain evaluation and a VJP per call beside
# its run: the grid residual's closure loop took 52.8 ms for 20 steps on the repeat trick, 34.0 ms on vmap,
# which needs no such check. So a repeat method's time is its fastest run plus its checks' time times the
# share of its recent calls that needed one, and the plan's method is the fastest by that measure.

# NOTE: [New values before a repeat method runs]
# Whether calls bring new captured values was learnt only from a repeat incumbent's own checks, so a repeat
# method waiting untried behind a vmap incumbent was priced as if it would pay none, and went first: a robot
# arm's closure loop (a new lambda around a new target each step; torch.autograd's vmap loops there, and both
# the repeat trick and the torch.func engine avoid the loops) tried the repeat trick first (its batch-aware
# check and run, then a check every call) before the torch.func engine that became the plan's method. So while
# a dense plan explores (calls without `plan=`) behind an incumbent that is not a repeat method, each call
# notes whether the tensors `f` holds changed since the call before (the first call's are kept for the second;
# an optimizer's in-place step is a change, as it is for a repeat incumbent), and a check not yet timed is
# priced at the first call's plain evaluation plus VJP, lowered to the incumbent's fastest call (which holds
# an evaluation and at least one product) so that a cold first call cannot price a repeat method out for good:
# the repeat method's place in the trial order, its trial's projection and the switch then count the checks it
# would pay. A loop over one function on unchanged values prices none, as before. Watching stops for good once
# a repeat method is the plan's method (its own checks are noted from then on) or the plan settles. Reading the
# values costs 20-40 us a call (a robot arm's 0.8 ms calls), and plans that do not settle kept paying it: after
# the RUNS_KEPT calls the share is taken over, every WATCH_EVERY-th call looks (a change since the last look
# counts as one call that brought new values), enough to follow a caller's pattern for pricing, which never
# touches correctness (a repeat incumbent checks its own calls).

WATCH_EVERY = 8


def _watch_values(call: Call, entry: PlanEntry) -> None:
    """NOTE: [New values before a repeat method runs]: whether this call brings new captured values."""
    if entry.values_last is None:
        return
    with entry.lock:
        waiting = entry.repeat_waiting()
        if waiting is None:
            entry.values_last = None
            return
        if entry.calls > RUNS_KEPT and entry.calls % WATCH_EVERY:  # the plan's calls so far, this one not counted
            return
    now = call.f.value_sources()
    with entry.lock:
        if entry.values_last is None:  # another thread's call stopped watching meanwhile
            return
        changed = now != entry.values_last
        entry.values_last = now
        waiting.note_values(changed, None)
        best = entry.chosen().best
        if waiting.checks.estimate is not None and best is not None:
            waiting.checks.estimate = min(waiting.checks.estimate, best)  # warm: the first call's was cold


def _values_checked(call: Call, entry: PlanEntry) -> None:
    if call.must_verify and call.verified:
        with entry.lock:
            entry.values_seen = call.values_now


def _confirm_copies(call: Call, entry: PlanEntry, allowed: float) -> None:
    """Trace `f` on fake tensors holding two copies of its inputs (NOTE: [Batch-aware at every point]): if each
    copy's outputs depend on that copy's inputs only, repeat calls on these values are no longer checked."""
    began = time.perf_counter()
    now = call.f.value_sources()
    xs = tuple(x.detach() for x in call.xs)
    why = call.f.isolated(lambda raw: copies_independent(raw, xs, entry.problem, allowed))
    with entry.lock:
        spent = time.perf_counter() - began
        entry.credit -= spent
        if not why:
            entry.copies_values, entry.copies_next = now, math.inf
            checks = entry.value_checks()
            if checks is not None:
                checks.recent.clear()  # those calls were checked for want of this trace, not for new values
            entry.batch_aware_at(now)
            entry.events.append(f"call {entry.calls + 1}: a trace on two copies showed `f` batch-aware for every "
                                f"input of these shapes ({seconds_text(spent)}); repeat calls on these values are "
                                "no longer checked")
            entry.consider_switch()
        else:
            # Out of time: again once the credit holds twice as much; otherwise not again (the checks stay).
            entry.copies_next = 2.0 * allowed if why.startswith("the trace ran past") else math.inf
            entry.events.append(f"call {entry.calls + 1}: not shown batch-aware for every input ({why}); each "
                                "call of a repeat method is checked")
    logger.debug(entry.events[-1])


def later_call(call: Call, entry: PlanEntry, explore: bool = True, credit: float | None = None) -> object:
    """Run a plan: its incumbent, or (while exploring, credit permitting) a trial of the next alternative."""
    began = time.perf_counter()
    call.tangent_checks = entry.problem.tangent_checks  # for the words of an error (NOTE: [Checks by tangents])
    _values_changed(call, entry)
    if explore:
        _watch_values(call, entry)
    timed = not entry.settled or entry.chosen().best is None
    with entry.lock:
        if credit is not None:
            entry.credit = max(entry.credit, credit)
        estimate = _trace_estimate(entry)
        look = (explore and entry.structure_open and not entry.bounds_pending
                and _look_allowance(entry) >= estimate)
        if look and entry.credit < estimate and call.f.value_sources() != entry.values_first:
            # NOTE: [Structure before trials]: a pattern would be checked on every call of a closure rebuilt
            # around new tensors, so what the bound says a look saves is not there to borrow against.
            look, entry.structure_share, entry.values_first = False, None, None
            entry.events.append(f"call {entry.calls + 1}: the tensors `f` holds changed since its Jacobian was "
                                "read for structure; "
                                "the look for structure waits for the credit like any trial")
        if look:
            entry.structure_open = False  # one look per plan
            entry.values_first = None  # needed no more (it may hold copies of small index tensors)
        # On the plan's second call, credit or not: until then every call pays a check (NOTE: [A real trace first]).
        confirm = explore and not look and entry.confirm_trace
        if confirm:
            entry.confirm_trace = False  # one confirmation per plan
        # NOTE: [Batch-aware at every point]: from the credit, or once a repeat incumbent's checks cost as much.
        copies = (explore and not look and not confirm and entry.copies_pending()
                  and max(entry.credit, entry.checks_paid) >= max(estimate, entry.copies_next))
        if copies:
            allowed = max(entry.credit, entry.checks_paid, DETECT_LIMIT * (entry.chosen().best or 0.0))
            entry.checks_paid = 0.0
        # NOTE: [Structure before trials]: a promising look within reach waits for the credit before any trial
        # spends it.
        wait = entry.structure_open and (entry.bounds_pending or (entry.structure_share is not None
                                                                 and _look_within_reach(entry, estimate)))
        free = explore and not look and not confirm and not copies  # no trace on this call
        bounds = free and entry.bounds_pending
        if bounds:
            entry.bounds_pending = False  # read once, by this call
        trial = entry.next_trial() if free and not wait else None
    if look:
        _look_for_structure(call, entry)
    if confirm:
        _confirm_pattern(call, entry)
    if copies:
        _confirm_copies(call, entry, allowed)
    if trial is not None:
        result = _trial(call, entry, trial)
    else:
        result = _incumbent(call, entry, timed)
    _values_checked(call, entry)
    if timed:
        _sync(call.device)
        seconds = time.perf_counter() - began
    if bounds:
        _read_bounds(call, entry, result)
    if timed:
        with entry.lock:
            entry.record_call(seconds)
            if trial is None and call.method_name == entry.incumbent and call.work_seconds is not None:
                if entry.chosen().add_run(call.work_seconds):
                    entry.needs_reorder = True  # the alternatives' priors were scaled from a slower time
                entry.warm = True
    else:
        with entry.lock:
            entry.calls += 1
    if trial is None and call.method_name == entry.incumbent and entry.chosen().method.vectorize == "repeat":
        with entry.lock:
            entry.chosen().note_values(call.must_verify, call.recheck_seconds)
            if call.must_verify and call.recheck_seconds is not None and entry.copies_values is None:
                entry.checks_paid += call.recheck_seconds  # NOTE: [Batch-aware at every point]
            if call.must_verify:  # only a check raises the incumbent's cost: NOTE: [A repeat plan on changing values]
                entry.consider_switch()
    return result


# NOTE: [Structure bounds on the second call]
# Whether a dense plan's later look for structure could pay, and whether it comes before the trials (NOTE:
# [Structure before trials]), is read off a dense Jacobian: the most nonzeros in its rows and columns
# (`sampled_bounds`). Only later calls act on it, so the first call does not read it: its second call does, on
# its own result, after its run and outside its timing, charged to the exploration credit. That took 0.1-0.33 ms
# of 1.5-3.1 ms first calls (the suite's small per-sample MLP and grid residual, both tuple_inputs; 2-core CPU).
# Until it is read, no look and no trial is taken: the second call runs the plan.


def _read_bounds(call: Call, entry: PlanEntry, result: object) -> None:
    """Read `sampled_bounds` off this call's Jacobian (NOTE: [Structure bounds on the second call])."""
    began = time.perf_counter()
    problem = entry.problem
    bounds = sampled_bounds(blocks_of(result, problem), problem)
    with entry.lock:
        dense = too_dense_to_pay(bounds, problem)  # a look could not pay: never taken
        if dense:
            entry.structure_open, entry.structure = False, dense
        entry.structure_share = promising_share(bounds, problem)  # NOTE: [Structure before trials]
        if entry.structure_share is not None:
            entry.values_first = call.f.value_sources()
        entry.credit -= time.perf_counter() - began


def _trace_estimate(entry: PlanEntry) -> float:
    return trace_estimate(entry.facts.eval_seconds or 0.0)


def _look_allowance(entry: PlanEntry) -> float:
    """What a look for structure may take now: the credit, and for a promising look (NOTE: [Structure before
    trials]) what the first call's Jacobian says it would save over LOOK_PAYBACK_CALLS calls."""
    best = entry.chosen().best if entry.incumbent is not None else None
    if entry.structure_share is None or not best:
        return entry.credit
    return entry.credit + LOOK_PAYBACK_CALLS * best * (1.0 - entry.structure_share)


def _look_within_reach(entry: PlanEntry, estimate: float) -> bool:
    """Whether a promising look's allowance covers its trace within LOOK_WAIT_CALLS more calls' exploration share
    (NOTE: [Structure before trials]): only then do trials wait for it."""
    cost = entry.chosen().cost if entry.incumbent is not None else None
    per_call = choose.EXPLORE_SHARE * (cost or 0.0)
    return _look_allowance(entry) + LOOK_WAIT_CALLS * per_call >= estimate


def _look_for_structure(call: Call, entry: PlanEntry) -> None:
    """Structure as one more alternative (see NOTE: [When structure is worth finding]): a plan whose first
    call did not look for it looks once the exploration credit covers a trace, charged what it took. A
    pattern that pays is kept for the next call, which makes the plan again with it (`first_call`); this
    call runs the plan as it is. Propagation may take what the credit holds (with, for a promising look, what
    it is expected to save: `_look_allowance`), and at least DETECT_LIMIT calls of the plan (the first call's
    limit)."""
    began = time.perf_counter()
    with entry.lock:
        allowed = max(_look_allowance(entry), DETECT_LIMIT * (entry.chosen().best or 0.0))
    layout, note = _find_layout(call, entry.problem, allowed)
    with entry.lock:
        entry.credit -= time.perf_counter() - began
        if layout is not None:
            entry.layout_found = (layout, note)
            entry.events.append(f"structure found on call {entry.calls + 1}: {note}; the next call plans with it")
        else:
            entry.structure = f"looked for on call {entry.calls + 1}: {note}"


# NOTE: [A found pattern measured against the dense plan]
# A pattern a later call finds is adopted because its colours promise fewer passes, priced as the CPU pays
# them: a pass each. A GPU pays a batch of vectorized passes nearly the price of one at small sizes (kernel
# launches, not arithmetic), and a structured run adds seeds and a gather: on an H200 the quick Brusselator (128
# unknowns, 8 colours) ran 5.15 ms structured after its plan's look, against 1.96 ms for the dense plan it
# replaced. So the dense plan is kept beside the structured one, and once the structured plan has settled or run
# STRUCTURE_JUDGED_AFTER calls, the two fastest measured times are weighed: a dense plan faster by the margin
# any switch of method needs (under DENSE_BACK_BELOW of the structured time) is taken back, with the pattern
# and both times in its note; it does not look again. Not for a pattern the first call found: no dense
# Jacobian was measured whole then (a first slice of it was, and judged the look).

STRUCTURE_JUDGED_AFTER = 6
DENSE_BACK_BELOW = choose.SWITCH_BELOW


def judge_structure(entry: PlanEntry) -> PlanEntry | None:
    """The dense plan to go back to, when a structured plan made from a later call's pattern has shown itself
    slower (NOTE: [A found pattern measured against the dense plan]); None to keep the structured plan."""
    dense = entry.dense_plan
    if dense is None:
        return None
    with entry.lock:
        if entry.dense_plan is None or entry.incumbent is None:
            return None
        best = entry.chosen().best
        if best is None or not (entry.settled or entry.calls >= STRUCTURE_JUDGED_AFTER):
            return None
        entry.dense_plan = None  # judged once
        dense_best = dense.chosen().best if dense.incumbent is not None else None
        if dense_best is None or dense_best >= DENSE_BACK_BELOW * best:
            entry.events.append(f"call {entry.calls}: structured {seconds_text(best)} against the dense plan's "
                                f"{seconds_text(dense_best) if dense_best is not None else 'unmeasured time'}: kept")
            return None
        found = entry.structure
    with dense.lock:
        dense.layout_found, dense.structure_open = None, False
        dense.structure = (f"found by a later call ({found}), but the plan made with it ran {seconds_text(best)} "
                           f"against this dense plan's {seconds_text(dense_best)}: dense")
        dense.events.append(f"the structured plan ran {seconds_text(best)} in {entry.calls} calls against "
                            f"{seconds_text(dense_best)}: back to this dense plan")
    logger.debug(dense.events[-1])
    return dense


def fixed_call(call: Call, entry: PlanEntry, name: str, chunk_size: int) -> object:
    """`jacobian(plan=...)`: exactly that method and chunk size, no exploration (fallbacks only on failure)."""
    call.tangent_checks = entry.problem.tangent_checks
    _values_changed(call, entry, name)
    result = _incumbent(call, entry, timed=False, first=name, chunk_size=chunk_size)
    _values_checked(call, entry)
    return result


# NOTE: [A ready plan's call]
# A call of a plan's method that was checked at the chunk sizes it will run, with nothing asked of this call but
# its time (no memory to learn again, no new values to check, no bar, no structure), only prepares the method,
# pushes its chunks, assembles, and (while the plan is not settled) times that. The general attempt below does
# the same among the bookkeeping other calls need (sizers, memory learning, checks, switching incumbents);
# skipping it took 23-77 us off a call of 0.5-1.3 ms (interleaved means, `plan=` calls of the benchmark's
# loss_wrt_weights and per_sample_mlp, 2-core CPU). A ready run that fails is handled as a failed attempt, and
# the other candidates follow as they would.

def _ready_chunk(call: Call, entry: PlanEntry, timed: bool, first: str | None, chunk_size: int | None):
    """(name, chunk size) when this call is a ready plan's call (NOTE: [A ready plan's call]), else None."""
    problem = entry.problem
    if problem.layout is not None or call.must_verify or entry.reverify:
        return None
    name = first or entry.incumbent
    stats = entry.stats[name]
    if ((first is None and stats.status == "failed") or not stats.verified or not stats.runs
            or _relearn_memory(call, entry, stats, timed, chunk_size)
            or call.options.progress or (call.options.progress is None and (stats.best or 0.0) > PROGRESS_AFTER_SECONDS)
            or (stats.method.vectorize == "repeat" and not entry.batch_aware_checked)):
        return None
    k = chunk_size if (first is not None and chunk_size) else entry.chunk_size(name)
    if stats.method.vectorize == "repeat" and stats.unchecked_sizes(
            FixedChunks(k).sizes(stats.method.passes(problem.col_passes, problem.row_passes))):
        return None  # a repeat method's chunk size not checked yet (each is checked once)
    return name, k


def _graph_unsafe(call: Call, m: MethodId, state) -> None:
    """NOTE: [Second derivatives through @once_differentiable]: under create_graph, torch.autograd's batched backward
    and the forward-trick can build a Jacobian whose own derivatives are wrong through custom Functions, which a
    create_graph plan leaves out only where its first call saw one. A later call that meets one (a branch on values
    the first call did not take) fails such a method, on its plain evaluation's graph, and the next one answers;
    one that meets a @once_differentiable Function fails every method (no graph can hold its terms)."""
    if not call.options.create_graph:
        return
    ys, xs = getattr(state, "ys", None), getattr(state, "xs", None)
    if ys is None or xs is None:
        return
    once, custom = custom_functions(ys, xs)
    if once:  # every method's graph misses that backward's terms: refused, as on a first call
        raise create_graph_once_error(call.who, once)
    if custom and unsafe_under_create_graph(m):
        raise UnsupportedFunctionError(
            f"{m.name}: under create_graph=True this call's `f` uses custom autograd.Functions ({', '.join(custom)}), "
            "through which this method can build a Jacobian whose own derivatives are wrong")


def _run_whole(call: Call, m: MethodId, problem: Problem, sizer, timed: bool, progress: Progress | None = None):
    """Run `m` on the whole basis: (assembler, result, log, state). Timed, the run and its assembly are the
    call's `work_seconds` (the method's own time, as its stats keep it)."""
    assembler, log, _, seconds, state = call.run(m, problem, sizer, progress=progress)
    _graph_unsafe(call, m, state)
    if not timed:
        return assembler, assembler.result(), log, state
    result, collecting = call.collect(assembler)
    call.work_seconds = seconds + collecting
    return assembler, result, log, state


# NOTE: [A confirming run]
# A trial's whole run was checked whatever the method had been through: the second and third runs that
# confirm a close contender (CONFIRM_RUNS) paid one more plain evaluation of `f` and a VJP each, which the
# plan's own calls of a verified method do not pay. On a robot arm's closure loop (12 rows, a new target each
# step) those confirming runs of the torch.func engine took 1.5-1.6 ms against its 0.8 ms calls. So a
# trial's run is checked by the rule the plan's calls follow (`_needs_check`): a method not verified on this
# function, a repeat method at a chunk size never checked, a call on new values that a repeat method or a
# pattern depends on, a pattern valid at one point only; never torch's own loop on a dense plan.


def _needs_check(call: Call, entry: PlanEntry, stats, sizes) -> bool:
    """Whether a whole run of `stats.method` in `sizes` chunks is checked (NOTE: [A confirming run])."""
    if stats.method.is_reference and entry.problem.layout is None:
        return False
    return not stats.verified or entry.reverify or call.must_verify or bool(stats.unchecked_sizes(sizes))


def _check_run(call: Call, problem: Problem, name: str, stats, state, assembler, result, sizes) -> None:
    """The safety net on a run's result (a VerificationError if it fails); its chunk sizes are checked then."""
    verify.check(name, assembler.checkable(result), problem,
                 _references(call, problem, stats.method, state))
    call.verified = True
    stats.checked_sizes.update(sizes)


def _after_failure(call: Call, entry: PlanEntry, stats, failure: BaseException, failures: list) -> None:
    """An attempt failed: a pattern's failure is the pattern's; `f`'s own errors propagate if its outputs changed;
    otherwise the method is marked failed and the next attempt follows."""
    if isinstance(failure, VerificationError) and entry.problem.layout is not None:
        raise PatternFailed(failure, entry.problem.layout)  # the pattern, not the method: NOTE: [Patterns and values]
    # f's own errors propagate unchanged if the outputs changed (a new plan is due) ...
    _check_outputs_unchanged(call, entry.problem, failure)
    with entry.lock:
        _record_failure(entry, stats, failure, call, failures)


def _incumbent(call: Call, entry: PlanEntry, timed: bool, first: str | None = None,
               chunk_size: int | None = None) -> object:
    """The incumbent on the whole basis; on failure the other candidates in turn, reverse/loop last."""
    problem = entry.problem
    failures: list[tuple[str, BaseException]] = []
    ready, done = _ready_chunk(call, entry, timed, first, chunk_size), None
    if ready is not None:
        done, k = ready
        stats = entry.stats[done]
        try:
            with grad_mode(call.options.create_graph):
                assembler, result, log, state = _run_whole(call, stats.method, problem,
                                                           FixedChunks(k, trim_between=_trimming(call, entry)), timed)
                sizes = [c.size for c in log.chunks]
                if stats.unchecked_sizes(sizes):  # a repeat method's chunks, halved after running out of memory
                    _check_run(call, problem, done, stats, state, assembler, result, sizes)
        except (OutputsChanged, NeedsTangents):
            raise
        except Exception as exc:  # noqa: BLE001
            failure = exc
        else:
            call.method_name = done
            return result
        _after_failure(call, entry, stats, failure, failures)  # outside the handler: f's own error unchained
    for name in _attempts(entry, first):
        if name == done:
            continue  # the ready run's method, which failed
        stats = entry.stats[name]
        m = stats.method
        n = m.passes(problem.col_passes, problem.row_passes)
        unmeasured = not stats.runs
        relearn = False
        room = entry.room_bytes()
        if unmeasured:  # a plan made by the rules alone, or a fallback never run: measure as a first call would
            prior = PRIOR_FACTOR * (max(problem.in_bytes, problem.out_bytes) + entry.fixed_bytes - problem.result_bytes)
            sizer = Sizer(None if entry.options.chunk_size is None else min(entry.options.chunk_size, max(n, 1)),
                          room_bytes=room, prior_bytes_per_vector=prior, timed=True,
                          reserve_bytes=untracked_reserve(call.device) + entry.fixed_prior(m),
                          measured=(call.meter.kind != "none") and room is not None and n * prior > MEASURE_WHEN_PRIOR_ABOVE * room,
                          minimum=2 if m.vectorize == "vmap" and n >= 2 else 1, trim_between=_trimming(call, entry),
                          new_size_reserve=entry.new_size_reserve)
        elif relearn := _relearn_memory(call, entry, stats, timed, chunk_size):
            # NOTE: [Memory learned again in a warm process]: a first call's chunk peaks include the process's
            # one-time costs (kernels' first-use pages and workspaces), charged to the chunks that met them, so a
            # tight budget's plan is held to chunks smaller than need be. While the plan is still learning, its
            # chunks are measured again from its chunk size up, and what this call measured replaces them.
            # The plan's chunk size was measured within the budget: never below it (a line drawn through the
            # few sizes this call measures can be steeper than the truth).
            sizer = Sizer(None, room_bytes=room, timed=True, measured=True, first=stats.chunk_size,
                          minimum=stats.chunk_size, trim_between=_trimming(call, entry),
                          new_size_reserve=entry.new_size_reserve)
        else:
            sizer = FixedChunks(chunk_size if (name == first and chunk_size) else entry.chunk_size(name),
                                trim_between=_trimming(call, entry))
        progress = None
        if call.options.progress or (call.options.progress is None and (stats.best or 0.0) > PROGRESS_AFTER_SECONDS):
            progress = Progress(call.options.progress, n, name)
            progress.expect(stats.best)
        try:
            _batch_aware_once(call, entry, m)  # once per plan; a no-op for other methods
            with grad_mode(call.options.create_graph):
                assembler, result, log, state = _run_whole(call, m, problem, sizer, timed or unmeasured, progress)
                sizes = [c.size for c in log.chunks]
                if _needs_check(call, entry, stats, sizes):
                    # Made for new captured values alone (not a first check, a new chunk size or a pattern's)?
                    for_values = (call.must_verify and stats.verified and not entry.reverify
                                  and not stats.unchecked_sizes(sizes))
                    checking = time.perf_counter()
                    _check_run(call, problem, name, stats, state, assembler, result, sizes)
                    if for_values:
                        call.recheck_seconds = time.perf_counter() - checking
        except (OutputsChanged, NeedsTangents):
            raise
        except Exception as exc:  # noqa: BLE001
            failure = exc
        else:
            with entry.lock:
                stats.verified = True
                if unmeasured or relearn:
                    before = stats.chunk_size
                    if relearn and any(c.peak_bytes is not None for c in log.chunks):
                        stats.memory.clear()
                    _learn(stats, log, sizer)
                    stats.chunk_size = _planned_chunk(entry, stats)
                    if relearn and before is not None and stats.chunk_size is not None:
                        stats.chunk_size = max(stats.chunk_size, before)
                if unmeasured:
                    stats.add_run(call.work_seconds)
                if name != entry.incumbent and first is None:
                    entry.events.append(f"{entry.incumbent} failed at run time; {name} took over")
                    entry.stats[entry.incumbent].status = "failed"
                    stats.status = "chosen"
                    entry.incumbent = name
                    entry.reorder()
            call.method_name = name
            return result
        finally:
            if progress is not None:
                progress.close()
        _after_failure(call, entry, stats, failure, failures)
    raise _no_method(call, failures)


def _references(call: Call, problem, m: MethodId, state):
    """A check's reference products: on the method's own plain graph (one backward pass each), if it has one,
    else on one fresh plain evaluation of `f` (`Call.references`)."""
    return call.references(problem, state if m.on_plain_graph and isinstance(state, PlainGraph) else None)


def _attempts(entry: PlanEntry, first: str | None):
    """`first` (default: the incumbent), then (only if it fails: a cached call stays cheap) the other
    candidates that can run, fastest first, then reverse/loop."""
    head = first or entry.incumbent
    if first is not None or entry.stats[head].status != "failed":  # an incumbent that failed a check since: skip
        yield head
    names = [head]
    plan = entry.snapshot()
    names += [c.name for c in plan.fallbacks if c.name not in names
              and (entry.stats[c.name].method.evaluates_once or not entry.once_only)]
    if "reverse/loop" in entry.stats and "reverse/loop" not in names and entry.stats["reverse/loop"].status != "failed":
        names.append("reverse/loop")
    yield from names[1:]


def _trial_failed(call: Call, entry: PlanEntry, stats, failure: BaseException, began: float) -> object:
    """A trial's method failed (an error of `f` itself propagates): recorded, charged what it took since
    `began`, and the plan's method answers the call."""
    _check_outputs_unchanged(call, entry.problem, failure)
    with entry.lock:
        _record_failure(entry, stats, failure, call, [])
        entry.credit -= time.perf_counter() - began
    call.trial = f"{stats.method.name}: failed"
    return _incumbent(call, entry, timed=True)


def _trial(call: Call, entry: PlanEntry, trial: choose.Trial) -> object:
    """Try `trial.method` on this call (see NOTE: [Planning that pays for itself])."""
    problem = entry.problem
    inc = entry.chosen()
    m = trial.method
    stats = entry.stats[m.name]
    n = m.passes(problem.col_passes, problem.row_passes)
    same_side = m.by_rows == inc.method.by_rows
    if m.vectorize == "repeat" and not entry.batch_aware_checked:
        # Before the trial's clock starts (its slice's projection must not carry it), charged to the credit.
        checking = time.perf_counter()
        try:
            _batch_aware_once(call, entry, m)
        except Exception as exc:  # noqa: BLE001 - not batch-aware (or f fails on two rows): no repeat method
            return _trial_failed(call, entry, stats, exc, checking)
        with entry.lock:
            entry.credit -= time.perf_counter() - checking
    if m.vectorize == "repeat" and not call.must_verify:
        _values_changed(call, entry, m.name)  # checked on values other than its batch-aware check's
    began = time.perf_counter()
    room = entry.room_bytes()
    line = inc.memory_line()
    # A repeat trick holds a whole forward pass per vector, a vmap only its backward state: priced higher.
    weight = 2 * PRIOR_FACTOR if m.vectorize == "repeat" and inc.method.vectorize != "repeat" else PRIOR_FACTOR
    prior = (weight * line.per_vector) if line is not None else weight * max(problem.in_bytes, problem.out_bytes)
    measured = (call.meter.kind != "none") and room is not None and n * prior > MEASURE_WHEN_PRIOR_ABOVE * room
    fixed = entry.options.chunk_size  # the caller's chunk size holds for trials too: they run as the plan would
    sizer = Sizer(trial.slice_vectors if fixed is None else min(trial.slice_vectors, fixed, max(n, 1)), timed=True,
                  measured=measured, room_bytes=room, prior_bytes_per_vector=prior,
                  reserve_bytes=untracked_reserve(call.device) + entry.fixed_prior(m), trim_between=_trimming(call, entry),
                  cap_fixed=True, new_size_reserve=entry.new_size_reserve)
    call.trial = m.name
    verdict = {"stopped": False}

    def after_first(log: RunLog) -> bool:
        sizer.fixed = fixed if fixed is None else min(fixed, max(n, 1))  # else as large as the memory line allows
        sizer.cap_fixed = False  # the caller's chunk size from here on, as the plan's calls run it (first_call too)
        elapsed = time.perf_counter() - began
        # What the trial paid once (its own evaluation of `f`: the torch.func engine's under its transform, a
        # repeat method's first copies) is not paid again per slice; the slice's chunk is. A loop's time is per
        # vector (chunk * n / k); a small chunk of a batched method is mostly fixed cost, so its projection sits
        # between "all fixed" and "all per vector" (chunk * sqrt(n / k)). Charged as a whole run, a 3-row slice of
        # the torch.func engine on a 48-row robot arm projected 2.2 ms against the repeat trick's 0.45 ms (0.22 ms
        # and a check on new captured values); jacrev takes 0.25 ms.
        power = 1.0 if m.vectorize == "loop" else 0.5
        done = log.vectors
        work = log.seconds if log.seconds is not None else elapsed
        projected = (elapsed - work) + work * (n / max(done, 1)) ** power
        # Both sides with the checks their calls pay on new captured values (a repeat method's).
        if projected + stats.extra > choose.ABORT_PROJECTED * inc.cost:
            verdict["stopped"] = True
            verdict["projected"] = projected
            verdict["vectors"] = done
            return False
        return True

    result = None
    try:
        with grad_mode(call.options.create_graph):
            assembler, log, position, seconds, state = call.run(m, problem, sizer, after_chunk=after_first)
            _graph_unsafe(call, m, state)
            if position == n:
                result, collecting = call.collect(assembler)
                seconds += collecting
                sizes = [c.size for c in log.chunks]
                if _needs_check(call, entry, stats, sizes):  # as the plan's own calls: NOTE: [A confirming run]
                    _check_run(call, problem, m.name, stats, state, assembler, result, sizes)
    except (OutputsChanged, NeedsTangents):
        raise
    except Exception as exc:  # noqa: BLE001
        failure = exc
    else:
        failure = None
    if failure is not None:
        if isinstance(failure, VerificationError) and problem.layout is not None:
            raise PatternFailed(failure, problem.layout)  # the pattern, not the method: NOTE: [Patterns and values]
        return _trial_failed(call, entry, stats, failure, began)
    if result is not None:  # the alternative computed the whole Jacobian, verified
        with entry.lock:
            stats.verified = True
            stats.status = "measured" if stats.status != "chosen" else "chosen"
            stats.add_run(seconds)
            _learn(stats, log, sizer)
            stats.chunk_size = _planned_chunk(entry, stats)
            planned = n_chunks(n, stats.chunk_size or n)
            stats.sliced_share = min(planned / len(log.chunks), 1.0) if len(stats.runs) == 1 else 1.0
            # Charged all it cost beyond an incumbent call: the method's time, and the check and collection
            # around it (an alternative's first run also pays its one-time costs on this function).
            entry.credit -= max(time.perf_counter() - began - inc.best, 0.0)
            entry.consider_switch()
        call.trial = f"{m.name}: {seconds_text(seconds)} against {seconds_text(inc.best)}"
        call.method_name = m.name
        return result
    # Stopped after its first slice: projected too slow. The incumbent finishes (or redoes) the work.
    spent = time.perf_counter() - began
    projected = verdict.get("projected", math.inf)
    with entry.lock:
        stats.status = "slower"
        stats.reason = f"projected {seconds_text(projected)} from {verdict.get('vectors', log.chunks[0].size)} vectors"
        stats.prior = projected
        stats.stopped_on_slice = True
        _learn(stats, log, sizer)
        entry.credit -= spent
    call.trial = f"{m.name}: stopped, {stats.reason}"
    if same_side:
        with grad_mode(call.options.create_graph):
            assembler, inc_log, _, _, inc_state = call.run(inc.method, problem,
                                                           FixedChunks(entry.chunk_size(inc.method.name),
                                                                       _trimming(call, entry)),
                                                           start=position, assembler=assembler)
            result = assembler.result()
            # Both parts are checked unless each ran as it was checked before: a repeat method at a chunk size
            # of its own (the rest of the basis can make the incumbent's last chunk one it never ran).
            rest = [c.size for c in inc_log.chunks]
            slice_unchecked = not stats.verified or stats.unchecked_sizes([log.chunks[0].size])
            if slice_unchecked or inc.unchecked_sizes(rest) or call.must_verify:
                checking = time.perf_counter()
                try:
                    verify.check(m.name, assembler.checkable(result), problem,
                                 _references(call, problem, inc.method, inc_state))
                    call.verified = True
                    stats.verified = True
                    stats.checked_sizes.add(log.chunks[0].size)
                    inc.checked_sizes.update(rest)
                except VerificationError as exc:  # the unchecked part was wrong: the incumbent redoes the call
                    with entry.lock:
                        # The part that ran unchecked, or on new values the repeat trick's (NOTE: [A repeat plan
                        # on changing values]).
                        culprit = stats if slice_unchecked or m.vectorize == "repeat" else inc
                        _record_failure(entry, culprit, exc, call, [])
                    return _incumbent(call, entry, timed=True)
                finally:
                    with entry.lock:
                        entry.credit -= time.perf_counter() - checking  # the trial's check, too
        call.method_name = f"{m.name} + {inc.method.name}"
        return result
    partial = assembler
    result = _incumbent(call, entry, timed=True)
    if problem.layout is None:  # colour groups are not columns: only a dense slice compares column by column
        try:
            check_columns(m.name, partial.result(), 0, position, result, problem)
        except VerificationError as exc:
            with entry.lock:
                _record_failure(entry, stats, exc, call, [])
    return result


def tune(call: Call, entry: PlanEntry, time_limit: float | None) -> PlanEntry:
    """Exhaustive search: whole trial calls, one after another, until settled or out of time."""
    began = time.perf_counter()
    while not entry.settled and (time_limit is None or time.perf_counter() - began < time_limit):
        later_call(call, entry, explore=True, credit=math.inf)
    entry.effort = "exhaustive"
    return entry
