"""A structured run's dense result is made on autojac's worker thread while the run computes its products (NOTE:
[Faulting a result's pages while its values are computed]): right values, one result started per run and taken,
none held by a cached plan, none where memory is measured, on one torch thread or in a forked child's broken pool."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch
from conftest import DEVICE

import autojac
from autojac._core import zeros as Z
from autojac._execute.sparse import SparseLayout
from autojac._planning import first_call as first_call_module
from autojac._planning import session

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="results are made ahead on the CPU only")


def brusselator(y, n=24, a=3.4, b=1.0, alpha=10.0):
    """2-D Brusselator on an n x n periodic grid: a 1152 x 1152 float64 Jacobian (10.6 MB), 6 nonzeros a row
    reaching most of its pages."""
    u, v = y.reshape(2, n, n)
    lap = lambda w: torch.roll(w, 1, 0) + torch.roll(w, -1, 0) + torch.roll(w, 1, 1) + torch.roll(w, -1, 1) - 4 * w  # noqa: E731
    du = b + u * u * v - (a + 1) * u + alpha * lap(u)
    dv = a * u - u * u * v + alpha * lap(v)
    return torch.stack([du, dv]).reshape(-1)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def made(monkeypatch):
    """The threads results were made on, one entry a result made ahead."""
    threads: list[str] = []
    original = Z._faulted

    def faulted(shape, dtype):
        threads.append(threading.current_thread().name)
        return original(shape, dtype)

    monkeypatch.setattr(Z, "_faulted", faulted)
    return threads


def reference(f, x):
    return torch.autograd.functional.jacobian(f, x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex64])
def test_a_result_made_ahead_is_zeros_made_on_the_worker(two_threads, made, dtype):
    n = (6 << 20) // dtype.itemsize + 3  # 6 MiB and a few elements
    ahead = Z.Ahead((n,), dtype, torch.device("cpu"), touched_pages=n * dtype.itemsize // Z.PAGE_BYTES)
    out = ahead.take()
    assert made and made[0].startswith("autojac-pages") and made[0] != threading.current_thread().name
    assert out.shape == (n,) and out.dtype == dtype and not bool(out.any())
    out[-1] = 1  # writable, its own memory
    assert int(torch.count_nonzero(out)) == 1


def test_no_result_is_made_ahead_where_it_would_not_pay_or_is_not_asked_for(made):
    before = torch.get_num_threads()
    cpu = torch.device("cpu")
    n = (6 << 20) // 8
    try:
        torch.set_num_threads(1)  # one core asked for: no second thread
        assert not bool(Z.Ahead((n,), torch.float64, cpu, n * 8 // Z.PAGE_BYTES).take().any())
        torch.set_num_threads(2)
        assert not bool(Z.Ahead((n,), torch.float64, cpu, None).take().any())  # pages unknown
        assert not bool(Z.Ahead((n,), torch.float64, cpu, 3).take().any())  # few pages reached: a mapping
        assert not bool(Z.Ahead((1000,), torch.float64, cpu, 2).take().any())  # small
        assert not bool(Z.Ahead((n,), torch.int64, cpu, n * 8 // Z.PAGE_BYTES).take().any())  # no numpy zeros path
    finally:
        torch.set_num_threads(before)
    assert made == []


def test_first_and_later_calls_take_the_result_they_start(two_threads, made, monkeypatch):
    """The first call starts its result when the pattern is found and its run takes that one (not a second);
    each later call starts one and takes it; values equal torch's loop; the cached layout holds none."""
    x = torch.rand(2 * 24 * 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    layouts: list[SparseLayout] = []
    original = first_call_module._find_layout

    def find(*args, **kwargs):
        layout, note = original(*args, **kwargs)
        layouts.append(layout)
        return layout, note

    submitted, at_runs = [], []
    submit, run = Z._submit, session.Call.run

    def counted_submit(*args):
        submitted.append(1)
        return submit(*args)

    def counted_run(self, *args, **kwargs):
        at_runs.append(len(submitted))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(first_call_module, "_find_layout", find)
    monkeypatch.setattr(Z, "_submit", counted_submit)
    monkeypatch.setattr(session.Call, "run", counted_run)
    f = lambda y: brusselator(y)  # noqa: E731 - a function of its own: a plan of its own
    want = reference(brusselator, x)
    pattern = autojac.sparsity(brusselator, x)
    first = autojac.jacobian(f, x, sparsity=pattern)
    torch.testing.assert_close(first, want, rtol=1e-12, atol=1e-12)
    assert len(made) == 1 and at_runs[0] == 1, (made, at_runs)  # started with the pattern, before the run
    assert layouts and layouts[0] is not None and layouts[0]._ahead is None
    for _ in range(3):
        torch.testing.assert_close(autojac.jacobian(f, x, sparsity=pattern), want, rtol=1e-12, atol=1e-12)
    assert 3 <= len(made) - 1 <= 6, made  # one a call (a call that explores another method runs two)
    assert all(name.startswith("autojac-pages") for name in made)


def test_a_first_call_that_fails_keeps_no_result(two_threads, made, monkeypatch):
    """A result started with the pattern and never taken (the run failed) is dropped by the first call."""
    x = torch.rand(2 * 24 * 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layouts: list[SparseLayout] = []
    original = first_call_module._find_layout

    def find(*args, **kwargs):
        layout, note = original(*args, **kwargs)
        layouts.append(layout)
        return layout, note

    def fail(*args, **kwargs):
        raise RuntimeError("the run broke")

    monkeypatch.setattr(first_call_module, "_find_layout", find)
    monkeypatch.setattr(session.Call, "run", fail)
    f = lambda y: brusselator(y)  # noqa: E731
    with pytest.raises(Exception):
        autojac.jacobian(f, x, sparsity=autojac.sparsity(brusselator, x), cache=False)
    assert made and layouts and all(layout is None or layout._ahead is None for layout in layouts)


def test_a_measured_run_starts_no_result_and_finishes_one_started_before(two_threads, made):
    from autojac._execute.layout import collector

    x = torch.rand(2 * 24 * 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    f = lambda y: brusselator(y)  # noqa: E731
    autojac.jacobian(f, x, sparsity=autojac.sparsity(brusselator, x))
    problem = autojac.plan(f, x, sparsity=autojac.sparsity(brusselator, x)).entry.problem
    layout = problem.layout
    assert layout is not None and layout._ahead is None
    made.clear()
    measured = collector(problem, True, measured=True)
    assert measured._ahead is None and made == []
    layout._ahead = layout._decompressors[True].writes.ahead(torch.float64, torch.device("cpu"))
    assert layout._ahead._future is not None  # started on the worker
    measured = collector(problem, True, measured=True)  # finished before the run: in its baseline
    assert measured._ahead is not None and measured._ahead._future is None and measured._ahead._made is not None
    assert layout._ahead is None and len(made) == 1
    plain = collector(problem, True)
    assert plain._ahead is not None and plain._ahead._future is not None
    assert not bool(plain._ahead.take().any()) and len(made) == 2


def _worker_in_child(queue):
    try:
        fresh = Z._worker is None
        queue.put((fresh, Z._submit(lambda: threading.current_thread().name).result(timeout=20)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put(repr(exc))


def test_a_forked_child_makes_results_ahead_on_a_worker_of_its_own(two_threads):
    """The parent's worker thread does not exist in a forked child: the child makes its own (it would wait
    forever on the parent's). (Torch's own parallel ops can hang in a child forked after parallel work, so the
    child runs plain Python on the worker.)"""
    n = (6 << 20) // 8
    Z.Ahead((n,), torch.float64, torch.device("cpu"), n * 8 // Z.PAGE_BYTES).take()
    assert Z._worker is not None
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_worker_in_child, args=(queue,))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on the parent's worker")
    fresh, name = queue.get(timeout=5)
    assert fresh and name.startswith("autojac-pages")
