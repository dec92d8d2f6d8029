"""Values `f` reads from places a plan must watch: a plain attribute of a module, a class or a Python module
named in `f`'s code, a number in a list, a NumPy array, a wide dict, a module held by an object. A verdict made
while such a value kept `f` from mixing samples (or copies) must not outlive the value's change."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

import autojac

B, D = 6, 4
W = torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _blocks(f, X):
    J = torch.autograd.functional.jacobian(f, X)
    return torch.stack([J[b, :, b] for b in range(X.shape[0])])


class _Center(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D).double()
        self.center = False

    def forward(self, x):
        y = self.lin(x)
        return y - y.mean(0) if self.center else y


class _Cfg:
    MIX = False


_cfg = types.ModuleType("cfg")
_cfg.MIX = False
_flags = [False]
_array = np.zeros(1, dtype=np.int64)
_wide = {f"k{i}": 0 for i in range(70)}


def _by_class(x):
    y = x @ W
    return y - y.mean(0) if _Cfg.MIX else y


def _by_module(x):
    y = x @ W
    return y - y.mean(0) if _cfg.MIX else y


def _by_list(x):
    y = x @ W
    return y - y.mean(0) if _flags[0] else y


def _by_array(x):
    y = x @ W
    return y - y.mean(0) if _array[0] else y


def _by_wide_dict(x):
    y = x @ W
    return y - y.mean(0) if _wide["k69"] else y


class _Trainer:
    def __init__(self):
        self.model = nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D)).double().eval()

    def predict(self, x):
        return self.model(x)


def _cases():
    center = _Center()
    trainer = _Trainer()

    def flip(obj, name, value):
        return lambda: setattr(obj, name, value)

    def put(container, key, value):
        def go():
            container[key] = value
        return go

    return {
        "module attribute": (center, flip(center, "center", True), lambda: setattr(center, "center", False)),
        "class attribute": (_by_class, flip(_Cfg, "MIX", True), flip(_Cfg, "MIX", False)),
        "python module": (_by_module, flip(_cfg, "MIX", True), flip(_cfg, "MIX", False)),
        "list element": (_by_list, put(_flags, 0, True), put(_flags, 0, False)),
        "numpy array": (_by_array, put(_array, 0, 1), put(_array, 0, 0)),
        "wide dict": (_by_wide_dict, put(_wide, "k69", 1), put(_wide, "k69", 0)),
        "module held by an object": (trainer.predict, lambda: trainer.model.train(), lambda: trainer.model.eval()),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_batch_jacobian_refuses_once_a_watched_value_makes_f_mix_samples(name):
    f, turn_on, turn_off = _cases()[name]
    autojac.clear_cache()
    try:
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):  # independent samples: answered, and the verdict is kept
            X = torch.randn(B, D, dtype=torch.float64, generator=gen)
            torch.testing.assert_close(autojac.batch_jacobian(f, X), _blocks(f, X))
        turn_on()
        for _ in range(3):
            X = torch.randn(B, D, dtype=torch.float64, generator=gen)
            with pytest.raises(autojac.UnsupportedFunctionError):
                autojac.batch_jacobian(f, X)
    finally:
        turn_off()


def test_a_repeat_plan_is_checked_again_when_a_module_attribute_makes_f_mix_rows():
    m = _Center()
    x = torch.randn(B, D, dtype=torch.float64)
    for _ in range(30):  # the repeat trick is right, and shown so for every input (at these values)
        torch.testing.assert_close(autojac.jacobian(m, x, vectorize="repeat"), torch.autograd.functional.jacobian(m, x))
    m.center = True  # now the rows mix: each copy's mean runs over every copy
    with pytest.raises(autojac.UnsupportedFunctionError):
        autojac.jacobian(m, x, vectorize="repeat")


def test_tensors_made_under_inference_mode_can_be_captured():
    """An inference tensor keeps no version counter: reading one raised a RuntimeError from inside autojac."""
    with torch.inference_mode():
        c = torch.ones(3, dtype=torch.float64)
    f = lambda x: torch.sin(x) + c  # noqa: E731
    x = torch.randn(3, dtype=torch.float64)
    want = torch.autograd.functional.jacobian(f, x)
    for options in ({}, {"vectorize": "repeat"}, {"cache": False}):
        for _ in range(3):
            torch.testing.assert_close(autojac.jacobian(f, x, **options), want)
    X = torch.randn(B, 2, dtype=torch.float64)
    g = lambda X: torch.tanh(X @ torch.ones(2, 5, dtype=torch.float64)) + c.sum()  # noqa: E731 - more outputs: the broadcast route
    with torch.inference_mode():
        got = autojac.batch_jacobian(g, X)
    torch.testing.assert_close(got, _blocks(g, X))


def test_a_batchnorm_in_training_mode_is_not_taken_for_an_f_that_writes_what_it_captures():
    """Its running statistics are module buffers, put back between evaluations: the plan explores as before.
    Watching the buffers of modules reached through objects (above) first counted every module's buffers as
    captured tensors, and such a plan settled at once on its first method."""
    bn = nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D)).double().train()
    X = torch.randn(B, D, dtype=torch.float64)
    autojac.clear_cache()
    for _ in range(3):
        torch.testing.assert_close(autojac.jacobian(bn, X), _full(bn, X))
    entry = autojac.plan(bn, X).entry
    assert not entry.once_only and not any("settled at once" in e for e in entry.events), list(entry.events)


def _full(f, X):
    before = [b.clone() for b in f.buffers()]
    J = torch.autograd.functional.jacobian(f, X)
    with torch.no_grad():
        for b, v in zip(f.buffers(), before):
            b.copy_(v)
    return J
