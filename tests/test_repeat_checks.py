"""The safety net around the repeat trick: an `f` that is not batch-aware must never be answered wrongly."""

from __future__ import annotations

import pytest
import torch

import autojac

from reference import reference


def _grid(x: torch.Tensor) -> torch.Tensor:
    """A periodic stencil built from `roll` over the first dimension: not batch-aware."""
    return x.roll(1, 0) + x.roll(-1, 0) - 2 * x + 0.1 * x**3


def test_a_repeat_method_is_checked_at_every_chunk_size_it_runs():
    """A roll over the first dimension is not batch-aware: through 64 copies of a 64-element input it gives
    the right Jacobian by coincidence, through 16 a wrong one. Each call must still be right."""
    x = torch.randn(64, dtype=torch.float64)
    f = lambda x: _grid(x)  # noqa: E731
    want = reference(f, x)
    for _ in range(12):
        torch.testing.assert_close(autojac.jacobian(f, x, chunk_size=16), want)
    text = str(autojac.plan(f, x, chunk_size=16))
    assert "reverse/repeat" in text.split("Failed:")[-1]


def test_unchecked_sizes_are_those_no_verified_run_used():
    from autojac._planning.choose import BY_NAME
    from autojac._planning.entry import MethodStats

    s = MethodStats(BY_NAME["reverse/repeat"])
    s.checked_sizes.update([64])
    assert s.unchecked_sizes([16, 16]) and not s.unchecked_sizes([64])
    v = MethodStats(BY_NAME["reverse/vmap [func]"])
    assert not v.unchecked_sizes([16])  # vmap's result does not depend on the chunk size


def test_an_incumbent_repeat_method_is_checked_again_at_a_new_chunk_size(monkeypatch):
    """The incumbent runs at a chunk size no verified run used (here: its planned size changed): the call is
    checked, the wrong Jacobian is caught, and another method answers. Dense (`sparsity=None`) here and below:
    on a loaded machine the first call's timing can send the second call to look for structure (the grid is
    tridiagonal) and plan again, never reaching the trial these tests set up."""
    from autojac._planning.entry import PlanEntry

    x = torch.randn(64, dtype=torch.float64)
    f = lambda x: _grid(x)  # noqa: E731
    want = reference(f, x)
    autojac.jacobian(f, x, sparsity=None)
    entries = []
    original = PlanEntry.next_trial

    def capture(self):
        entries.append(self)
        return None  # no exploration: the incumbent runs

    monkeypatch.setattr(PlanEntry, "next_trial", capture)
    autojac.jacobian(f, x, sparsity=None)
    entry = entries[-1]
    s = entry.stats["reverse/repeat"]
    s.verified, s.status, s.checked_sizes, s.chunk_size = True, "chosen", {64}, 16
    s.runs.append(1e-3)
    entry.stats[entry.incumbent].status = "measured"
    entry.incumbent = "reverse/repeat"
    got = autojac.jacobian(f, x, sparsity=None)
    torch.testing.assert_close(got, want)
    assert autojac.last_report().method != "reverse/repeat"
    assert entry.stats["reverse/repeat"].status == "failed"
    monkeypatch.setattr(PlanEntry, "next_trial", original)


def test_a_stopped_trial_whose_slice_ran_at_a_new_chunk_size_is_checked(monkeypatch):
    """A repeat trial verified before at 64, now stopped after a slice of 16: the stitched Jacobian is checked."""
    from autojac._planning import choose
    from autojac._planning.entry import PlanEntry

    x = torch.randn(64, dtype=torch.float64)
    f = lambda x: _grid(x)  # noqa: E731
    want = reference(f, x)
    autojac.jacobian(f, x, sparsity=None)
    fired = []

    def once(self):
        if fired:
            return None
        fired.append(self)
        s = self.stats["reverse/repeat"]
        s.verified = True
        s.checked_sizes.add(64)  # as after a verified whole run at 64
        return choose.Trial(s.method, 16)

    monkeypatch.setattr(PlanEntry, "next_trial", once)
    monkeypatch.setattr(choose, "ABORT_PROJECTED", 0.0)  # the slice projects slow: stopped after it
    torch.testing.assert_close(autojac.jacobian(f, x, sparsity=None), want)
    assert fired and fired[0].stats["reverse/repeat"].status == "failed"


