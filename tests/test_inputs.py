"""Bad input gets a clear autojac error before any work; odd but valid input gets the right answer."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE
from reference import reference

import autojac


def x64(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE)


def test_non_tensor_input_is_a_type_error():
    with pytest.raises(autojac.InputTypeError, match=r"`inputs\[0\]\[0\]` must be a torch.Tensor, but got float"):
        autojac.jacobian(torch.sin, [[1.0, 2.0]])  # a list is one argument, a structure whose leaves must be tensors
    with pytest.raises(autojac.InputTypeError, match=r"`inputs\[1\]` must be a torch.Tensor, but got str"):
        autojac.jacobian(torch.add, (x64(2), "y"))
    with pytest.raises(TypeError):  # also the builtin
        autojac.jacobian(torch.sin, 3.0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_and_bool_inputs_are_refused(dtype):
    with pytest.raises(autojac.InputTypeError, match="floating-point"):
        autojac.jacobian(lambda x: x * 2, torch.ones(3, dtype=dtype, device=DEVICE))


def test_complex_inputs_are_refused_with_advice():
    with pytest.raises(autojac.InputTypeError, match="view_as_real"):
        autojac.jacobian(lambda x: x * 2, torch.ones(3, dtype=torch.complex64, device=DEVICE))


def test_complex_output_is_refused():
    with pytest.raises(autojac.InputTypeError, match="real floating-point"):
        autojac.jacobian(lambda x: x * 1j, x64(3))


def test_empty_input_gives_empty_jacobian_of_the_right_shape():
    x = torch.empty(0, 3, dtype=torch.float64, device=DEVICE)
    got = autojac.jacobian(lambda x: x.sum(0), x)
    assert got.shape == (3, 0, 3)
    got = autojac.jacobian(lambda x: x * 2, x)
    assert got.shape == (0, 3, 0, 3)


def test_empty_output_gives_empty_jacobian():
    x = x64(4)
    got = autojac.jacobian(lambda x: x[:0] * 2, x)
    assert got.shape == (0, 4) and got.dtype == torch.float64  # torch's own jacobian raises here


def test_zero_dim_input_and_output():
    s = torch.tensor(1.3, dtype=torch.float64, device=DEVICE)
    got = autojac.jacobian(lambda s: s.sin() * s, s)
    assert got.shape == ()
    torch.testing.assert_close(got, torch.cos(s) * s + torch.sin(s))


@pytest.mark.parametrize("bad", [None, 3.0, "y", [torch.ones(2), "z"]])
def test_f_returning_a_non_tensor_is_a_type_error(bad):
    with pytest.raises(autojac.InputTypeError, match="must be a torch.Tensor|must return"):
        autojac.jacobian(lambda x: bad, x64(2))


def test_f_returning_an_integer_tensor_is_refused():
    with pytest.raises(autojac.InputTypeError, match="floating-point"):
        autojac.jacobian(lambda x: x.argmax(), x64(3))


class Boom(Exception):
    pass


def test_f_raising_propagates_its_own_exception_unchanged():
    def f(x):
        raise Boom("from f")

    with pytest.raises(Boom, match="from f"):
        autojac.jacobian(f, x64(2))


@pytest.mark.parametrize("kw, match", [
    ({"mode": "backward"}, "`mode` must be one of"),
    ({"vectorize": "batch"}, "`vectorize` must be one of"),
    ({"chunk_size": 0}, "positive int"),
    ({"chunk_size": -3}, "positive int"),
    ({"chunk_size": 2.0}, "must be None or a positive int"),
    ({"chunk_size": True}, "must be None or a positive int"),
])
def test_bad_options_are_refused_before_f_runs(kw, match):
    calls = []

    def f(x):
        calls.append(1)
        return x

    with pytest.raises(autojac.AutojacError, match=match):
        autojac.jacobian(f, x64(2), **kw)
    assert calls == []


def test_non_callable_f():
    with pytest.raises(autojac.InputTypeError, match="must be callable"):
        autojac.jacobian(3, x64(2))


def test_empty_tuple_of_inputs():
    with pytest.raises(autojac.InputError, match="at least one tensor"):
        autojac.jacobian(lambda: torch.ones(1), ())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_inputs_on_different_devices():
    with pytest.raises(autojac.InputError, match="one device"):
        autojac.jacobian(lambda a, b: a, (torch.ones(2), torch.ones(2, device="cuda")))


def test_inputs_on_different_devices_with_meta():
    # A meta tensor stands in for a second device where no GPU exists.
    with pytest.raises(autojac.InputError, match="one device, but got inputs on cpu, meta"):
        autojac.jacobian(lambda a, b: a, (torch.ones(2), torch.ones(2, device="meta")))


@pytest.mark.parametrize("mode", ["reverse", "forward", "forward-trick", "auto"])
def test_nan_and_inf_propagate(mode):
    x = torch.tensor([1.0, math.nan, math.inf, 2.0], dtype=torch.float64, device=DEVICE)
    got = autojac.jacobian(lambda x: x * x, x, mode=mode)
    want = reference(lambda x: x * x, x)
    # Where a NaN lands off the diagonal depends on the mode (0 * nan in a row or a column),
    # so compare the diagonal and the block of finite inputs.
    torch.testing.assert_close(got.diagonal(), want.diagonal(), equal_nan=True)
    finite = [0, 3]
    torch.testing.assert_close(got[finite][:, finite], want[finite][:, finite])


@pytest.mark.parametrize("mode", ["reverse", "forward", "forward-trick"])
@pytest.mark.parametrize("vectorize", ["vmap", "repeat", "loop"])
def test_user_tensors_are_never_modified(mode, vectorize):
    x = x64(5)
    x.requires_grad_()
    before = x.detach().clone()
    autojac.jacobian(lambda t: t.exp() * 3, x, mode=mode, vectorize=vectorize, chunk_size=2)
    assert torch.equal(x.detach(), before)
    assert x.grad is None


def test_a_function_that_writes_into_its_input_cannot_change_the_users_tensor():
    x = x64(3)
    before = x.clone()

    def f(t):
        t.mul_(2)  # in place on what it was given
        return t

    for vectorize in ("vmap", "repeat", "loop"):
        try:
            autojac.jacobian(f, x, mode="reverse", vectorize=vectorize)
        except autojac.UnsupportedFunctionError:  # autograd refuses in-place on a leaf that requires grad
            pass
        assert torch.equal(x, before)


def test_module_parameters_are_not_differentiated_or_modified():
    net = torch.nn.Linear(3, 2).double().to(DEVICE)
    params = [p.detach().clone() for p in net.parameters()]
    x = x64(3)
    got = autojac.jacobian(net, x)
    torch.testing.assert_close(got, net.weight.detach())
    for p, before in zip(net.parameters(), params):
        assert torch.equal(p.detach(), before)
        assert p.grad is None


@pytest.mark.parametrize("mode", ["reverse", "forward", "forward-trick"])
@pytest.mark.parametrize("vectorize", ["vmap", "repeat", "loop"])
def test_module_jacobian_carries_no_graph_to_the_parameters(mode, vectorize):
    # A graph back to the weights would keep every chunk's intermediates alive (see grad_mode).
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).double().to(DEVICE)
    got = autojac.jacobian(net, x64(6), mode=mode, vectorize=vectorize, chunk_size=2)
    assert not got.requires_grad and got.grad_fn is None



@pytest.mark.parametrize("mode", ["reverse", "forward", "forward-trick", "auto"])
@pytest.mark.parametrize("vectorize", ["vmap", "repeat", "loop"])
def test_an_expanded_input_is_differentiated_in_every_mode(mode, vectorize):
    # Elements sharing memory (stride 0): forward-mode AD cannot lay a tangent out like such a primal, and
    # torch.func.jacfwd fails on it; autojac differentiates a copy, the user's tensor untouched.
    x = torch.randn(1, dtype=torch.float64, device=DEVICE).expand(5)
    f = lambda t: t.cumsum(0) * t.sin()  # noqa: E731 - not batch-aware along dim 0: repeat must refuse it
    try:
        got = autojac.jacobian(f, x, mode=mode, vectorize=vectorize)
    except autojac.UnsupportedFunctionError:
        assert vectorize == "repeat"
        return
    torch.testing.assert_close(got, reference(f, x.contiguous()))
    assert x.stride() == (0,)


def test_an_expanded_input_keeps_the_callers_graph_in_forward_mode():
    w = torch.randn(1, dtype=torch.float64, device=DEVICE, requires_grad=True)
    x = w.expand(4)
    got = autojac.jacobian(lambda t: t * t.roll(1, 0), x, mode="forward", vectorize="vmap", create_graph=True)
    # J = d(t_i t_{i-1}) / dt_j at t = (w, w, w, w): w on the diagonal and on the roll's sub-diagonal band.
    want = w.detach() * (torch.eye(4, dtype=torch.float64, device=DEVICE) + torch.eye(4, dtype=torch.float64, device=DEVICE).roll(1, 0))
    torch.testing.assert_close(got.detach(), want)
    (g,) = torch.autograd.grad(got.sum(), w)
    torch.testing.assert_close(g, torch.full((1,), 8.0, dtype=torch.float64, device=DEVICE))


def test_an_overlapping_strided_input_is_differentiated_in_forward_mode():
    # as_strided with strides that do not nest: the 4 x 4 view's elements share 7 memory locations.
    base = torch.randn(7, dtype=torch.float64, device=DEVICE)
    x = base.as_strided((4, 4), (1, 1))
    f = lambda t: (t * t.roll(1, 1)).sum(1)  # noqa: E731
    got = autojac.jacobian(f, x, mode="forward", vectorize="vmap")
    torch.testing.assert_close(got, reference(f, x.contiguous()))
