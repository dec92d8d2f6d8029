"""Functions without a backward: computed in forward mode and checked by Jacobian-vector products
(NOTE: [Checks by tangents]), against torch's forward-mode Jacobian and finite differences."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from reference import central_differences

import autojac
from autojac._execute import verify
from autojac._methods import forward as forward_methods


class ForwardOnlySin(torch.autograd.Function):
    """sin with a forward-mode formula and no backward (torch.func.jacfwd differentiates it, jacrev cannot)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return x.cos() * t

    @staticmethod
    def backward(ctx, g):
        raise NotImplementedError("no backward formula")


class NoDerivatives(ForwardOnlySin):
    """Neither a backward nor a jvp that works."""

    @staticmethod
    def jvp(ctx, t):
        raise NotImplementedError("no jvp formula")


W = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(DEVICE)


def g(t):
    return ForwardOnlySin.apply(t @ W.T) * t.flip(-1)


def torch_forward_jacobian(f, x):
    # torch.autograd.functional's forward mode (legacy vmap) cannot run this Function: torch.func's can.
    return torch.func.jacfwd(f, argnums=tuple(range(len(x))) if isinstance(x, tuple) else 0)(*(
        x if isinstance(x, tuple) else (x,)))


def x5(seed=1):
    return torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("options", [{}, {"mode": "forward"}, {"mode": "forward", "vectorize": "loop"},
                                     {"output": "sparse"}])
def test_a_function_without_backward_is_computed_in_forward_mode_and_checked(options):
    x = x5()
    want = torch_forward_jacobian(g, x)
    torch.testing.assert_close(want.cpu(), central_differences(lambda t: g(t.to(DEVICE)).cpu(), x.cpu()),
                               rtol=1e-6, atol=1e-8)
    for _ in range(12):  # the first call, then calls of its plan (and its trials)
        got = autojac.jacobian(g, x, **options)
        got = got.to_dense() if got.layout != torch.strided else got
        torch.testing.assert_close(got, want)
        assert autojac.last_report().method.startswith("forward/")
    plan = autojac.plan(g, x, **options)
    assert plan.problem.tangent_checks and "checked by Jacobian-vector products" in str(plan)


def test_a_new_closure_each_step_keeps_its_plan_and_its_checks_by_tangents():
    x = x5()
    for step in range(8):
        shift = torch.full((5,), float(step), dtype=torch.float64, device=DEVICE)
        f = lambda t, s=shift: g(t) - s  # noqa: E731  (a new function object each step)
        torch.testing.assert_close(autojac.jacobian(f, x), torch_forward_jacobian(f, x))
        assert autojac.last_report().planned == (step == 0)


def test_inputs_and_outputs_of_other_dtypes_are_checked_by_tangents():
    a = torch.randn(4, device=DEVICE)
    b = torch.randn(3, dtype=torch.float64, device=DEVICE)

    def f(a, b):
        return ForwardOnlySin.apply(a).double()[:3] * b, ForwardOnlySin.apply(b).float().sum(0, keepdim=True) * a
    got = autojac.jacobian(f, (a, b))
    want = torch_forward_jacobian(f, (a, b))
    for got_row, want_row in zip(got, want):  # blocks in their input's dtype (torch.autograd.functional's rule)
        for block, expected, x in zip(got_row, want_row, (a, b)):
            assert block.dtype == x.dtype
            torch.testing.assert_close(block, expected.to(x.dtype))


def test_a_wrong_forward_method_fails_the_check_and_the_next_one_answers(monkeypatch):
    x = x5()
    real = forward_methods.ForwardVmap.chunk

    def wrong(self, state, basis):  # column 1 off by 10%: only the check can tell
        parts = real(self, state, basis)
        return tuple(p * torch.tensor([1.0, 1.1, 1.0, 1.0, 1.0], dtype=p.dtype, device=p.device).view(-1, 1)
                     [: p.shape[0]] for p in parts)
    monkeypatch.setattr(forward_methods.ForwardVmap, "chunk", wrong)
    torch.testing.assert_close(autojac.jacobian(g, x, mode="forward"), torch_forward_jacobian(g, x))
    report = autojac.last_report()
    assert report.method != "forward/vmap" and any("forward/vmap failed" in e for e in report.events)


