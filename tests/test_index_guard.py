"""NOTE: [Index bounds checked before the kernel]: on CUDA an out-of-bounds index is a device-side assert that
ends the process's CUDA use; the repeat trick's batched trial runs `f` under a guard that raises IndexError
first wherever the fake run could not check the batched shapes. These run on whatever device the suite uses
(PYTEST_TORCH_DEVICE): on CUDA a missed check would take every later test in the process down with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import autojac
from autojac._core.index_guard import IndexGuard

from conftest import DEVICE
from reference import reference

g = torch.Generator().manual_seed(5)
X = torch.randn(6, 4, generator=g, dtype=torch.float64).to(DEVICE)
I = lambda *v: torch.tensor(v, device=DEVICE)  # noqa: E731

# (name, the op on X with in-bounds indices, the same op with one index out of bounds)
OPS = [
    ("index", lambda i: X[i], (I(0, 5, -6), I(0, 6))),
    ("index, second dim", lambda i: X[:, i], (I(3, -4), I(4))),
    ("index with a mask first", lambda i: X[X[:, 0] > -9, i], (I(1), I(-5))),
    ("index_put", lambda i: X.clone().index_put_((i,), torch.zeros((), dtype=X.dtype, device=DEVICE)), (I(2), I(9))),
    ("index_select", lambda i: X.index_select(1, i), (I(0, 3), I(0, 4))),
    ("gather", lambda i: X.gather(0, i.view(1, -1).expand(2, -1)), (I(1, 2), I(1, 6))),
    ("scatter_add", lambda i: X.clone().scatter_add_(1, i.view(1, -1), X[:1, : i.numel()]), (I(3), I(4))),
    ("index_add", lambda i: X.clone().index_add_(0, i, X[: i.numel()]), (I(5), I(6))),
    ("take", lambda i: X.take(i), (I(23, -24), I(24))),
    ("embedding", lambda i: F.embedding(i, X), (I(5, 0), I(6))),
    ("cross_entropy", lambda i: F.cross_entropy(X[: i.numel()], i), (I(3, 0), I(4, 0))),
    ("cross_entropy, ignored", lambda i: F.cross_entropy(X[: i.numel()], i, ignore_index=-7), (I(-7, 1), I(-8, 1))),
    ("multi_margin_loss", lambda i: F.multi_margin_loss(X[: i.numel()], i), (I(3, 0), I(0, 4))),
    ("multilabel_margin_loss", lambda i: F.multilabel_margin_loss(X[:2], i.view(2, 4)),
     (I(3, 0, -1, 0, 2, -1, 0, 0), I(3, 4, -1, 0, 2, -1, 0, 0))),
]


@pytest.mark.parametrize("name, op, indices", OPS, ids=[o[0] for o in OPS])
def test_the_guard_passes_in_bounds_indices_and_refuses_others_before_the_kernel(name, op, indices):
    good, bad = indices
    want = op(good)
    with IndexGuard() as guard:
        got = op(good)
    torch.testing.assert_close(got, want)
    assert guard.checked >= 1  # the op was looked at, not merely let through
    with pytest.raises(IndexError, match="out of bounds"), IndexGuard():
        op(bad)
    assert torch.isfinite(X.sum())  # on CUDA: the context still answers (no assert ran)


def test_a_data_dependent_function_that_is_not_batch_aware_is_refused_by_the_repeat_trick_safely():
    """The fake run cannot tell (a branch on the data), so on CUDA the real batched trial runs under the guard:
    `x[perm]` on stacked rows is refused as an IndexError, and the process goes on to answer with another
    method. On the CPU the kernel's own IndexError does the same."""
    perm = torch.randperm(50, generator=g).to(DEVICE)
    w = torch.randn(50, generator=g, dtype=torch.float64).to(DEVICE)

    def f(x):
        y = x[perm] * w
        return torch.sin(y) if float(x.sum()) > -1e9 else y

    x = torch.randn(50, generator=g, dtype=torch.float64).to(DEVICE)
    with pytest.raises(autojac.UnsupportedFunctionError, match="reverse/repeat") as info:
        autojac.jacobian(f, x, mode="reverse", vectorize="repeat")
    assert isinstance(info.value.__cause__, IndexError), repr(info.value.__cause__)
    torch.testing.assert_close(autojac.jacobian(f, x, vectorize="loop"), reference(f, x))


def test_a_data_dependent_batch_aware_function_keeps_the_repeat_trick():
    def f(x):
        return torch.sin(x) * 2 if float(x.sum()) > 0 else torch.cos(x)

    x = torch.rand(7, dtype=torch.float64, generator=g).to(DEVICE) + 0.1
    torch.testing.assert_close(autojac.jacobian(f, x, vectorize="repeat"), reference(f, x))
    assert autojac.last_report().verified


def test_the_cuda_trial_path_runs_on_any_device_when_asked(monkeypatch):
    """The CUDA branch of the batch-aware trial, exercised where the suite runs (CI has no GPU): fake rows
    first; a data-dependent branch sends the real trial under the guard, whose own IndexError (not a kernel's)
    refuses a gather through a captured permutation; a batch-aware `f` with such a branch keeps the repeat
    trick; shapes fake rows can check never reach a real batched run."""
    from autojac._core import index_guard
    from autojac._methods import base

    monkeypatch.setattr(base, "_asserts_on_device", lambda device: True)
    guarded = []
    real_dispatch = index_guard.IndexGuard.__torch_dispatch__

    def spy(self, func, types, args=(), kwargs=None):
        guarded.append(str(func))
        return real_dispatch(self, func, types, args, kwargs)

    monkeypatch.setattr(index_guard.IndexGuard, "__torch_dispatch__", spy)
    perm = torch.randperm(50, generator=g).to(DEVICE)

    def mixes(x):
        y = x[perm] * 2.0
        return torch.sin(y) if float(x.sum()) > -1e9 else y

    x = torch.randn(50, generator=g, dtype=torch.float64).to(DEVICE)
    with pytest.raises(autojac.UnsupportedFunctionError, match="reverse/repeat") as info:
        autojac.jacobian(mixes, x, mode="reverse", vectorize="repeat")
    cause = info.value.__cause__
    assert isinstance(cause, IndexError) and "aten.index" in str(cause), repr(cause)  # the guard's message
    assert guarded  # the trial ran under the guard

    def branchy(x):
        return torch.sin(x) * 2 if float(x.sum()) > 0 else torch.cos(x)

    guarded.clear()
    y = torch.rand(7, dtype=torch.float64, generator=g).to(DEVICE) + 0.1
    torch.testing.assert_close(autojac.jacobian(branchy, y, vectorize="repeat"), reference(branchy, y))
    assert guarded and autojac.last_report().method.endswith("/repeat")

    guarded.clear()
    plain = lambda x: torch.tanh(x) * x  # noqa: E731 - fake rows check its shapes: no guarded run
    torch.testing.assert_close(autojac.jacobian(plain, y + 1, vectorize="repeat"), reference(plain, y + 1))
    assert not guarded
