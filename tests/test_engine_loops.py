"""The autograd engine's vmap loops over ops it has no batching rule for: the probe, and the engine a first call
puts first."""

from __future__ import annotations

import contextlib
import threading
import types
import warnings

import pytest
import torch

import autojac
from autojac._measure.engine_loops import LoopProbe
from autojac._core.options import Options
from autojac._core.problem import Problem, Signature
from autojac._methods.base import evaluate_plain
from autojac._planning import choose, first_call
from autojac._planning.choose import Facts
from autojac._planning.entry import PlanEntry

from reference import reference


def _grid(x: torch.Tensor) -> torch.Tensor:
    """A periodic stencil built from `roll`, whose backward has no batching rule in torch.autograd's vmap."""
    return x.roll(1, 0) + x.roll(-1, 0) - 2 * x + 0.1 * x**3


def _batched_backward(y, x, k):
    return torch.autograd.grad(y.reshape(-1), x, torch.eye(y.numel(), dtype=y.dtype)[:k], is_grads_batched=True,
                               retain_graph=True)


def test_the_probe_sees_the_loops_and_puts_everything_back():
    x = torch.randn(12, dtype=torch.float64, requires_grad=True)
    y = _grid(x)
    filters = list(warnings.filters)
    before = torch._C._debug_only_are_vmap_fallback_warnings_enabled()
    with LoopProbe() as probe:
        _batched_backward(y, x, 4)
    assert probe.active and probe.loops >= 1 and probe.ops == ["aten::roll"]
    assert warnings.filters == filters
    assert torch._C._debug_only_are_vmap_fallback_warnings_enabled() == before
    with LoopProbe() as probe:  # a backward with batching rules for every op
        z = (x * x).sum(0, keepdim=True) * x
        _batched_backward(z, x, 4)
    assert probe.active and probe.loops == 0