def test_a_function_not_batch_aware_is_found_out_even_at_a_point_where_its_jacobian_vanishes():
    """x * x[0] reads the first dimension as data: at x = 0 every Jacobian of it is zero, so a repeat trick
    checked there passed and was used at other points. It now runs on two different rows first."""
    f = lambda x: x * x[0]  # noqa: E731
    x0 = torch.zeros(6, dtype=torch.float64)
    for _ in range(30):
        autojac.jacobian(f, x0)
    assert "reverse/repeat" not in autojac.plan(f, x0).name
    x1 = torch.randn(6, dtype=torch.float64)
    for _ in range(5):
        torch.testing.assert_close(autojac.jacobian(f, x1), reference(f, x1))
    with pytest.raises(autojac.UnsupportedFunctionError, match="batch"):
        autojac.jacobian(lambda x: x * x[0], x0, mode="reverse", vectorize="repeat")
    # a batch-aware function passes the same check, at zeros too
    g = lambda x: torch.tanh(x) * x  # noqa: E731
    torch.testing.assert_close(autojac.jacobian(g, x0, mode="reverse", vectorize="repeat"), reference(g, x0))


def test_an_inf_in_the_reference_leaves_the_finite_elements_checked():
    """sqrt at 0 puts an Inf in the reference's element 3; the other elements must still be judged."""
    f = lambda x: x * x.sum(0) + x.sqrt()  # noqa: E731 - not batch-aware either
    x = torch.rand(8, dtype=torch.float64) + 0.5
    x[3] = 0
    from autojac._execute.verify import VerificationError, check_against

    want = reference(f, x)
    wrong = want.clone()
    wrong[0, 1] += 1.0
    problem = autojac.plan(f, x).problem
    w = (torch.randn(8, dtype=torch.float64),)
    ref = (w[0] @ torch.where(torch.isfinite(want), want, torch.full_like(want, float("inf"))),)
    with pytest.raises(VerificationError):
        check_against("test", wrong, w, ref, problem)
    elsewhere = torch.ones(8, 8, dtype=torch.bool)
    elsewhere[3, :] = elsewhere[:, 3] = False
    for mode in ["auto"] * 20 + ["forward", "forward-trick"]:  # and no call returns a wrong finite element
        got = autojac.jacobian(f, x, mode=mode)
        # Where 0 * inf lands depends on the mode the plan adopted (forward mode: row 3; torch's reverse loop:
        # column 3; a 16-core machine adopted a forward method here): every element finite in both must agree,
        # and nothing outside row and column 3 may be other than finite.
        both = torch.isfinite(want) & torch.isfinite(got)
        torch.testing.assert_close(got[both], want[both])
        assert torch.isfinite(got[elsewhere]).all()


def test_a_repeat_plan_is_checked_again_when_a_captured_weight_makes_f_mix_rows():
    """`y + m * y.roll(1, 0)` is batch-aware at m = 0 only. Closures with the same code share a plan, so a
    repeat method checked at m = 0 was used for m != 0 (errors up to 1.3, found by a second reader)."""
    torch.manual_seed(0)
    W = torch.randn(40, 60, dtype=torch.float64) / 5

    def make(m):
        def f(x):
            y = torch.tanh(x @ W)
            return y + m * y.roll(1, 0)
        return f

    refused = 0
    for i in range(30):
        m = torch.zeros(60, dtype=torch.float64) if i < 10 else torch.randn(60, dtype=torch.float64)
        f = make(m)
        x = torch.randn(8, 40, dtype=torch.float64)
        for options in ({}, {"mode": "reverse", "vectorize": "repeat"}):
            try:
                got = autojac.jacobian(f, x, **options)
            except autojac.UnsupportedFunctionError:  # asked for the repeat trick: refused, never answered
                assert options and i >= 10
                refused += 1
                continue
            torch.testing.assert_close(got, reference(f, x), msg=f"call {i} {options}")
    assert refused == 20


