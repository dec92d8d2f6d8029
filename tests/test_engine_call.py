"""`vjp` calls the autograd engine directly for plain tensors and goes through `torch.autograd.grad` for anything
else (NOTE: [The engine called as torch.autograd.grad calls it]); both give torch's products."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from autojac._methods import base
from autojac._methods.base import vjp

from conftest import DEVICE


def t64(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE)


def _graph():
    """Two outputs of two inputs, and a third input no output uses."""
    a, b, unused = (t64(3, seed=1).requires_grad_(), t64(2, 2, seed=2).requires_grad_(),
                    t64(4, seed=3).requires_grad_())
    y1 = torch.sin(a) * b.sum()
    y2 = (b @ b) * a[:2].prod()
    return (y1, y2), (a, b, unused)


def _torch_grads(ys, xs, vs, batched, create_graph=False):
    return torch.autograd.grad(ys, xs, vs, retain_graph=True, allow_unused=True, is_grads_batched=batched,
                               create_graph=create_graph)


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("batched", [False, True])
def test_the_direct_engine_call_gives_torchs_products(batched):
    ys, xs = _graph()
    k = 5
    vs = tuple(t64(*((k,) if batched else ()), *y.shape, seed=10 + i) for i, y in enumerate(ys))
    assert base._lean_fits(ys, xs, vs, batched)  # this test is about the direct path
    _same(vjp(ys, xs, vs, create_graph=False, batched=batched), _torch_grads(ys, xs, vs, batched))


@pytest.mark.parametrize("batched", [False, True])
def test_the_direct_engine_call_builds_a_graph_for_second_derivatives(batched):
    ys, xs = _graph()
    k = 3
    vs = tuple(t64(*((k,) if batched else ()), *y.shape, seed=20 + i) for i, y in enumerate(ys))
    got = vjp(ys, xs, vs, create_graph=True, batched=batched)
    want = _torch_grads(ys, xs, vs, batched, create_graph=True)
    assert got[0].requires_grad
    second = torch.autograd.grad(got[0].sum(), xs[0], retain_graph=True)[0]
    torch.testing.assert_close(second, torch.autograd.grad(want[0].sum(), xs[0], retain_graph=True)[0])


def test_cotangents_that_do_not_fit_the_outputs_go_through_grad_and_its_error():
    ys, xs = _graph()
    vs = (t64(4, seed=30), t64(2, 2, seed=31))  # the first output has 3 elements
    assert not base._lean_fits(ys, xs, vs, False)
    with pytest.raises(RuntimeError, match="shape"):
        vjp(ys, xs, vs, create_graph=False)
    wrong_dtype = (t64(3, seed=32).float(), t64(2, 2, seed=33))
    assert not base._lean_fits(ys, xs, wrong_dtype, False)
    _same(vjp(ys, xs, wrong_dtype, create_graph=False), _torch_grads(ys, xs, wrong_dtype, False))


def test_a_torch_function_mode_sees_the_call_as_torch_autograd_grad():
    # A mode (or a tensor subclass) overriding __torch_function__ is shown `torch.autograd.grad` as before.
    seen = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    ys, xs = _graph()
    vs = tuple(t64(2, *y.shape, seed=40 + i) for i, y in enumerate(ys))
    with Watch():
        got = vjp(ys, xs, vs, create_graph=False, batched=True)
    assert "grad" in seen
    _same(got, _torch_grads(ys, xs, vs, True))


def test_torch_without_the_engine_entry_point_uses_grad(monkeypatch):
    monkeypatch.setattr(base, "_engine_run_backward", None)
    ys, xs = _graph()
    vs = tuple(t64(4, *y.shape, seed=50 + i) for i, y in enumerate(ys))
    assert not base._lean_fits(ys, xs, vs, True)
    _same(vjp(ys, xs, vs, create_graph=False, batched=True), _torch_grads(ys, xs, vs, True))
