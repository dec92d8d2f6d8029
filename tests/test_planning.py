"""The pure planning parts, with made-up numbers: decision list, cost model, exploration, keys, saved plans."""

from __future__ import annotations

import functools

import pytest
import torch
import autojac
from hypothesis import given, settings
from hypothesis import strategies as st

from autojac._core.options import Options
from autojac._core.problem import Problem, Signature
from autojac._planning import choose, cost_model
from autojac._planning.choose import BY_NAME, Facts
from autojac._planning.entry import PlanEntry
from autojac._planning.keys import describe_function, stable
from reference import reference


def names(chain):
    return [m.name for m in chain]


# --- the first method -----------------------------------------------------------------------------

def test_first_method_follows_the_pass_counts():
    auto = Options()
    # the autograd engine: it pushes the chunks through the evaluation the call starts from
    assert names(choose.first_chain(auto, 100, 10, False))[0] == "reverse/vmap [autograd]"
    assert names(choose.first_chain(auto, 10, 100, False))[0] == "forward-trick/vmap [autograd]"
    assert names(choose.first_chain(auto, 10, 10, False))[0] == "reverse/vmap [autograd]"  # ties: reverse
    assert names(choose.first_chain(auto, 10, 30, False))[0] == "reverse/vmap [autograd]"  # forward only past 4x


def test_a_small_basis_is_looped_on_the_first_evaluation():
    chain = names(choose.first_chain(Options(), 2048, 1, False))
    assert chain[0] == "reverse/loop"
    assert names(choose.first_chain(Options(), 2, 50, False))[0] == "forward-trick/loop"
    # from 3 vectors on, one batched pass beats a loop of single ones
    assert names(choose.first_chain(Options(), 3, 50, False))[0] == "forward-trick/vmap [autograd]"
    assert names(choose.first_chain(Options(), 3, 3, False))[0] == "reverse/vmap [autograd]"


def test_fallbacks_end_with_every_allowed_method_and_repeat_last():
    chain = names(choose.first_chain(Options(), 100, 10, False))
    assert set(chain) == {m.name for m in choose.ALL}
    assert chain.index("reverse/vmap [func]") == 1
    assert all(n.endswith("repeat") for n in chain[-3:])
    # a forward-leaning problem falls back to native forward mode before reverse
    chain = names(choose.first_chain(Options(), 10, 1000, False))
    assert chain.index("forward/vmap") < chain.index("reverse/vmap [func]")


def test_a_random_f_allows_only_methods_that_evaluate_it_once():
    chain = choose.first_chain(Options(), 100, 10, True)
    assert chain and all(m.evaluates_once for m in chain)
    assert choose.first_chain(Options(mode="forward"), 100, 10, True) == []


def test_explicit_options_restrict_the_chain():
    assert names(choose.first_chain(Options(mode="forward", vectorize="vmap"), 5, 5, False)) == ["forward/vmap"]
    assert names(choose.first_chain(Options(vectorize="repeat"), 5, 50, False))[0] == "forward-trick/repeat"
    assert set(names(choose.first_chain(Options(mode="reverse", vectorize="vmap"), 5, 50, False))) == {
        "reverse/vmap [func]", "reverse/vmap [autograd]"}


# --- predictions and exploration order ------------------------------------------------------------

FACTS = Facts(n_in=1000, n_out=100, eval_seconds=1e-3, vjp_seconds=2e-3)


def test_alternatives_are_pruned_by_passes_and_predictions():
    inc = BY_NAME["reverse/vmap [func]"]
    order = {m.name: (prior, why) for m, prior, why in choose.exploration_order(choose.ALL, inc, 0.01, FACTS)}
    assert "passes" in order["forward/vmap"][1]  # 1000 passes against 100
    assert order["reverse/loop"][0] == pytest.approx(1e-3 + 100 * 2e-3)
    assert "predicted" in order["reverse/loop"][1]  # 0.2 s against 0.01 s
    assert order["reverse/repeat"][1] == "" and order["reverse/vmap [autograd]"][1] == ""
    tried = [m.name for m, _, why in choose.exploration_order(choose.ALL, inc, 0.01, FACTS) if not why]
    assert tried[:2] == ["reverse/repeat", "reverse/vmap [autograd]"]  # repeat first, then the other engine


def test_one_vector_has_nothing_to_vectorize():
    """A mode with one pass (a scalar loss in reverse mode): its vmap and repeat methods push that vector as the
    loop does, so they are not tried and the plan has nothing left to explore; with the loop not allowed they
    stay candidates."""
    inc = BY_NAME["reverse/loop"]
    facts = Facts(n_in=2048, n_out=1, eval_seconds=1e-4, vjp_seconds=2e-4)
    order = {m.name: why for m, _, why in choose.exploration_order(choose.ALL, inc, 3e-4, facts)}
    for name in ("reverse/vmap [func]", "reverse/vmap [autograd]", "reverse/repeat"):
        assert order[name] == "one vector: reverse/loop's product", (name, order[name])
    assert all(why for why in order.values()), order  # forward modes: 2048 passes against 1
    vmaps = [m for m in choose.ALL if m.vectorize == "vmap"]
    func = BY_NAME["reverse/vmap [func]"]
    order = {m.name: why for m, _, why in choose.exploration_order(vmaps, func, 3e-4, facts)}
    assert order["reverse/vmap [autograd]"] == ""  # no loop among the candidates: still tried
    # Two vectors are not one: vmap may beat a loop of two.
    two = Facts(n_in=2048, n_out=2, eval_seconds=1e-4, vjp_seconds=2e-4)
    order = {m.name: why for m, _, why in choose.exploration_order(choose.ALL, inc, 5e-4, two)}
    assert order["reverse/vmap [autograd]"] == ""


def test_a_scalar_losss_plan_settles_at_once():
    """The gradient as a Jacobian (one output): nothing to explore, so later calls are untimed from the start."""
    import autojac

    W = torch.randn(32, 64, dtype=torch.float64)
    loss = lambda w: torch.tanh(w @ W.T).pow(2).mean()  # noqa: E731
    w = torch.randn(16, 64, dtype=torch.float64)
    autojac.clear_cache()
    for _ in range(4):
        got = autojac.jacobian(loss, w)
    torch.testing.assert_close(got, torch.autograd.functional.jacobian(loss, w))
    p = autojac.plan(loss, w)
    assert p.settled and (p.mode, p.vectorize) == ("reverse", "loop"), str(p)
    assert "one vector: reverse/loop's product" in str(p)


def test_the_engine_probe_orders_the_engines():
    inc = BY_NAME["reverse/vmap [autograd]"]

    def tried(loops):
        facts = Facts(n_in=1000, n_out=100, eval_seconds=1e-3, vjp_seconds=2e-3, autograd_loops=loops)
        return [m.name for m, _, why in choose.exploration_order(choose.ALL, inc, 0.01, facts) if not why]

    assert tried(0)[:2] == ["reverse/repeat", "reverse/vmap [func]"]  # no loops: the engines are alike
    # Loops the probe did not find costly enough: both the torch.func engine and the repeat trick (one plain
    # backward) escape them; the repeat trick, the faster on most suite problems, still goes first.
    assert tried(3)[:2] == ["reverse/repeat", "reverse/vmap [func]"]
    func = BY_NAME["reverse/vmap [func]"]
    facts = Facts(n_in=1000, n_out=100, eval_seconds=1e-3, vjp_seconds=2e-3, autograd_loops=5)
    order = {m.name: prior for m, prior, _ in choose.exploration_order(choose.ALL, func, 0.01, facts)}
    assert order["reverse/vmap [autograd]"] > order["reverse/repeat"]  # the probe made func go first: autograd last


