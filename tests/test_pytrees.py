"""The torch.func user's habits: pytrees in and out, argnums, has_aux; against torch.func in float64."""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import DEVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils import _pytree

import autojac

Pair = collections.namedtuple("Pair", "first second")


def t64(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE)


def close(got, want):
    g_leaves, g_spec = _pytree.tree_flatten(got)
    w_leaves, w_spec = _pytree.tree_flatten(want)
    assert g_spec == w_spec, (g_spec, w_spec)
    for a, b in zip(g_leaves, w_leaves):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b)
        else:
            assert a == b


# A random structure of tensors, and a function of all its leaves into another random structure.
ARG_KINDS = ["tensor", "dict", "list", "pair", "nested"]
OUT_KINDS = ["tensor", "tuple", "dict", "list", "pair", "nested"]


def make_arg(kind: str, seed: int):
    if kind == "tensor":
        return t64(3, seed=seed)
    if kind == "dict":
        return {"w": t64(2, 2, seed=seed), "b": t64(2, seed=seed + 1)}
    if kind == "list":
        return [t64(2, seed=seed), t64((), seed=seed + 1)]
    if kind == "pair":
        return Pair(t64(3, seed=seed), t64(1, seed=seed + 1))
    return {"layer": [t64(2, seed=seed), Pair(t64(2, seed=seed + 1), t64(3, seed=seed + 2))]}


def make_f(out_kind: str, has_aux: bool):
    def f(*args):
        flat = torch.cat([leaf.reshape(-1) for leaf in _pytree.tree_leaves(args) if isinstance(leaf, torch.Tensor)])
        s = torch.sin(flat)
        a, b = s[:3] * flat.sum(), torch.tanh(flat[:2] * flat[-2:])
        out = {
            "tensor": a,
            "tuple": (a, b),
            "dict": {"a": a, "b": b.reshape(2, 1)},
            "list": [b, a],
            "pair": Pair(a, b),
            "nested": {"x": [a], "y": Pair(b, a * 2)},
        }[out_kind]
        return (out, {"norm": flat.norm()}) if has_aux else out
    return f


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    args=st.lists(st.sampled_from(ARG_KINDS), min_size=1, max_size=3),
    out_kind=st.sampled_from(OUT_KINDS),
    has_aux=st.booleans(),
    data=st.data(),
)
def test_pytrees_argnums_and_aux_match_torch_func(args, out_kind, has_aux, data):
    values = tuple(make_arg(kind, 10 * i) for i, kind in enumerate(args))
    choice = data.draw(st.sampled_from(["none", "int", "tuple"]))
    f = make_f(out_kind, has_aux)
    if choice == "none":
        argnums, inputs = None, values if len(values) > 1 or data.draw(st.booleans()) else values[0]
        func_argnums = tuple(range(len(values))) if isinstance(inputs, tuple) and type(inputs) is tuple else 0
        func_args = values if type(inputs) is tuple else (inputs,)
    elif choice == "int":
        argnums = data.draw(st.integers(0, len(values) - 1))
        inputs, func_argnums, func_args = values, argnums, values
    else:
        picked = data.draw(st.lists(st.integers(0, len(values) - 1), min_size=1, unique=True))
        argnums = tuple(picked)
        inputs, func_argnums, func_args = values, argnums, values
    mode = data.draw(st.sampled_from(["auto", "reverse", "forward", "forward-trick"]))
    want = torch.func.jacrev(f, argnums=func_argnums, has_aux=has_aux)(*func_args)
    got = autojac.jacobian(f, inputs, argnums=argnums, has_aux=has_aux, mode=mode)
    if has_aux:
        close(got[0], want[0])
        torch.testing.assert_close(got[1]["norm"], want[1]["norm"])
        assert not got[1]["norm"].requires_grad
    else:
        close(got, want)


def test_namedtuple_outputs_come_back_as_namedtuples():
    x = t64(3)
    got = autojac.jacobian(lambda x: Pair(x.sin(), x.cos().sum()), x)
    assert isinstance(got, Pair)
    torch.testing.assert_close(got.second, -x.sin())


def test_jacobian_with_respect_to_module_parameters():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double().to(DEVICE)
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = t64(5, 4)

    def model(p, x):
        return torch.func.functional_call(net, p, (x,))

    want = torch.func.jacrev(model)(params, x)
    got = autojac.jacobian(model, (params, x), argnums=0)
    close(got, want)
    assert set(got) == set(params) and got["0.weight"].shape == (5, 3, 8, 4)
    for _ in range(3):  # warm calls, and new dicts of the same shapes every step reuse the plan
        params = {k: v + 0.01 for k, v in params.items()}
        close(autojac.jacobian(model, (params, x), argnums=0), torch.func.jacrev(model)(params, x))
    assert not autojac.last_report().planned


def test_an_lstm_with_nested_outputs():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4).double().to(DEVICE)
    x = t64(5, 3)
    got = autojac.jacobian(lstm, x)
    # The reference is torch.autograd's plain loop over the flattened outputs: torch.func.jacrev cannot run
    # cuDNN's LSTM (under vmap: "Cannot access storage of TensorWrapper"), so it is no reference on CUDA.
    want = torch.autograd.functional.jacobian(lambda x: tuple(_pytree.tree_leaves(lstm(x))), x)
    leaves, spec = _pytree.tree_flatten(got)
    assert spec == _pytree.tree_structure(lstm(x))
    for a, b in zip(leaves, want, strict=True):
        torch.testing.assert_close(a, b)
    out, (h, c) = got
    assert out.shape == (5, 4, 5, 3) and h.shape == (1, 4, 5, 3)


def test_non_differentiated_arguments_are_passed_through():
    x = t64(3)
    got = autojac.jacobian(lambda x, n, scale: x.pow(n) * scale, (x, 3, t64(3, seed=1)), argnums=0)
    torch.testing.assert_close(got, torch.diag(3 * x ** 2 * t64(3, seed=1)))
    # another value of a passed-through Python number is another plan (keyed by value)
    autojac.jacobian(lambda x, n, scale: x.pow(n) * scale, (x, 2, t64(3, seed=1)), argnums=0)
    assert autojac.last_report().planned


def test_bad_argnums_and_aux_say_what_to_do():
    x = t64(3)
    with pytest.raises(autojac.InputError, match="gets 1 positional argument"):
        autojac.jacobian(torch.sin, x, argnums=1)
    with pytest.raises(autojac.InputError, match="names an argument twice"):
        autojac.jacobian(torch.add, (x, x), argnums=(0, -2))
    with pytest.raises(autojac.InputTypeError, match="argnums"):
        autojac.jacobian(torch.sin, x, argnums=[0])
    with pytest.raises(autojac.InputTypeError, match=r"must return a pair \(output, aux\)"):
        autojac.jacobian(torch.sin, x, has_aux=True)
    with pytest.raises(autojac.InputTypeError, match="must be a torch.Tensor"):
        autojac.jacobian(lambda x: {"a": x, "b": "text"}, x)


def test_aux_comes_from_one_evaluation_whatever_the_method():
    counts = []

    def f(x):
        counts.append(1)
        return x.sin(), len(counts)

    x = t64(4)
    for mode, vectorize in [("reverse", "vmap"), ("forward", "vmap"), ("reverse", "repeat"), ("forward", "loop")]:
        counts.clear()
        got, aux = autojac.jacobian(f, x, mode=mode, vectorize=vectorize, has_aux=True)
        torch.testing.assert_close(got, torch.diag(x.cos()))
        assert isinstance(aux, int) and 1 <= aux <= len(counts)
