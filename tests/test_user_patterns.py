"""A sparsity pattern you give, and a plan you pass: what was checked on one point or one function must not be
trusted on another (NOTE: [A pattern you gave is confirmed])."""

from __future__ import annotations

import pytest
import torch

import autojac

N = 120


def _two_dense_columns(x):
    return torch.tanh(x) + x[0] * x[1] * torch.ones_like(x)


@pytest.mark.parametrize("options", [{}, {"output": "csr"}, {"mode": "forward"}], ids=["dense", "csr", "forward"])
def test_a_pattern_right_only_where_it_was_checked_is_not_trusted_elsewhere(options):
    """Columns 0 and 1 are dense but vanish at x = 0, where the diagonal pattern passes its check."""
    autojac.clear_cache()
    pattern = torch.eye(N, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    for i in range(12):
        x = torch.zeros(N, dtype=torch.float64) if i < 3 else torch.randn(N, dtype=torch.float64, generator=gen)
        got = autojac.jacobian(_two_dense_columns, x, sparsity=pattern, **options)
        got = got.to_dense() if got.layout != torch.strided else got
        torch.testing.assert_close(got, torch.autograd.functional.jacobian(_two_dense_columns, x))


def test_a_pattern_you_gave_is_confirmed_by_a_trace_and_then_not_checked():
    f = lambda x: torch.sin(x) * x.roll(1, 0)  # noqa: E731
    x = torch.randn(N, dtype=torch.float64)
    pattern = autojac.sparsity(f, x).to_dense()
    autojac.clear_cache()
    want = torch.autograd.functional.jacobian(f, x)
    torch.testing.assert_close(autojac.jacobian(f, x, sparsity=pattern), want)
    assert autojac.last_report().verified  # the first call: checked
    torch.testing.assert_close(autojac.jacobian(f, x, sparsity=pattern), want)  # the second: traced, confirmed
    events = list(autojac.plan(f, x, sparsity=pattern).entry.events)
    assert any("pattern confirmed on fake tensors" in e for e in events), events
    torch.testing.assert_close(autojac.jacobian(f, x, sparsity=pattern), want)
    assert not autojac.last_report().verified


def test_a_plan_passed_for_another_function_is_checked_on_it():
    f = lambda x: torch.sin(x) * x  # noqa: E731
    g = lambda x: torch.sin(x) * x.roll(1, 0)  # noqa: E731 - the same shapes, one more diagonal
    x = torch.randn(N, dtype=torch.float64)
    p = autojac.plan(f, x, sparsity=autojac.sparsity(f, x).to_dense())
    for _ in range(3):
        x = torch.randn(N, dtype=torch.float64)
        torch.testing.assert_close(autojac.jacobian(g, x, plan=p), torch.autograd.functional.jacobian(g, x))