def test_slices_are_what_the_credit_covers_pessimistically():
    inc = BY_NAME["reverse/vmap [func]"]
    rep = BY_NAME["reverse/repeat"]
    # incumbent: 10 ms for 100 rows = 0.1 ms a row; same side: charged 1x per row, plus its fixed costs
    assert choose.slice_for(rep, inc, 0.01, FACTS, credit=0.004, fixed_seconds=0.001) == 30
    assert choose.slice_for(rep, inc, 0.01, FACTS, credit=0.003, fixed_seconds=0.001) == 0  # not a quarter
    trick = BY_NAME["forward-trick/vmap [func]"]
    facts = Facts(n_in=100, n_out=100, eval_seconds=1e-3, vjp_seconds=1e-3)
    # another side: the slice is wasted work, charged twice
    assert choose.slice_for(trick, inc, 0.01, facts, credit=0.007, fixed_seconds=0.001) == 30
    assert choose.slice_for(BY_NAME["forward-trick/loop"], inc, 0.01, facts, credit=0.003, fixed_seconds=0.001) == 10
    assert choose.slice_for(rep, inc, 0.01, FACTS, credit=1.0, fixed_seconds=0.0) == 100  # never beyond the basis


# --- cost model -----------------------------------------------------------------------------------

def test_lines_through_measured_points():
    assert cost_model.fit_line([(2, 10.0)]) == cost_model.Line(0.0, 5.0)  # one size: all per vector
    line = cost_model.fit_line([(2, 12.0), (8, 30.0), (8, 31.0)])
    assert line.fixed == pytest.approx(6.0) and line.per_vector == pytest.approx(3.0)
    assert cost_model.fit_line([(2, 10.0), (8, 5.0)]).per_vector == 0.0  # never negative


def test_largest_fitting_chunk():
    line = cost_model.Line(100.0, 10.0)
    assert cost_model.largest_fitting(line, 1.15 * 200, 1000) == 10
    assert cost_model.largest_fitting(line, 1.15 * 100, 1000) == 0
    assert cost_model.largest_fitting(cost_model.Line(5.0, 0.0), 100, 7) == 7


def test_growing_chunks_grow_at_most_4x_and_stop_when_a_larger_chunk_does_not_pay():
    line = cost_model.Line(0.0, 1.0)
    assert cost_model.next_chunk(1000, [], None, None, None) == 1000  # no budget to keep
    assert cost_model.next_chunk(1000, [], None, 115.0, 10.0) == 10  # the prior alone
    assert cost_model.next_chunk(1000, [10], line, 1e4, None) == 40  # 4x the largest so far
    paid = [(10, 1.0), (40, 0.5)]
    assert cost_model.next_chunk(1000, [10, 40], line, 1e4, None, paid) == 160
    unpaid = [(100, 1.0), (400, 0.99)]
    assert cost_model.next_chunk(10000, [100, 400], line, 1e5, None, unpaid) == 400
    # small chunks are not judged by their noisy timings: they grow
    assert cost_model.next_chunk(1000, [10, 40], line, 1e4, None, [(10, 1.0), (40, 0.99)]) == 160
    # far from the budget (what is left under 1/16 of the room, by the measured line): all the rest at once
    assert cost_model.next_chunk(1000, [100], line, 16 * 1.15 * 1000, None) == 1000
    assert cost_model.next_chunk(1000, [100], line, 16 * 1.15 * 1000 - 1, None) == 400
    # ... at most 16 times the largest chunk measured, and never on a line without a slope
    assert cost_model.next_chunk(1000, [10], line, 1e9, None) == 40
    flat = cost_model.fit_line([(2, 10e6), (8, 9e6)])
    assert flat.per_vector == 0 and cost_model.next_chunk(100000, [2, 8], flat, 16e9, None) == 32
    # the prior keeps a reserve back for workspaces it cannot know about
    assert cost_model.next_chunk(1000, [], None, 115.0, 10.0, reserve_bytes=57.5) == 5


def test_a_chunk_beyond_the_sizes_measured_keeps_the_workspace_reserve_back():
    """NOTE: [A larger chunk meets new workspaces]: sizes measured may fill the room by their line; a larger one
    leaves the reserve for the kernels' first-use buffers."""
    line = cost_model.Line(0.0, 1.0)  # 1 byte a vector; 1.15 x the line must fit
    room = 1.15 * 100
    assert cost_model.fitting_size(line, room, 1000, measured_up_to=0, new_size_reserve=0) == 100
    # measured up to 40: beyond it, the room less a reserve of 1.15 * 20
    assert cost_model.fitting_size(line, room, 1000, measured_up_to=40, new_size_reserve=1.15 * 20) == 80
    # already measured at 90: up to there the whole room's line holds
    assert cost_model.fitting_size(line, room, 1000, measured_up_to=90, new_size_reserve=1.15 * 20) == 90
    # a reserve larger than the room: no chunk beyond the sizes measured
    assert cost_model.fitting_size(line, room, 1000, measured_up_to=40, new_size_reserve=1e9) == 40
    # the same rule inside the growing sizer: chunks of 10 and 40 measured, the next stops at 80, not 100
    assert cost_model.next_chunk(1000, [10, 40], line, room, None, measured_up_to=40,
                                 new_size_reserve=1.15 * 20) == 80
    assert cost_model.next_chunk(1000, [10, 40], line, room, None) == 100


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), k=st.integers(1, 5000))
def test_balanced_chunks_are_near_equal(n, k):
    size = cost_model.balanced(n, k)
    chunks = cost_model.n_chunks(n, size)
    assert size <= max(k, 1) and chunks == cost_model.n_chunks(n, k)
    assert (chunks - 1) * size < n <= chunks * size


# --- the learning state ---------------------------------------------------------------------------

def entry_with(runs: dict[str, list[float]], incumbent: str, credit: float = 0.0, n_in=100, n_out=100) -> PlanEntry:
    sig = Signature(((n_in,),), (torch.float32,), torch.device("cpu"), False)
    problem = Problem(sig, ((n_out,),), (torch.float32,), False)
    e = PlanEntry(problem, Options(), None, 0, Facts(n_in, n_out, 1e-3, 1e-3), list(choose.ALL), False)
    e.incumbent = incumbent
    for name, times in runs.items():
        s = e.stats[name]
        s.runs = list(times)
        s.status = "chosen" if name == incumbent else "measured"
        s.verified = True
    e.reorder()
    e.credit = credit
    return e


def test_no_trial_before_the_incumbent_has_a_warm_run():
    e = entry_with({"reverse/vmap [func]": [0.05]}, "reverse/vmap [func]", credit=10.0)
    e.warm = False  # as after a first call
    assert e.next_trial() is None
    e.warm = True
    assert e.next_trial() is not None