class _Loud(torch.autograd.Function):
    """Doubles; its backward warns (a user's warning the probe must pass on, or the user's filters hide)."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        warnings.warn("from the user's backward", RuntimeWarning)
        return g * 2


def test_the_probe_hands_other_warnings_to_the_caller():
    x = torch.randn(5, requires_grad=True)
    y = _Loud.apply(x)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with LoopProbe() as probe:
            torch.autograd.grad(y, x, torch.ones_like(y))
    assert probe.loops == 0
    assert [str(w.message) for w in seen] == ["from the user's backward"]


def test_a_second_thread_does_not_probe_while_one_is():
    import threading

    seen = {}

    def other():
        with LoopProbe() as probe:
            seen["active"] = probe.active

    with LoopProbe() as outer:
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert outer.active
    assert seen == {"active": False}
    with LoopProbe() as again:  # the lock was given back
        assert again.active


def test_the_callers_filters_still_decide_and_nothing_stays_installed():
    x = torch.randn(5, requires_grad=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message="from the user's backward")
        filters, show = list(warnings.filters), warnings.showwarning
        with LoopProbe() as probe:
            torch.autograd.grad(_Loud.apply(x), x, torch.ones(5))
        assert probe.active and warnings.filters == filters and warnings.showwarning is show
    assert seen == []


def test_the_callers_own_debug_flag_is_left_alone():
    x = torch.randn(12, dtype=torch.float64, requires_grad=True)
    torch._C._debug_only_display_vmap_fallback_warnings(True)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with LoopProbe() as probe:
                _batched_backward(_grid(x), x, 2)
        assert not probe.active and probe.loops == 0
        assert any("batching rule for aten::roll" in str(w.message) for w in seen)  # theirs to see
        assert torch._C._debug_only_are_vmap_fallback_warnings_enabled()
    finally:
        torch._C._debug_only_display_vmap_fallback_warnings(False)


def _table_knows_nothing(monkeypatch):
    """Every backward node unknown to the table (NOTE: [Loops read off the graph]): only a probe can tell."""
    from autojac._measure import engine_loops

    monkeypatch.setattr(engine_loops, "FALLBACKS", {})


def test_the_table_of_backward_nodes_matches_this_torch():
    """The committed table (benchmarks/fallback_table.py) against a probe on the installed torch: a stale
    table only costs speed, but a torch upgrade that adds or drops batching rules should show here."""
    from autojac._measure.engine_loops import backward_fallbacks

    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    cases = {
        "roll": lambda x: x.roll(1, 1),
        "cumsum": lambda x: x.cumsum(1),
        "tanh": torch.tanh,
        "rule-covered": lambda x: (x * x).sin().sum(1),
        "mixed": lambda x: torch.tanh(x.cumsum(0)).roll(1, 0) * x.exp(),
    }
    for name, fn in cases.items():
        y = fn(x)
        with LoopProbe() as probe:
            torch.autograd.grad(y, x, torch.randn(3, *y.shape, dtype=y.dtype), is_grads_batched=True)
        walked = backward_fallbacks([y])
        assert probe.active
        assert walked.fallbacks == probe.loops and not walked.unknown, (name, walked.fallbacks, probe.loops, probe.ops)
    assert backward_fallbacks([x.cumsum(1)]).looping == ["CumsumBackward0"]


def test_the_walk_names_what_the_table_does_not_know():
    from autojac._measure.engine_loops import backward_fallbacks

    x = torch.randn(8, dtype=torch.float64, requires_grad=True)
    walked = backward_fallbacks([_OldStyle.apply(x).tanh()])
    assert walked.fallbacks == 1 and walked.looping == ["TanhBackward0"] and walked.unknown == ["_OldStyleBackward"]
    assert walked.nodes == 3  # tanh, the custom Function, the leaf's AccumulateGrad


def test_a_first_call_puts_the_torch_func_engine_first_when_the_table_says_autograd_would_loop(monkeypatch):
    monkeypatch.setattr(first_call, "LOOP_SECONDS_PER_VECTOR", 1.0)  # any loop counts: the decision, not the timing
    for n in (16, 128):  # below and over PROBE_MIN_PASSES: the table needs no probe either way
        x = torch.randn(n, dtype=torch.float64)
        f = lambda x: _grid(x)  # noqa: E731 - a new function object: a new plan
        want = reference(f, x)
        # Dense only: on a loaded machine the grid's first call looked for its structure (timing decides) and
        # pushed 4 compressed rows.
        torch.testing.assert_close(autojac.jacobian(f, x, sparsity=None), want)
        r = autojac.last_report()
        assert r.method == "reverse/vmap [func]" and r.evaluations == 2 and r.verified
        assert sum(r.chunk_sizes) == n, r  # no probe rows: the torch.func engine pushes every row
        p = autojac.plan(f, x, sparsity=None)
        assert "reverse/vmap [func] went first: torch.autograd's vmap would loop over the chunk for RollBackward0" in str(p)
        assert p.entry.facts.autograd_loops == 2
        for _ in range(6):  # the autograd engine stays a candidate that later calls measure; every answer is right
            torch.testing.assert_close(autojac.jacobian(f, x), want)


def test_the_table_prices_loops_against_the_graphs_size():
    # One tanh_backward fallback over 16 rows (about 50 us) is cheaper than the torch.func engine's set-up:
    # the autograd engine stays first, and knows it loops.
    x = torch.randn(16, dtype=torch.float64)
    W = torch.randn(16, 16, dtype=torch.float64)
    f = lambda x: torch.tanh(x @ W.T)  # noqa: E731
    torch.testing.assert_close(autojac.jacobian(f, x), reference(f, x))
    assert autojac.last_report().method == "reverse/vmap [autograd]" and autojac.last_report().evaluations == 1
    assert autojac.plan(f, x).entry.facts.autograd_loops == 1


def test_a_probe_counts_the_loops_of_nodes_the_table_does_not_know(monkeypatch):
    _table_knows_nothing(monkeypatch)
    monkeypatch.setattr(first_call, "LOOP_SECONDS_PER_VECTOR", 1.0)
    x = torch.randn(128, dtype=torch.float64)
    f = lambda x: _grid(x)  # noqa: E731
    want = reference(f, x)
    torch.testing.assert_close(autojac.jacobian(f, x), want)
    r = autojac.last_report()
    assert r.method == "reverse/vmap [func]" and r.evaluations == 2 and r.verified
    # The probe's 8 rows (torch.autograd's engine) are the answer's first rows: the torch.func engine pushes the
    # rest (NOTE: [The probe's rows are kept]), and the whole is checked and right.
    assert sum(r.chunk_sizes) == 128 - first_call.PROBE_VECTORS, r
    p = autojac.plan(f, x)
    assert "reverse/vmap [func] went first: torch.autograd's vmap loops over the chunk for aten::roll" in str(p)
    for _ in range(6):
        torch.testing.assert_close(autojac.jacobian(f, x), want)


def test_no_probe_without_loops_below_the_row_count_or_when_f_may_run_only_once(monkeypatch):
    _table_knows_nothing(monkeypatch)
    monkeypatch.setattr(first_call, "LOOP_SECONDS_PER_VECTOR", 1.0)
    # Loops counted only: the probe's timing alone (its 8 vectors against a VJP, loop-like when a busy machine
    # slows the batched pass) can also put torch.func first; the likely cause of this test's one failure in a
    # full run (not reproduced alone, nor beside a CPU hog).
    monkeypatch.setattr(first_call, "LOOP_LIKE", float("inf"))
    x = torch.randn(128, dtype=torch.float64)
    W = torch.randn(128, 128, dtype=torch.float64)
    g = lambda x: torch.exp(x @ W.T / 10) * x  # noqa: E731 - batching rules for every op of its backward
    torch.testing.assert_close(autojac.jacobian(g, x), reference(g, x))
    assert autojac.last_report().method == "reverse/vmap [autograd]"
    assert autojac.last_report().evaluations == 1
    assert sum(autojac.last_report().chunk_sizes) == 128 - first_call.PROBE_VECTORS  # the probe's rows are kept
    # Under create_graph the probe's rows (pushed without a graph) are not kept: every row is differentiable.
    x2 = x.clone().requires_grad_()
    got = autojac.jacobian(g, x2, create_graph=True)
    assert sum(autojac.last_report().chunk_sizes) == 128 and got.requires_grad
    torch.testing.assert_close(got.detach(), reference(g, x))

    small = torch.randn(64, dtype=torch.float64)
    f = lambda x: _grid(x)  # noqa: E731 - loops the table cannot see, but 64 rows do not pay for a probe
    torch.testing.assert_close(autojac.jacobian(f, small), reference(f, small))
    assert autojac.last_report().method == "reverse/vmap [autograd]"

    drop = torch.nn.Dropout(0.5).train()
    h = lambda x: drop(_grid(x))  # noqa: E731 - random: one evaluation per call, so no second engine
    torch.manual_seed(0)
    got = autojac.jacobian(h, x)
    assert autojac.last_report().method == "reverse/vmap [autograd]" and autojac.last_report().evaluations == 1
    torch.manual_seed(0)
    torch.testing.assert_close(got, reference(h, x))


class _OldStyle(torch.autograd.Function):
    """No setup_context: torch.func refuses it, torch.autograd runs it (and loops on its backward's roll)."""

    @staticmethod
    def forward(ctx, x):
        return x.roll(-1, 0) * 3

    @staticmethod
    def backward(ctx, g):
        return g.roll(1, 0) * 3


def test_the_autograd_engine_answers_when_the_torch_func_one_cannot_run_f(monkeypatch):
    monkeypatch.setattr(first_call, "LOOP_SECONDS_PER_VECTOR", 1.0)
    x = torch.randn(128, dtype=torch.float64)
    f = lambda x: _OldStyle.apply(x) + x**2  # noqa: E731
    torch.testing.assert_close(autojac.jacobian(f, x), reference(f, x))
    r = autojac.last_report()
    assert r.method == "reverse/vmap [autograd]" and r.verified
    assert "reverse/vmap [func]" in str(autojac.plan(f, x)).split("Failed:")[-1]


def test_no_probe_under_a_callers_budget(monkeypatch):
    monkeypatch.setattr(first_call, "LOOP_SECONDS_PER_VECTOR", 1.0)
    x = torch.randn(128, dtype=torch.float64)
    f = lambda x: _grid(x)  # noqa: E731
    torch.testing.assert_close(autojac.jacobian(f, x, memory_budget="256 MiB"), reference(f, x))
    assert autojac.last_report().method == "reverse/vmap [autograd]"


def test_a_batching_rule_no_faster_than_a_loop_puts_the_torch_func_engine_first(monkeypatch):
    # torch.autograd's vmap runs the backward of `W @ x` as one bmm over 512 copies of W, each read whole:
    # slower per vector than a plain VJP, though no op falls back to a loop (measured 265 ms against 12.5 ms
    # for torch.func.jacrev on the 2-core CPU). Eight probe vectors show it.
    W = torch.randn(512, 512, dtype=torch.float64) / 512**0.5
    x = torch.randn(512, dtype=torch.float64)
    f = lambda x: torch.tanh(W @ x)  # noqa: E731
    _table_knows_nothing(monkeypatch)  # the probe's own pricing (the table knows mv's and tanh's loops)
    want = reference(f, x)  # also runs these kernels once: a process's first VJP of them can be several times slower
    # The decision compares two timings of one sample each (the check's reference VJP, 50 us here, and the
    # probe's 8 vectors); a scheduler hiccup on one of them can flip it, so up to three fresh plans are made
    # and one must decide right (each answer is checked all the same).
    for _ in range(3):
        autojac.clear_cache()
        torch.testing.assert_close(autojac.jacobian(f, x), want)
        if autojac.last_report().method == "reverse/vmap [func]":
            break
    assert autojac.last_report().method == "reverse/vmap [func]", str(autojac.plan(f, x))
    # the reason given: the batching rule's pace, or (where tanh_backward's fallback is counted) the loop's
    # cost as the probe's vectors beyond the first measured it
    assert "no faster than a loop" in str(autojac.plan(f, x)) or "loops over the chunk" in str(autojac.plan(f, x))
    torch.testing.assert_close(autojac.jacobian(f, x), want)


def test_counted_loops_are_priced_at_what_the_probe_measured(monkeypatch):
    """A counted loop costs what the probe's vectors beyond the first took, where that is more than a call is
    assumed to cost (set to 0.1 us here): one looped op a vector that measured 140 us a vector beyond the first
    (the torch.func engine is expected at 60 us, a fifth of the 300 us VJP) puts the torch.func engine first,
    though that pace stays under half a plain VJP (not loop-like by timing alone) and the assumed cost would
    price the loops at 51 us, under the torch.func engine's set-up."""
    class OneLoop:
        loops, ops, active = 1, ["aten::tanh_backward"], True

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    clock = {"t": 0.0}
    _table_knows_nothing(monkeypatch)
    monkeypatch.setattr(first_call, "LOOP_SECONDS_PER_VECTOR", 0.1e-6)  # the count alone would not decide
    monkeypatch.setattr(first_call, "LoopProbe", OneLoop)
    monkeypatch.setattr(first_call, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))  # the first call's clock only

    def vjp(*args, batched=False, **kwargs):  # 8 vectors: a 300 us fixed part, then 140 us each beyond the first
        clock["t"] += 300e-6 + 7 * 140e-6
        return None

    monkeypatch.setattr(first_call, "vjp", vjp)
    x = torch.randn(512, dtype=torch.float64)
    W = torch.randn(512, 512, dtype=torch.float64)
    graph = evaluate_plain(lambda v: torch.tanh(W @ v), (x,), False)
    problem = Problem(inputs=Signature(((512,),), (torch.float64,), torch.device("cpu"), None),
                      out_shapes=((512,),), out_dtypes=(torch.float64,), out_spec=None, draws_random=False)
    entry = PlanEntry(problem, Options(), 1 << 30, 0, Facts(512, 512, 1e-4, 300e-6), choose.allowed(Options(), False), False)
    chain = choose.first_chain(Options(), 512, 512, False)
    assert chain[0].name == "reverse/vmap [autograd]"
    got = first_call._engine_by_probe(chain, problem, graph, entry, 1e-4)
    assert got[0].name == "reverse/vmap [func]", [m.name for m in got]
    assert "loops over the chunk for aten::tanh_backward" in entry.events[-1]