def test_a_repeat_plan_run_by_plan_is_checked_on_new_values_whatever_the_incumbent():
    """A `Plan` names the method it runs, which need not be its entry's incumbent now (later calls can switch
    it): new captured values are checked for the method that runs (found by a second reader: the check looked
    at the incumbent, a vmap method, and a repeat `plan=` call on a batch-mixing weight was answered wrongly)."""
    import dataclasses

    m = torch.zeros((), dtype=torch.float64)

    def f(x):
        y = torch.sin(x)
        return y + m * y.roll(1, 0)

    x = torch.randn(16, dtype=torch.float64)
    p = autojac.plan(f, x, mode="reverse")
    repeat = dataclasses.replace(p, vectorize="repeat", engine="")
    assert p.entry.stats[repeat.name].method.vectorize == "repeat" and p.entry.incumbent != repeat.name
    torch.testing.assert_close(autojac.jacobian(f, x, plan=repeat), reference(f, x))
    m.fill_(1.0)
    torch.testing.assert_close(autojac.jacobian(f, x, plan=repeat), reference(f, x))
    assert autojac.last_report().verified


def test_a_function_that_is_not_batch_aware_is_found_on_fake_rows_before_any_real_batched_run():
    """NOTE: [A batched trial must not run kernels that assert]: a gather through a captured permutation reads
    the permutation's entries along the stacked rows; on CUDA that indexing is a device-side assert that ends
    the process's CUDA use. Its batched shapes on fake tensors show it is not batch-aware first: `f` never
    runs on real stacked rows (checked on any device; the jacobian runs it on CUDA only, where the CPU's real
    check would otherwise have run)."""
    from conftest import DEVICE
    from torch._subclasses.fake_tensor import FakeTensor

    from autojac._core.errors import NotBatchAwareError
    from autojac._methods.base import _check_shapes_on_fake_rows

    g = torch.Generator().manual_seed(11)
    perm = torch.randperm(300, generator=g).to(DEVICE)
    w = torch.randn(300, generator=g, dtype=torch.float64).to(DEVICE)
    real_shapes = []

    def f(x):
        if not isinstance(x, FakeTensor):
            real_shapes.append(tuple(x.shape))
        return x[perm] * w

    x = torch.randn(300, generator=g, dtype=torch.float64).to(DEVICE)
    problem = autojac.plan(f, x, vectorize="vmap").problem
    with pytest.raises(NotBatchAwareError, match="leading batch dimension of 2"):
        _check_shapes_on_fake_rows(f, (torch.stack([x, x]),), problem)
    assert (2, 300) not in real_shapes, real_shapes
    if x.device.type == "cuda":
        with pytest.raises(autojac.UnsupportedFunctionError, match="leading batch dimension of 2"):
            autojac.jacobian(f, x, vectorize="repeat")
        assert (2, 300) not in real_shapes, real_shapes
    torch.testing.assert_close(autojac.jacobian(f, x), torch.func.jacfwd(f)(x))  # the planner's own choice


# --- NOTE: [Batch-aware at every point] --------------------------------------------------------------------

_A = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _ball(x: torch.Tensor) -> torch.Tensor:
    """Reduces over every copy (x.norm()), but the coupling term is zero while the joint norm is under 2."""
    return torch.sin(x @ _A.T) + torch.relu(x.norm() - 2.0) * x


def _on_sphere(radius: float, seed: int) -> torch.Tensor:
    x = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x / x.norm() * radius


def test_a_repeat_method_batch_aware_only_near_where_it_was_checked_is_still_checked_elsewhere():
    """Inside the ball the repeat trick is right and passes every check; a plan held to it (vectorize='repeat')
    must still check its calls, so that outside the ball the wrong Jacobian is caught, not returned."""
    f = lambda x: _ball(x)  # noqa: E731
    autojac.clear_cache()
    entry = None
    for i in range(60):  # inside: the repeat trick is right here, until the plan has traced `f` on two copies
        x = _on_sphere(1.0, i)
        torch.testing.assert_close(autojac.jacobian(f, x, vectorize="repeat"), reference(f, x))
        entry = entry or autojac.plan(f, x, vectorize="repeat").entry
        if any("not shown batch-aware" in e for e in entry.events):
            break
    assert any("not shown batch-aware" in e for e in entry.events), list(entry.events)
    assert entry.copies_values is None  # the trace on two copies saw the norm over both
    for i in range(4):  # outside: the copies' norm couples them
        x = _on_sphere(3.0, 10 + i)
        with pytest.raises(autojac.UnsupportedFunctionError):  # only repeat methods were allowed
            autojac.jacobian(f, x, vectorize="repeat")