def test_no_warm_wait_behind_an_autograd_engine_that_loops():
    # NOTE: [No warm wait behind a looping engine]: the first call counted loops on the autograd engine.
    for loops, waits in ((0, True), (None, True), (7, False)):
        e = entry_with({"reverse/vmap [autograd]": [0.05]}, "reverse/vmap [autograd]", credit=10.0)
        e.facts = Facts(100, 100, 1e-3, 1e-3, autograd_loops=loops)
        e.needs_reorder = True
        e.warm = False
        assert (e.next_trial() is None) == waits, loops
    e = entry_with({"reverse/vmap [func]": [0.05]}, "reverse/vmap [func]", credit=10.0)
    e.facts = Facts(100, 100, 1e-3, 1e-3, autograd_loops=7)  # loops, but not the incumbent's engine
    e.warm = False
    assert e.next_trial() is None
    # One trial only before the incumbent's warm run: a close contender's further runs wait for it.
    e = entry_with({"reverse/vmap [autograd]": [0.010], "reverse/vmap [func]": [0.009]}, "reverse/vmap [autograd]",
                   credit=10.0)
    e.facts = Facts(100, 100, 1e-3, 1e-3, autograd_loops=7)
    e.needs_reorder, e.warm = True, False
    assert e.next_trial() is not None and e.next_trial() is None
    for s in e.stats.values():  # nothing left to try: still not settled on a cold time
        if s.method.name != e.incumbent:
            s.status, s.runs = "slower", [1.0]
    e.warm, e.cold_trial = False, False
    assert e.next_trial() is None and not e.settled
    e.warm = True
    assert e.next_trial() is None and e.settled


def test_an_incumbent_without_a_warm_run_is_replaced_only_by_a_clear_margin():
    for warm, faster, switches in ((True, 0.9, True), (False, 0.9, False), (False, 0.7, True)):
        # A warm incumbent has run twice at least (its first call's run and the warm one).
        e = entry_with({"reverse/vmap [autograd]": [0.010, 0.010] if warm else [0.010], "reverse/repeat": [0.010 * faster]},
                       "reverse/vmap [autograd]")
        e.warm = warm
        e.consider_switch()
        assert (e.incumbent == "reverse/repeat") == switches, (warm, faster)


def test_a_looping_first_calls_alternative_runs_whole_once_the_credit_covers_it():
    # cumsum and flip: torch.autograd's vmap loops over their backward; over 8 rows that costs less than the
    # torch.func engine's evaluation would (NOTE: [Loops read off the graph]), so the autograd engine goes first.
    # Its alternatives are tried once the credit covers a whole run (8 rows: never a slice), its fixed costs
    # and all (NOTE: [What a trial costs before its first vector]).
    weights = torch.linspace(0.5, 1.5, 4, dtype=torch.float64)

    def arm(q):
        angles = torch.cumsum(q * weights, 0)
        return torch.cat([torch.cos(angles).cumsum(0), torch.sin(angles).flip(0)])

    q = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)
    autojac.clear_cache()
    first = autojac.jacobian(arm, q)
    entry = autojac.plan(arm, q).entry
    if autojac.last_report().method != "reverse/vmap [autograd]" or not entry.facts.autograd_loops:
        pytest.skip("this torch's autograd engine did not loop here (or did not say so)")
    torch.testing.assert_close(first, reference(arm, q))
    for _ in range(80):
        jac = autojac.jacobian(arm, q)
        torch.testing.assert_close(jac, reference(arm, q))
        trial = autojac.last_report().trial
        if trial is not None:
            break
    assert trial is not None, "no alternative tried within 80 calls"
    assert "stopped" not in trial  # run whole, not on a slice


def test_trials_wait_for_credit_then_come_in_prior_order():
    e = entry_with({"reverse/vmap [func]": [0.01, 0.01]}, "reverse/vmap [func]", credit=0.0)
    assert e.next_trial() is None
    e.record_call(0.01)
    assert e.credit == pytest.approx(0.001)
    e.record_call(0.05)  # a slow call (a trial) earns what a plan's call earns, not a share of its own time
    assert e.credit == pytest.approx(0.002)
    repeat = e.stats["reverse/repeat"]
    # Before its first vector: the trial's machinery, an evaluation, its first run's check (an evaluation and a
    # VJP: it has no plain graph of its own) and, as the plan's first repeat run, `f` on two different rows.
    fixed = e.trial_fixed(repeat)
    assert fixed == pytest.approx(choose.TRIAL_FIXED_SECONDS + 1e-3 + 2e-3 + 2e-3)
    e.credit = fixed - 1e-5
    assert e.next_trial() is None  # not even a slice's fixed costs
    e.credit = fixed + 0.004  # 40 rows at the incumbent's 0.1 ms a row
    trial = e.next_trial()
    assert trial.method.name == "reverse/repeat" and trial.slice_vectors == 40  # the repeat trick first


def test_what_a_trial_costs_before_its_first_vector():
    e = entry_with({"reverse/vmap [func]": [0.01, 0.01]}, "reverse/vmap [func]")
    base = choose.TRIAL_FIXED_SECONDS + 1e-3  # the trial's machinery and its own evaluation
    autograd, func = e.stats["reverse/vmap [autograd]"], e.stats["forward-trick/vmap [func]"]
    assert e.trial_fixed(autograd) == pytest.approx(base + 1e-3)  # checked on its own plain graph: a VJP
    assert e.trial_fixed(func) == pytest.approx(base + 2e-3)  # on a fresh evaluation of its own
    func.verified = True
    assert e.trial_fixed(func) == pytest.approx(base)
    repeat = e.stats["reverse/repeat"]
    repeat.verified = True
    e.batch_aware_checked = True
    assert e.trial_fixed(repeat) == pytest.approx(base)
    repeat.checks.estimate = 3e-3  # a check on new captured values before every call until shown batch-aware
    assert e.trial_fixed(repeat) == pytest.approx(base + 3e-3)


def test_a_small_basis_is_tried_whole_or_not_yet():
    # NOTE: [What a trial costs before its first vector]: 8 rows fit one chunk, so a slice would cost about as
    # much as the whole run; the credit waits for the whole run instead.
    e = entry_with({"reverse/vmap [func]": [0.008, 0.008]}, "reverse/vmap [func]", n_in=8, n_out=8)
    repeat = e.stats["reverse/repeat"]
    whole = e.trial_fixed(repeat) + 0.008 - (0.008 - repeat.prior)  # less what it is predicted to save
    e.credit = whole - 1e-5
    assert e.next_trial() is None
    e.credit = whole + 1e-5
    trial = e.next_trial()
    assert trial.method.name == "reverse/repeat" and trial.slice_vectors == 8
    # A loop is priced per vector: a slice of it stays possible.
    assert choose.slice_for(choose.BY_NAME["reverse/loop"], choose.BY_NAME["reverse/vmap [func]"], 0.008,
                            e.facts, 0.004, 0.0) == 4
    assert choose.slice_for(choose.BY_NAME["reverse/vmap [autograd]"], choose.BY_NAME["reverse/vmap [func]"], 0.008,
                            e.facts, 0.004, 0.0) == 0


def test_a_batched_methods_slice_holds_a_quarter_of_its_vectors_or_waits():
    # 100 rows at 0.1 ms a row: a slice of s rows of the same mode is charged s * 0.1 ms beyond its fixed costs.
    facts = choose.Facts(100, 100, 1e-3, 1e-3)
    vmap, repeat = choose.BY_NAME["reverse/vmap [func]"], choose.BY_NAME["reverse/repeat"]
    assert choose.slice_for(repeat, vmap, 0.01, facts, 0.0024, 0.0) == 0  # 24 rows: too few to project from
    assert choose.slice_for(repeat, vmap, 0.01, facts, 0.0025, 0.0) == 25
    assert choose.slice_for(repeat, vmap, 0.01, facts, 0.0035, 0.001) == 25  # its fixed costs come first
    assert choose.slice_for(repeat, vmap, 0.01, facts, 0.0095, 0.0, saving=0.001) == 100  # a whole run