def _stencil_maker(k: int):
    return lambda u: u.roll(1) + u.roll(-1) - k * u + u ** 3  # a new function object: a first call each time


def test_threads_computing_first_jacobians_show_no_loop_warnings(monkeypatch):
    """NOTE: [Batched backwards wait for an open loop probe]: one thread's probe turns torch's global debug flag
    on; another thread's batched backward (its `roll` loops) warned meanwhile, and the warning reached the
    user's display after the probe had closed. autojac's own batched backward passes now wait for an open
    probe, and a probe waits for none: no such warning gets through, and every Jacobian is right."""
    from autojac._measure import engine_loops

    if engine_loops._FLAG is None:
        pytest.skip("this torch has no vmap fallback debug flag: nothing is probed")
    opened = []
    real_open = engine_loops.open_probe

    def counting_open() -> bool:
        got = real_open()
        opened.append(got)
        return got

    monkeypatch.setattr(engine_loops, "open_probe", counting_open)
    _table_knows_nothing(monkeypatch)  # every first call probes
    us = [torch.randn(1024, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for step in range(4):
                results[i, step] = autojac.jacobian(_stencil_maker(2 + step), us[i], sparsity=None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert any(opened)  # probes did open while the other threads ran
    assert not [w for w in shown if str(w.message).startswith(engine_loops._MARK)], [str(w.message)[:120] for w in shown]
    for (i, step), got in results.items():
        torch.testing.assert_close(got, reference(_stencil_maker(2 + step), us[i]))


@contextlib.contextmanager
def _pass_running_in_another_thread(gate):
    """Another thread inside a gated batched backward for the duration."""
    inside, leave = threading.Event(), threading.Event()

    def running() -> None:
        with gate.batched_backward():
            inside.set()
            leave.wait()

    t = threading.Thread(target=running)
    t.start()
    inside.wait()
    try:
        yield
    finally:
        leave.set()
        t.join()


def engine_loops_flag():
    from autojac._measure import engine_loops

    return engine_loops._FLAG


def test_the_gate_holds_other_threads_batched_backwards_while_a_probe_is_open(monkeypatch):
    from autojac._core import batched_gate as G

    order: list[str] = []
    started = threading.Event()

    def other() -> None:
        started.set()
        with G.batched_backward():
            order.append("other ran")

    assert G.open_probe()
    try:
        with G.batched_backward():  # the probing thread's own pass never waits
            order.append("own ran")
        t = threading.Thread(target=other)
        t.start()
        started.wait()
        t.join(0.2)
        assert t.is_alive() and order == ["own ran"]  # waiting for the probe to close
    finally:
        G.close_probe()
    t.join()
    assert order == ["own ran", "other ran"]
    # A probe does not open while another thread's pass is under way.
    with _pass_running_in_another_thread(G):
        assert not G.open_probe()
    assert G.open_probe()
    G.close_probe()
    # A pass waits at most WAIT_AT_MOST_SECONDS for a probe that never closes, then runs.
    monkeypatch.setattr(G, "WAIT_AT_MOST_SECONDS", 0.05)
    assert G.open_probe()
    try:
        t = threading.Thread(target=other)
        order.clear()
        t.start()
        t.join(5.0)
        assert not t.is_alive() and order == ["other ran"]
    finally:
        G.close_probe()
    # A LoopProbe that finds another thread's pass running opens nothing and holds no lock.
    with _pass_running_in_another_thread(G):
        with LoopProbe() as probe:
            assert not probe.active
        assert not G._owner
    with LoopProbe() as probe:  # the lock was released: the next probe opens
        assert probe.active == (engine_loops_flag() is not None)