def test_the_check_by_tangents_weighs_small_columns_alike():
    # Column 0 is 1e9 times the others in every row: an error of 10% in column 3 hides under its share of the
    # tolerance, unless the check runs again with the columns weighed alike.
    def h(t):
        return ForwardOnlySin.apply(t[:1] * 1e9) + ForwardOnlySin.apply(t)

    x = x5()
    plan = autojac.plan(h, x)  # a first call in forward mode, checked by tangents
    problem = plan.problem
    right = torch_forward_jacobian(h, x)
    call = autojac._api.jacobian.session.Call(
        autojac._core.evaluation.Evaluator(h, x.device, ()), (x,), problem.inputs, plan.entry.options, "jacobian")
    products = call.references(problem)
    verify.check("right", right, problem, products)  # passes
    wrong = right.clone()
    wrong[:, 3] *= 1.1
    # The random tangents alone miss it ...
    v = verify.check_vectors(problem)
    transposed = verify._Transposed(problem, torch.float64)
    verify.check_against("wrong", wrong, v, products(v), transposed, verify._transposed(verify.blocks_of(wrong, problem)))
    # ... the check as a whole does not.
    with pytest.raises(verify.VerificationError, match="Jacobian-vector product"):
        verify.check("wrong", wrong, problem, products)


def test_without_backward_and_forward_formulas_it_is_refused_naming_both():
    with pytest.raises(autojac.UnsupportedFunctionError, match="neither a backward that works") as info:
        autojac.jacobian(lambda t: NoDerivatives.apply(t) * 2, x5())
    assert "no backward formula" in str(info.value) and "no jvp formula" in str(info.value)


def test_a_mode_that_needs_the_backward_says_to_use_forward_mode():
    for mode in ("reverse", "forward-trick"):
        with pytest.raises(autojac.UnsupportedFunctionError, match="mode='forward' or 'auto' computes"):
            autojac.jacobian(g, x5(), mode=mode)


def test_batch_jacobian_says_its_independence_check_needs_a_backward():
    X = torch.randn(4, 5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(autojac.UnsupportedFunctionError, match="independence with vector-Jacobian products"):
        autojac.batch_jacobian(lambda t: ForwardOnlySin.apply(t) * 2, X)


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("factor, size", [(1.001, 1.0), (-1.0, 1e6), (2.0, 1e6)])
def test_inputs_of_other_dtypes_are_checked_apart(monkeypatch, low, factor, size):
    # One product summed every input's blocks and was compared in the coarsest dtype: a float64 input's columns
    # were judged at float16's tolerance (6%), and past 65504 both sides were inf, judged nowhere.
    a = torch.randn(4, device=DEVICE).to(low)
    b = torch.randn(6, dtype=torch.float64, device=DEVICE)

    def f(a, b):
        return size * ForwardOnlySin.apply(b) + a.double().sum(-1, keepdim=True)
    real = forward_methods.ForwardVmap.chunk

    def wrong(self, state, basis):  # the float64 input's columns (the last 6 of 10) off by `factor`
        parts = real(self, state, basis)
        k, start = basis[0].shape[0], 10 - basis[0].shape[0]
        rows = torch.tensor([factor if start + r >= 4 else 1.0 for r in range(k)], dtype=torch.float64,
                            device=DEVICE)
        return tuple(p * rows.to(p.dtype).view(-1, *([1] * (p.dim() - 1))) for p in parts)
    monkeypatch.setattr(forward_methods.ForwardVmap, "chunk", wrong)
    got = autojac.jacobian(f, (a, b), mode="forward")
    want = torch_forward_jacobian(f, (a, b))
    torch.testing.assert_close(got[1], want[1].to(got[1].dtype))
    assert autojac.last_report().method != "forward/vmap"


def test_a_loaded_plan_keeps_its_checks_by_tangents(tmp_path):
    x = x5()
    autojac.jacobian(g, x)
    assert autojac.save_plans(tmp_path / "plans.json") == 1
    autojac.clear_cache()
    assert autojac.load_plans(tmp_path / "plans.json") == 1
    for _ in range(3):
        torch.testing.assert_close(autojac.jacobian(g, x), torch_forward_jacobian(g, x))
    assert autojac.plan(g, x).problem.tangent_checks


def test_a_plan_made_before_its_check_failed_is_made_again():
    # An estimate runs no check, nor does a first call that starts on torch's own loop: the VJP fails later.
    x = torch.randn(3, dtype=torch.float64, device=DEVICE)
    h = lambda t: ForwardOnlySin.apply(t) * t.flip(0)  # noqa: E731
    estimate = autojac.plan(h, x, effort="estimate")
    assert not estimate.problem.tangent_checks
    for _ in range(3):
        torch.testing.assert_close(autojac.jacobian(h, x), torch_forward_jacobian(h, x))
    assert autojac.plan(h, x).problem.tangent_checks
    with pytest.raises(autojac.PlanMismatchError, match="Make a new plan"):
        autojac.jacobian(h, x, plan=estimate)


def test_strict_says_it_needs_a_backward():
    with pytest.raises(autojac.UnsupportedFunctionError, match="Pass strict=False"):
        autojac.jacobian(g, x5(), strict=True)