def test_a_sliced_first_run_is_confirmed_at_its_per_chunk_cost():
    # The repeat trick's trial ran in two chunks (a slice, then the rest): 30 ms against the incumbent's 24 ms.
    e = entry_with({"reverse/vmap [autograd]": [0.024, 0.024], "reverse/repeat": [0.030]}, "reverse/vmap [autograd]")
    for s in e.stats.values():
        if s.status == "untried":
            s.status = "slower"
    e.credit = 0.001
    assert e.next_trial() is None  # a whole run expected at 30 ms: 6 ms over the incumbent, more than the credit
    e.stats["reverse/repeat"].sliced_share = 0.5  # one chunk where it ran two: about 15 ms
    trial = e.next_trial()
    assert trial.method.name == "reverse/repeat" and trial.slice_vectors == 100  # a whole second run
    # Expected faster than the incumbent, the second run does not wait for the debt its first trial left.
    e.credit = -0.009
    assert e.next_trial().method.name == "reverse/repeat"
    e.stats["reverse/repeat"].sliced_share = 1.0  # expected 6 ms slower: it waits
    assert e.next_trial() is None


def test_the_fastest_measured_method_takes_over_and_the_plan_settles():
    e = entry_with({"reverse/vmap [func]": [0.010, 0.010], "reverse/repeat": [0.005]}, "reverse/vmap [func]")
    e.consider_switch()
    assert e.incumbent == "reverse/repeat"
    for s in e.stats.values():
        if s.status == "untried":
            s.status = "slower"
    e.stats["reverse/vmap [func]"].runs = [0.0052]  # within 10% of the best, measured once: confirm it first
    e.credit = 1.0
    assert e.next_trial().method.name == "reverse/vmap [func]"
    e.stats["reverse/vmap [func]"].runs.append(0.006)
    # torch.func warms up over two calls or more (choose.CONFIRM_RUNS): a third whole run before settling.
    assert e.next_trial().method.name == "reverse/vmap [func]" and not e.settled
    e.stats["reverse/vmap [func]"].runs.append(0.0055)
    assert e.next_trial() is None and e.settled
    assert "Settled" in str(e.snapshot())


def test_a_contender_still_warming_up_gets_more_runs_up_to_a_cap():
    def plan(first_run: float) -> PlanEntry:
        e = entry_with({"reverse/vmap [autograd]": [0.0095, 0.0095], "reverse/vmap [func]": [first_run]},
                       "reverse/vmap [autograd]", credit=1.0)
        for s in e.stats.values():
            if s.status == "untried":
                s.status = "slower"
        return e

    # torch.func on a per-sample CNN: 16.1, 15.6, 11.5 ms in its first three runs, 6-9 ms from its fifth.
    e = plan(0.0161)
    func = e.stats["reverse/vmap [func]"]
    for seconds in (0.0156, 0.0115):
        assert e.next_trial().method.name == "reverse/vmap [func]"
        func.add_run(seconds)
    # Its third run was its fastest by over 10%: a fourth, but only once every untried method had its trial.
    loop = e.stats["reverse/loop"]
    loop.status, loop.prior = "untried", 0.02
    assert func.warming and e.next_trial().method.name == "reverse/loop"
    loop.status = "slower"
    assert e.next_trial().method.name == "reverse/vmap [func]" and not e.settled
    func.add_run(0.0112)  # within 10% of its best: warm; the plan settles on the incumbent
    assert not func.warming and e.next_trial() is None and e.settled
    # However long it keeps improving, no more than choose.CONFIRM_MAX_RUNS whole runs.
    e = plan(0.018)
    func = e.stats["reverse/vmap [func]"]
    seconds = 0.018
    while (trial := e.next_trial()) is not None:
        assert trial.method.name == "reverse/vmap [func]"
        seconds *= 0.85
        func.add_run(seconds)
    assert len(func.runs) == choose.CONFIRM_MAX_RUNS and e.settled


def test_a_slightly_faster_alternative_does_not_switch_on_noise():
    e = entry_with({"reverse/vmap [func]": [0.010, 0.0101], "reverse/repeat": [0.0099]}, "reverse/vmap [func]")
    e.consider_switch()
    assert e.incumbent == "reverse/vmap [func]"


def test_an_incumbent_measured_once_is_displaced_only_by_a_clear_margin():
    # The dense tanh(W x) case: forward/vmap's best of three (5.84 ms) against the single run (6.31 ms) that made
    # forward-trick/vmap [func] the incumbent: 7% faster is not enough against one (cold) sample ...
    runs = {"forward/vmap": [0.00737, 0.00738, 0.00584], "forward-trick/vmap [func]": [0.00631]}
    e = entry_with(runs, "forward-trick/vmap [func]")
    e.warm = True
    e.consider_switch()
    assert e.incumbent == "forward-trick/vmap [func]"
    # ... nor against a torch.func incumbent's first two runs (it warms up over its first few calls on a
    # function: a grid residual's ran 2.12 and 3.24 ms, then 1.0-1.4) ...
    e.stats["forward-trick/vmap [func]"].runs.append(0.0064)
    e.consider_switch()
    assert e.incumbent == "forward-trick/vmap [func]"
    # ... but it is once the incumbent has run CONFIRM_RUNS times, and a clear margin is enough at once.
    e.stats["forward-trick/vmap [func]"].runs.append(0.0063)
    e.consider_switch()
    assert e.incumbent == "forward/vmap"
    runs = {"forward/vmap": [0.00737, 0.00738, 0.00584], "forward-trick/vmap [autograd]": [0.00631, 0.0064]}
    e = entry_with(runs, "forward-trick/vmap [autograd]")  # the autograd engine: its second run is warm
    e.warm = True
    e.consider_switch()
    assert e.incumbent == "forward/vmap"
    e = entry_with({"forward/vmap": [0.0049], "forward-trick/vmap [func]": [0.00631]}, "forward-trick/vmap [func]")
    e.warm = True
    e.consider_switch()
    assert e.incumbent == "forward/vmap"


# --- keys -----------------------------------------------------------------------------------------

def test_closures_with_the_same_code_and_capture_shapes_share_a_key():
    def make(t, k):
        return lambda x: x * t + k

    a, _ = describe_function(make(torch.ones(3), 1))
    b, _ = describe_function(make(torch.zeros(3), 1))
    c, _ = describe_function(make(torch.zeros(4), 1))
    d, _ = describe_function(make(torch.zeros(3), 2))
    assert a == b and hash(a) == hash(b)
    assert a != c and a != d


def test_partials_dicts_and_modules_in_keys():
    net = torch.nn.Linear(2, 2)
    k1, mods = describe_function(functools.partial(lambda x, p: net(x) + p["w"], p={"w": torch.ones(2)}))
    k2, _ = describe_function(functools.partial(lambda x, p: net(x) + p["w"], p={"w": torch.zeros(2)}))
    assert mods == (net,)
    assert k1 != k2  # two lambdas: two code objects
    make = lambda w: functools.partial(torch.add, other=w)  # noqa: E731
    assert describe_function(make(torch.ones(2)))[0] == describe_function(make(torch.zeros(2)))[0]