def test_a_plan_that_settles_inside_the_ball_stays_right_outside_it():
    f = lambda x: _ball(x)  # noqa: E731
    for i in range(60):
        x = _on_sphere(1.0 if i < 40 else 3.0, i)
        torch.testing.assert_close(autojac.jacobian(f, x), reference(f, x))


def test_a_function_shown_batch_aware_everywhere_runs_the_repeat_trick_unchecked():
    """A trace on two copies ties each copy's outputs to its own inputs: from then on a repeat call on the
    same captured values evaluates `f` once and is not checked; before, each call was checked."""
    W = torch.randn(4, 4, dtype=torch.float64)
    f = lambda x: torch.tanh(x @ W).cumsum(-1)  # noqa: E731
    x = torch.randn(5, 4, dtype=torch.float64)
    want = reference(f, x)
    autojac.clear_cache()
    torch.testing.assert_close(autojac.jacobian(f, x, vectorize="repeat"), want)
    torch.testing.assert_close(autojac.jacobian(f, x, vectorize="repeat"), want)
    report = autojac.last_report()
    assert report.verified and report.evaluations == 2  # not shown yet: checked
    entry = autojac.plan(f, x, vectorize="repeat").entry
    for _ in range(40):
        torch.testing.assert_close(autojac.jacobian(f, x, vectorize="repeat"), want)
        if entry.copies_values is not None:
            break
    assert entry.copies_values is not None, list(entry.events)
    torch.testing.assert_close(autojac.jacobian(f, x, vectorize="repeat"), want)
    report = autojac.last_report()
    assert not report.verified and report.evaluations == 1
    W.add_(0.5)  # another weight: the trace held for the old one, the call is checked again
    torch.testing.assert_close(autojac.jacobian(f, x, vectorize="repeat"), reference(f, x))
    assert autojac.last_report().verified


@pytest.mark.parametrize("f, confirmed", [
    (lambda x: torch.tanh(x).cumsum(-1), True),
    (lambda x: (x * x.sum(-1, keepdim=True), x.pow(2).sum(-1)), True),
    (lambda x: x - x.mean(), False),
    (lambda x: x + 0.0 * x.roll(1, 0), False),
    (_ball, False),
    (lambda x: torch.sin(x) + x * torch.relu(x.detach().norm() - 2.0), False),  # coupled through a detached value
    (lambda x: x * torch.sign(x.sum()), False),  # through a piecewise-constant op
    (lambda x: torch.where(x > 0, x, 0.1 * x).cumsum(-1), True),  # a mask within each copy
    (lambda x: torch.nn.functional.dropout(x, 0.5, True), False),  # each copy would draw its own mask
], ids=["cumsum", "tuple-out", "mean", "roll0", "ball", "detached-norm", "sign-of-sum", "row-mask", "dropout"])
def test_the_trace_on_two_copies_tells_batch_aware_functions_from_the_others(f, confirmed):
    from autojac._core.problem import check_inputs, describe
    from autojac._planning.structure import copies_independent

    x = torch.randn(4, 3, dtype=torch.float64) if f is not _ball else _on_sphere(1.0, 0)
    x = x / x.norm() if f is not _ball else x  # inside the ball for the detached norm too
    xs, signature, _ = check_inputs(x)
    why = copies_independent(f, xs, describe(f, xs, signature), None)
    assert (why == "") == confirmed, why


def test_a_coupling_through_a_detached_value_is_not_taken_for_batch_awareness():
    """`x * relu(x.detach().norm() - 2)` has no derivative through the norm, but under the repeat trick the norm
    runs over every copy: a trace of derivatives alone showed the copies independent, and the repeat trick then
    ran unchecked and was wrong outside the ball."""
    f = lambda x: torch.sin(x @ _A.T) + x * torch.relu(x.detach().norm() - 2.0)  # noqa: E731
    autojac.clear_cache()
    entry = None
    for i in range(60):
        x = _on_sphere(1.0, i)
        torch.testing.assert_close(autojac.jacobian(f, x, vectorize="repeat"), reference(f, x))
        entry = entry or autojac.plan(f, x, vectorize="repeat").entry
        if any("batch-aware" in e for e in entry.events):
            break
    assert entry.copies_values is None, list(entry.events)
    with pytest.raises(autojac.UnsupportedFunctionError):
        autojac.jacobian(f, _on_sphere(3.0, 99), vectorize="repeat")