def test_stable_keys_exist_only_for_what_another_process_can_match():
    f = lambda x: x * 2  # noqa: E731
    key, _ = describe_function(f)
    assert stable(key) is not None

    class Thing:
        pass

    thing = Thing()
    g = lambda x: x * (thing is None)  # noqa: E731
    assert stable(describe_function(g)[0]) is None


def test_a_run_expected_to_be_long_starts_small_and_grows_while_it_pays():
    assert cost_model.next_chunk(3000, [], None, None, None, first=300) == 300
    assert cost_model.next_chunk(2700, [300], None, None, None, [(300, 1.0)]) == 1200
    # a larger chunk that took longer per vector (caches, fresh pages): back to the size that was fastest
    assert cost_model.next_chunk(1500, [300, 1200], None, None, None, [(300, 1.0), (1200, 1.3)]) == 300
    # judged among chunks of PAYS_FROM vectors or more, whatever smaller first chunk the run started with (a
    # 60-step RK4 rollout of 3000: 25, 99 and 359 vectors at 17.1, 18.0, 19.9 ms each, then 2509 at 49.1 ms)
    rollout = [(25, 17.1e-3), (99, 18.0e-3), (359, 19.9e-3)]
    assert cost_model.paying_cap(rollout) == 99
    assert cost_model.next_chunk(2509, [25, 99, 359], None, None, None, rollout) == 99
    assert cost_model.paying_cap([(25, 17.1e-3), (99, 18.0e-3)]) is None  # one timed chunk: nothing to compare
    assert cost_model.paying_cap([(99, 18.0e-3), (359, 17.0e-3)]) is None  # it paid: grow on


def test_later_calls_keep_to_the_chunk_size_that_paid(monkeypatch):
    """A run whose larger chunks stopped paying leaves its plan at the size that did: later calls (which are
    not timed chunk by chunk) do not run the whole basis in one slow chunk, even once the points that showed
    it are no longer among the plan's last 8 rates."""
    from autojac._planning import session
    from autojac._planning.entry import MethodStats
    from autojac._planning.choose import BY_NAME
    from autojac._execute.run import RunLog

    entry = entry_with({"reverse/vmap [func]": [0.01]}, "reverse/vmap [func]", n_in=1000, n_out=1000)
    stats = entry.stats["reverse/vmap [func]"]
    n = stats.method.passes(entry.problem.col_passes, entry.problem.row_passes)
    stats.rates = [(n // 8, 1.0), (n // 2, 1.4)]
    session._learn(stats, RunLog(), None)
    assert stats.pays_up_to == n // 8 and session._planned_chunk(entry, stats) == n // 8
    stats.rates = [(n // 8, 1.0)] * 8  # later calls' points only
    session._learn(stats, RunLog(), None)
    assert session._planned_chunk(entry, stats) == n // 8
    fresh = MethodStats(BY_NAME["reverse/vmap [func]"])
    assert session._planned_chunk(entry, fresh) is None  # nothing measured against it: the whole basis


def test_a_slope_needs_sizes_far_enough_apart():
    # Peaks at 73 and 74 vectors that fall with size (noise) must not make a line without a per-vector cost.
    line = cost_model.fit_line([(74, 18.5e6), (73, 19.2e6)])
    assert line.fixed == 0.0 and line.per_vector == pytest.approx(19.2e6 / 73)
    assert cost_model.largest_fitting(line, 24e6, 512) < 100
    far = cost_model.fit_line([(8, 2e6), (32, 8e6)])
    assert far.per_vector == pytest.approx(6e6 / 24)


def test_the_largest_captured_tensor_is_found_inside_containers_and_modules():
    from autojac._planning.keys import largest_captured_bytes
    blocks = [(torch.zeros(64, 32), torch.zeros(32, 64)), (torch.zeros(128, 32), torch.zeros(8))]

    def f(x):
        return sum((W @ x[:32]).sum() for W, _ in blocks[:1]) + x

    assert largest_captured_bytes(f, *describe_function(f)) == 128 * 32 * 4
    net = torch.nn.Linear(100, 300)
    g = lambda x: net(x)  # noqa: E731
    assert largest_captured_bytes(g, *describe_function(g)) == 300 * 100 * 4
    assert largest_captured_bytes(torch.sin, *describe_function(torch.sin)) == 0
    assert largest_captured_bytes(_uses_a_global, *describe_function(_uses_a_global)) == 50 * 40 * 8


def test_forward_modes_are_not_tried_when_the_budget_cannot_hold_a_zero_tangent_copy():
    import autojac

    W = torch.randn(4096, 1024)  # 16 MiB: forward-mode AD's zero tangent of it is copied whole by mm on the CPU
    f = lambda x: (W @ x)[:8]  # noqa: E731
    x = torch.randn(1024)
    tight = autojac.plan(f, x, memory_budget="12MiB", effort="estimate")
    forward = [c for c in tight.candidates if c.name.startswith("forward/")]
    assert forward and all(c.status == "not tried" and "zero tangent" in c.reason for c in forward), str(tight)
    assert not tight.name.startswith("forward/")
    roomy = autojac.plan(f, x, memory_budget="1GiB", effort="estimate")
    assert all("zero tangent" not in c.reason for c in roomy.candidates)


_GLOBAL_WEIGHT = torch.zeros(50, 40, dtype=torch.float64)


def _uses_a_global(x):
    return _GLOBAL_WEIGHT @ x


def test_a_whole_trial_is_charged_all_it_cost_its_check_included(monkeypatch):
    """Exploration's share holds only if a trial pays for everything it adds to the call: the alternative's
    run, its collection and its check (a check that takes 50 ms must cost the credit at least that)."""
    import autojac
    from autojac._execute import verify

    W = torch.randn(40, 40, dtype=torch.float64)
    f = lambda x: torch.tanh(x @ W.T)  # noqa: E731 - batch-aware: every alternative can run
    x = torch.randn(40, dtype=torch.float64)
    autojac.clear_cache()
    # vmap methods only: each trial is checked (a trial of torch's own loop is not, and on a loaded machine the
    # priors made it the trial, which then had no check to charge).
    autojac.jacobian(f, x, vectorize="vmap")
    entry = autojac.plan(f, x, vectorize="vmap").entry
    assert not entry.settled
    entry.warm = True  # trials may start (a tanh loops on the autograd engine: they may anyway)
    real_check = verify.check_against
    checked = []

    def slow_check(*args):
        checked.append(args[0])
        __import__("time").sleep(0.05)
        return real_check(*args)

    monkeypatch.setattr(verify, "check_against", slow_check)
    entry.credit = 10.0  # enough for a whole trial
    incumbent_best = entry.chosen().best
    autojac.jacobian(f, x, vectorize="vmap")
    report = autojac.last_report()
    assert report.trial is not None and "failed" not in report.trial and "stopped" not in report.trial, report.trial
    # The trial is charged what it cost beyond an incumbent call, and the call earns its share of the incumbent's
    # cost (the trial's own method's, if it took over): a check left uncharged leaves the credit above this bound
    # by the check's 50 ms less the run's few milliseconds.
    from autojac._planning import choose

    earned = choose.EXPLORE_SHARE * entry.chosen().cost
    assert checked and entry.credit <= 10.0 - 0.05 + incumbent_best + earned + 1e-9, (entry.credit, incumbent_best,
                                                                                        earned)


def test_a_probed_pace_can_make_structure_worth_a_look():
    from autojac._planning.structure import DETECT_SHARE, might_pay

    sig = Signature(((1024,),), (torch.float32,), torch.device("cpu"), False)
    problem = Problem(sig, ((1024,),), (torch.float32,), False)
    # a 0.1 ms VJP counted at a fifth a pass: 1024 passes are 20 ms, a 4 ms trace is not under a tenth of that
    assert not might_pay(problem, 1e-4, 1e-4, share=DETECT_SHARE)
    # the probe measured 0.14 ms a vector batched: 143 ms, and the trace is worth timing a slice for
    assert might_pay(problem, 1e-4, 1e-4, per_pass=1.4e-4, share=DETECT_SHARE)
    assert not might_pay(problem, 1e-4, 1e-4, per_pass=1e-6, share=DETECT_SHARE)  # never below the prior's pace


def test_a_slice_is_timed_when_the_trace_is_under_a_quarter_of_the_dense_estimate():
    """The slice decides whether to look (with the share its entries allow); the estimate before it only
    decides whether to time one, under SLICE_SHARE: a 4 ms trace against a 20 ms estimate is timed, against
    a 15 ms one it is not."""
    from autojac._planning.structure import might_pay

    sig = Signature(((1024,),), (torch.float32,), torch.device("cpu"), False)
    problem = Problem(sig, ((1024,),), (torch.float32,), False)
    assert might_pay(problem, 1e-4, 1e-4)  # 1024 x 0.2 x 0.1 ms = 20 ms: a quarter is 5 ms > 4 ms
    assert not might_pay(problem, 1e-4, 0.75e-4)  # 15 ms: a quarter is 3.75 ms < 4 ms


def test_a_repeat_plan_checked_on_every_call_counts_its_checks():
    # a closure rebuilt every step: the repeat trick (5 ms) is checked on each call's new captured values (4 ms)
    e = entry_with({"reverse/repeat": [0.005, 0.005], "reverse/vmap [autograd]": [0.007, 0.007]}, "reverse/repeat")
    e.stats["reverse/repeat"].checks.confirmed = True  # shown batch-aware everywhere: NOTE: [Batch-aware at every point]
    e.stats["reverse/repeat"].note_values(True, 0.001)
    e.consider_switch()
    assert e.incumbent == "reverse/repeat"  # 6 ms against 7: the repeat trick is still the faster
    for _ in range(3):
        e.stats["reverse/repeat"].note_values(True, 0.004)
    e.stats["reverse/repeat"].checks.seconds = 0.004  # the fastest seen so far was 1 ms: now checks take 4
    e.consider_switch()
    assert e.incumbent == "reverse/vmap [autograd]"  # 9 ms against 7
    assert "of checks a call on new captured values" in e.events[-1]
    repeat = e.stats["reverse/repeat"]
    for _ in range(8):  # the same closure again and again: no checks, the extra cost fades
        repeat.note_values(False, None)
    assert repeat.extra == 0.0 and repeat.cost == 0.005
    repeat.checks.confirmed = False  # not shown batch-aware everywhere: every call pays a whole check
    assert repeat.extra == 0.004 and repeat.cost == pytest.approx(0.009)


def test_a_plan_counts_each_call_once():
    W = torch.randn(6, 6, dtype=torch.float64)
    g = lambda x: torch.tanh(x @ W)  # noqa: E731
    x = torch.randn(6, dtype=torch.float64)
    for _ in range(7):
        autojac.jacobian(g, x)
    p = autojac.plan(g, x)
    assert p.calls == 7 and "after 7 call(s)" in str(p)


def test_a_method_stopped_on_its_slice_gets_one_whole_run_before_the_plan_settles():
    # A slice's projection overstates a batched method (a few vectors are mostly fixed cost): one projected
    # within RETRY_PROJECTED of the incumbent is run whole once, when the credit covers it; then it settles.
    e = entry_with({"reverse/repeat": [0.010, 0.010]}, "reverse/repeat")
    for s in e.stats.values():
        if s.status == "untried":
            s.status = "slower"  # predicted or measured slower: not re-tried
    func = e.stats["reverse/vmap [func]"]
    func.prior, func.stopped_on_slice = 0.025, True  # projected from its slice at 2.5x the incumbent
    far = e.stats["forward/vmap"]
    far.prior, far.stopped_on_slice = 0.5, True  # projected at 50x: not worth a whole run
    e.credit = 0.01
    assert e.next_trial() is None and not e.settled  # 15 ms over an incumbent call: more than the credit
    e.credit = 0.02
    trial = e.next_trial()
    assert trial.method.name == "reverse/vmap [func]" and trial.slice_vectors == 100 and func.retried
    func.status = "slower"  # stopped again (under a budget, its first chunk can be a slice again)
    assert e.next_trial() is None and e.settled  # once only


def test_a_plans_repeat_methods_share_the_cost_of_checks_on_new_values():
    e = entry_with({"reverse/repeat": [0.005, 0.005], "forward-trick/repeat": [0.006],
                    "reverse/vmap [func]": [0.0075]}, "reverse/repeat")
    for _ in range(4):
        e.stats["reverse/repeat"].note_values(True, 0.004)  # a closure with a new target every call
    assert e.stats["forward-trick/repeat"].extra == 0.004  # the same checks await any repeat method
    assert e.stats["reverse/vmap [func]"].extra == 0.0
    e.consider_switch()
    assert e.incumbent == "reverse/vmap [func]", e.events  # 7.5 ms against 9 and 10, not the 6 ms repeat trick


def test_a_repeat_method_waiting_behind_a_vmap_incumbent_is_priced_with_the_checks_new_values_bring():
    """NOTE: [New values before a repeat method runs]: the repeat trick (predicted 8 ms) before the torch.func
    engine (9 ms) on calls that bring no new values; with a 3 ms check on each call's new values, after it."""
    e = entry_with({"reverse/vmap [autograd]": [0.02, 0.02]}, "reverse/vmap [autograd]", credit=10.0)
    for s in e.stats.values():
        if s.status == "untried":
            s.status = "slower"
    repeat, func = e.stats["reverse/repeat"], e.stats["reverse/vmap [func]"]
    repeat.status = func.status = "untried"
    repeat.prior, func.prior = 0.008, 0.009
    assert e.repeat_waiting() is not None
    repeat.checks.estimate = 0.003  # the first call's evaluation and VJP: no check has run yet
    # Not shown batch-aware for every input yet, each call would pay a check (NOTE: [Batch-aware at every point]).
    assert repeat.extra == pytest.approx(0.003)
    assert e.next_trial().method.name == "reverse/vmap [func]"
    e.stats["reverse/vmap [func]"].status = "untried"
    repeat.checks.confirmed = True  # shown: only calls on new values pay one
    assert repeat.extra == 0.0  # nothing noted: no calls on new values known
    assert e.next_trial().method.name == "reverse/repeat"
    repeat.note_values(True, None)  # the second call brought new values (a closure rebuilt around new tensors)
    assert repeat.extra == pytest.approx(0.003)
    assert e.next_trial().method.name == "reverse/vmap [func]"
    for _ in range(7):
        repeat.note_values(False, None)  # the same values from then on: the checks' share fades
    assert repeat.extra == pytest.approx(0.003 / 8)
    assert e.next_trial().method.name == "reverse/repeat"
    e.incumbent = "reverse/repeat"  # a repeat incumbent notes its own checks: nothing waits
    assert e.repeat_waiting() is None


def _closure(W: torch.Tensor, target: torch.Tensor):
    return lambda x: torch.tanh(W @ x) - target


def test_a_closure_rebuilt_around_new_tensors_is_seen_bringing_new_values_before_any_repeat_method_runs(monkeypatch):
    from autojac._planning.entry import PlanEntry

    monkeypatch.setattr(PlanEntry, "next_trial", lambda self: None)  # the incumbent runs every call
    W = torch.randn(6, 6, dtype=torch.float64)
    x = torch.randn(6, dtype=torch.float64)
    want = reference(_closure(W, torch.zeros(6, dtype=torch.float64)), x)
    autojac.clear_cache()
    targets = [torch.randn(6, dtype=torch.float64) for _ in range(3)]
    for t in targets:  # a new closure around a new tensor each step: one plan (same code and shapes)
        torch.testing.assert_close(autojac.jacobian(_closure(W, t), x, sparsity=None), want)
    entry = autojac.plan(_closure(W, targets[0]), x, sparsity=None).entry
    repeat = entry.stats["reverse/repeat"]
    assert entry.chosen().method.vectorize == "vmap" and entry.calls == 3
    assert repeat.checks.recent == [True, True]
    # The first call's evaluation plus VJP, lowered to the incumbent's fastest call as of each watched call
    # (which call's fastest depends on timing; the exact lowering is tested below).
    first = entry.facts.eval_seconds + entry.facts.vjp_seconds
    assert min(first, entry.chosen().best) <= repeat.checks.estimate <= first
    same = _closure(W, targets[-1])
    for _ in range(2):  # a new closure object around the tensor seen last, called twice: no new values
        autojac.jacobian(same, x, sparsity=None)
    assert repeat.checks.recent == [True, True, False, False]
    repeat.checks.estimate, best = 10.0, entry.chosen().best  # as if the first call had been very cold
    autojac.jacobian(_closure(W, targets[0]), x, sparsity=None)
    assert repeat.checks.estimate == best  # at most the plan's own call: an evaluation and its products
    entry.settled = True
    autojac.jacobian(_closure(W, targets[0]), x, sparsity=None)
    assert entry.values_last is None and len(repeat.checks.recent) == 5  # a settled plan watches nothing


def _reverse_vmap_plan(f, x):
    """A fresh plan of `f` held to reverse-mode vmap (its two engines), after its first call: its entry."""
    autojac.clear_cache()
    autojac.jacobian(f, x, mode="reverse", vectorize="vmap")
    return autojac.plan(f, x, mode="reverse", vectorize="vmap").entry


def test_a_trials_own_evaluation_is_not_projected_as_if_paid_per_slice(monkeypatch):
    """A trial's first slice is projected to a whole run from its chunk's time; the evaluation of `f` the
    alternative makes once (here 50 ms, as the incumbent's calls do) is added once, not scaled with the chunk
    (which stopped every vmap trial of a slow `f`: 20 ms x sqrt(64 / 2) against 1.5 x 20 ms). At 20 ms the
    chunks' own few milliseconds, scaled, reached the 1.5x bar on 1 run in 5 on a busy machine."""
    import gc
    import time as _time

    import autojac
    from autojac._planning import choose

    W = torch.randn(64, 64, dtype=torch.float64) / 8

    def f(x):
        _time.sleep(0.05)
        return torch.tanh(W @ x)

    x = torch.randn(64, dtype=torch.float64)
    entry = _reverse_vmap_plan(f, x)
    entry.credit = 0.0  # the incumbent's warm run (a tanh loops on the autograd engine: a trial could come at once)
    autojac.jacobian(f, x, mode="reverse", vectorize="vmap")
    other = next(s for s in entry.stats.values() if s.method.vectorize == "vmap" and s.method.name != entry.incumbent)
    assert other.status == "untried", str(entry.snapshot())
    monkeypatch.setattr(choose, "slice_for", lambda *a, **k: 2)
    entry.credit, entry.structure_open = 1.0, False  # the credit goes to the trial, not to a look for structure
    for _ in range(3):  # torch.func's first vmaps of these ops run slow (its warm-up, not what is tested here):
        torch.func.jacrev(lambda t: torch.tanh(W @ t))(x)  # a 2-vector slice took ~5 ms and was stopped 1 run in 9
    want = torch.autograd.functional.jacobian(f, x)
    # No garbage collection inside the slice: after test_engine_loops.py a full collection fell inside its
    # backward pass (13 ms for 2 vectors) and stopped it. The projection's arithmetic is what is tested.
    # One thread: on a 2-core machine with another process busy, two threads' handoffs took the 2-vector slice to
    # ~3 ms (projected 130-160 ms against the bar's ~80), at this test's start commit as well.
    gc.collect()
    gc.disable()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.testing.assert_close(autojac.jacobian(f, x, mode="reverse", vectorize="vmap"), want)
    finally:
        torch.set_num_threads(threads)
        gc.enable()
    report = autojac.last_report()
    assert report.trial is not None and report.trial.startswith(other.method.name), report.trial
    assert "stopped" not in report.trial and other.status in ("measured", "chosen"), report.trial


def test_the_repeat_trick_is_tried_first_where_the_autograd_engine_loops_too():
    # Its backward is one plain pass, untouched by the vmap fallback loops that slow the autograd engine, so
    # a counted loop must not put the torch.func engine ahead of it (robot arm, 12 rows: 0.29 ms on the repeat
    # trick against 0.60 ms on the autograd engine; the torch.func engine tried first left it unreached by
    # call 10).
    inc = choose.MethodId("reverse", "vmap", "autograd")
    for loops in (None, 0, 3):
        facts = Facts(24, 12, 1e-4, 1e-4, autograd_loops=loops)
        order = [m.name for m, prior, why in choose.exploration_order(list(choose.ALL), inc, 6e-4, facts) if not why]
        assert order.index("reverse/repeat") < order.index("reverse/vmap [func]"), (loops, order)


def test_a_saved_plan_keeps_whether_a_contender_is_still_warming_up():
    import json

    from autojac._planning import store

    f = lambda x: torch.tanh(x) * 2.0  # noqa: E731
    autojac.jacobian(f, torch.randn(5), cache=True)
    e = autojac.plan(f, torch.randn(5)).entry
    e.stats["reverse/vmap [func]"].runs = [0.0161]
    e.stats["reverse/vmap [func]"].add_run(0.0115)
    assert e.stats["reverse/vmap [func]"].warming
    data = json.loads(json.dumps(store.record("key", e)))  # as written to a file
    loaded = store.entry_from(data, Options())
    assert loaded.stats["reverse/vmap [func]"].warming and loaded.stats["reverse/vmap [func]"].runs == [0.0161, 0.0115]
    assert not loaded.stats["reverse/loop"].warming


def _confirming_run_next(entry, name: str, verified: bool = True):
    """Set a real plan up so that its next call's trial is a confirming run of `name`: measured once, 2% slower
    than the incumbent, every untried method out of the way, credit to spare."""
    with entry.lock:
        s = entry.stats[name]
        s.runs, s.status, s.verified = [entry.chosen().best * 1.02], "measured", verified
        for other in entry.stats.values():
            if other.status == "untried":
                other.status = "slower"
        entry.warm, entry.credit, entry.structure_open = True, 1.0, False
    return s


@pytest.mark.parametrize("verified_before", [True, False])
def test_a_confirming_run_is_checked_only_as_the_plans_own_calls_are(verified_before):
    # NOTE: [A confirming run]: a close contender's second run is not checked again once the method was verified
    # on this function (no extra evaluation of f); a method never verified here still is.
    W = torch.randn(12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    evaluations = []

    def f(x):
        evaluations.append(1)
        return torch.tanh(W @ x)

    x = torch.randn(6, dtype=torch.float64)
    entry = _reverse_vmap_plan(f, x)
    other = next(name for name in entry.stats if name != entry.incumbent and name.startswith("reverse/vmap"))
    _confirming_run_next(entry, other, verified=verified_before)
    evaluations.clear()
    got = autojac.jacobian(f, x, mode="reverse", vectorize="vmap")
    report, evaluated = autojac.last_report(), len(evaluations)
    assert report.trial is not None and report.trial.startswith(other)  # the confirming run
    assert report.verified is not verified_before
    assert evaluated == (1 if verified_before else 2)  # its own evaluation, and the check's if any
    torch.testing.assert_close(got, reference(f, x))
    assert entry.stats[other].verified


def test_a_checks_two_products_share_one_fresh_evaluation(monkeypatch):
    # NOTE: [Rows of very different sizes]: rows 1e8 apart take a second, balanced product. A trial on the
    # torch.func engine has no plain graph of its own, so its check evaluates `f` afresh: once for both products
    # (the balanced one evaluated `f` again: a third evaluation in the call, one more side effect).
    from autojac._execute import verify

    W = torch.randn(12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    evaluations = []

    def f(x):
        evaluations.append(1)
        y = torch.tanh(W @ x)
        return torch.cat([1e8 * y[:6], y[6:]])

    balanced = []
    real = verify.balanced_cotangents
    monkeypatch.setattr(verify, "balanced_cotangents", lambda *a, **k: balanced.append(real(*a, **k)) or balanced[-1])
    x = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    entry = _reverse_vmap_plan(f, x)
    other = next(name for name in entry.stats if name != entry.incumbent and name.startswith("reverse/vmap"))
    _confirming_run_next(entry, other, verified=False)
    evaluations.clear()
    balanced.clear()
    got = autojac.jacobian(f, x, mode="reverse", vectorize="vmap")
    report = autojac.last_report()
    assert report.trial is not None and report.trial.startswith(other) and report.verified, report
    assert balanced and balanced[-1] is not None  # the balanced product was taken
    assert len(evaluations) == 2  # the trial's own evaluation, and one for the check's two products
    torch.testing.assert_close(got, reference(f, x))


def test_a_repeat_contenders_confirming_run_on_new_captured_values_is_checked():
    # NOTE: [A confirming run]: whether `f` is batch-aware can depend on the values it holds (m * x.roll(1, 0) is
    # at m = 0, and mixes a batch's rows at m = 1), so a repeat method's run on tensors other than those it was
    # checked with is checked, confirming run or not: here the check catches it and the plan's method answers.
    def make(m):
        return lambda x: torch.tanh(x) + m * x.roll(1, 0)

    x = torch.randn(8, dtype=torch.float64)
    autojac.clear_cache()
    autojac.jacobian(make(torch.tensor(0.0, dtype=torch.float64)), x, mode="reverse")
    entry = autojac.plan(make(torch.tensor(0.0, dtype=torch.float64)), x, mode="reverse").entry
    if entry.chosen().method.vectorize == "repeat":
        pytest.skip("the first call chose the repeat trick itself")
    repeat = "reverse/repeat"
    s = _confirming_run_next(entry, repeat)  # as if the repeat trick had run once, checked, on m = 0 (right there)
    with entry.lock:
        s.checked_sizes.update(range(1, 9))
        entry.batch_aware_checked = True
    f1 = make(torch.tensor(1.0, dtype=torch.float64))  # new captured values: the repeat trick is wrong here
    got = autojac.jacobian(f1, x, mode="reverse")
    report = autojac.last_report()
    assert report.trial is not None and report.trial.startswith(repeat)
    torch.testing.assert_close(got, reference(f1, x))
    assert entry.stats[repeat].status == "failed"


# --- a first call of a few rows on torch's loop ------------------------------------------------------

def test_a_first_call_of_three_rows_runs_torchs_loop_and_the_second_checks_the_batched_method():
    """NOTE: [Torch's loop for a first call of a few rows]: the first call pays no check (torch's own loop is the
    reference); the rules' batched method, left unrun, is the plan's and is run and checked by the second call."""
    W = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.2, -1.0], [2.0, 0.0, 1.5]], dtype=torch.float64)
    f = lambda x: torch.tanh(W @ x) * x.sum()  # noqa: E731
    x = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    want = reference(f, x)
    torch.testing.assert_close(autojac.jacobian(f, x), want)
    first = autojac.last_report()
    assert first.method == "reverse/loop" and not first.verified and first.evaluations == 1, first
    p = autojac.plan(f, x)
    assert p.name.startswith("reverse/vmap") and p.estimated_seconds is None, str(p)
    assert any("torch's own loop (3 rows" in e for e in p.entry.events), p.entry.events
    loop = next(c for c in p.candidates if c.name == "reverse/loop")
    assert loop.status == "measured" and loop.runs == 1
    torch.testing.assert_close(autojac.jacobian(f, x), want)
    second = autojac.last_report()
    assert second.method == p.name and second.verified and second.trial is None, second
    assert autojac.plan(f, x).estimated_seconds is not None, (str(second), str(autojac.plan(f, x)))


class _ScalarBackward(torch.autograd.Function):
    """x^2 whose backward reads its cotangent's sign as a Python number: no batched backward can run it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        sign = 1.0 if float(g.sum().item()) >= 0.0 else 1.0  # always 1: the read is what matters
        return 2.0 * x * g * sign


def test_a_batched_method_left_to_the_second_call_that_fails_there_falls_back_with_a_right_answer():
    # The method the first call left to the second cannot run (a backward that reads a Python number from its
    # cotangent), so it fails there, and the second call's answer comes from a method that works.
    f = lambda x: _ScalarBackward.apply(x) + x[0] * x  # noqa: E731
    x = torch.tensor([0.4, -1.2, 0.9], dtype=torch.float64)
    want = reference(f, x)
    torch.testing.assert_close(autojac.jacobian(f, x), want)
    assert autojac.last_report().method == "reverse/loop"
    torch.testing.assert_close(autojac.jacobian(f, x), want)
    second = autojac.last_report()
    p = autojac.plan(f, x)
    failed = [c.name for c in p.candidates if c.status == "failed"]
    assert "reverse/vmap [autograd]" in failed and second.method not in failed, (str(second), str(p))
    for _ in range(3):
        torch.testing.assert_close(autojac.jacobian(f, x), want)


def test_five_rows_start_batched_and_checked():
    W = torch.linspace(-1.0, 1.0, 25, dtype=torch.float64).reshape(5, 5)
    f = lambda x: torch.tanh(W @ x)  # noqa: E731
    x = torch.linspace(-0.5, 0.5, 5, dtype=torch.float64)
    torch.testing.assert_close(autojac.jacobian(f, x), reference(f, x))
    report = autojac.last_report()
    assert report.method.startswith("reverse/vmap") and report.verified, report
