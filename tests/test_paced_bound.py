"""A first call's chunks are measured only where the memory they can take calls for it: the first evaluation's
time bounds its graph, and the engine probe's pace bounds a reverse vmap run's vectors (NOTE: [A run's memory
bounded by its pace])."""

from __future__ import annotations

import math
import time

import pytest
import torch

import autojac
from autojac._measure.device import MemoryFacts
from autojac._measure.meter import PeakMeter
from autojac._planning import first_call
from autojac._planning.choose import MethodId

from reference import reference


def _free(monkeypatch, gib: float) -> None:
    """Pretend the CPU has this much free memory: the default budget, and so the room, follow it."""
    monkeypatch.setattr(first_call, "free_memory", lambda device: MemoryFacts("cpu", int(gib * 2**30), "test"))


def _slow_layer(rows: int, cols: int, seconds: float):
    """tanh(W sin(x)) for an x of `cols` elements, evaluated in at least `seconds` (I/O, Python work)."""
    W = torch.randn(rows, cols, dtype=torch.float64) / math.sqrt(cols)

    def f(x):
        time.sleep(seconds)
        return torch.tanh(W @ torch.sin(x))

    return f, torch.randn(cols, dtype=torch.float64)


def _reverse_vmap_report(f, x):
    """The first call's report, after checking its Jacobian against torch's loop."""
    got = autojac.jacobian(f, x)
    r = autojac.last_report()
    torch.testing.assert_close(got, reference(f, x))
    assert r.method.startswith("reverse/vmap") and r.verified, r
    return r


def test_the_paced_bound_counts_each_vector_at_the_probes_pace_and_the_graph_once():
    x = torch.randn(64, dtype=torch.float64)
    problem = autojac.plan(lambda x: torch.tanh(x[:32]), x).problem
    rate = first_call.CPU_TOUCH_BYTES_PER_THREAD_PER_SECOND * torch.get_num_threads()
    per_vector = rate * 1e-5 + problem.in_bytes + problem.out_bytes
    autograd = MethodId("reverse", "vmap", "autograd")
    func = MethodId("reverse", "vmap", "func")
    assert first_call._paced_bound(autograd, 32, 10**9, 1e-5, problem) == 10**9 + 32 * per_vector  # with the graph
    # no probe, or a run the probe's pace does not bound (torch.func's batching rules are not torch.autograd's):
    # nothing tighter than the evaluation's bound
    assert first_call._paced_bound(autograd, 32, 10**9, None, problem) == math.inf
    assert first_call._paced_bound(func, 32, 10**9, 1e-5, problem) == math.inf
    assert first_call._paced_bound(MethodId("forward", "vmap", "func"), 32, 10**9, 1e-5, problem) == math.inf
    assert first_call._paced_bound(MethodId("reverse", "loop"), 32, 10**9, 1e-5, problem) == math.inf


def test_a_slow_evaluation_that_holds_little_is_not_measured_chunk_by_chunk(monkeypatch):
    # A forward pass that waits 0.2 s (I/O, Python work) but saves a few kilobytes: its time alone bounds its graph
    # at gigabytes, which over 128 rows put the run over the line even in a 512 GiB room, so the run was split into
    # an eighth and the rest and every chunk measured (heap trimmed first). The probe's batched vectors take
    # microseconds each; the line lets them take up to ~40 ms a vector on 2 threads.
    if PeakMeter("cpu").kind == "none":
        pytest.skip("no peak counter here: chunks are never measured")
    _free(monkeypatch, 1024)
    r = _reverse_vmap_report(*_slow_layer(128, 256, 0.2))
    assert r.chunk_sizes == (128 - first_call.PROBE_VECTORS,), r  # after the probe's rows, one chunk: not split


def test_a_backward_that_touches_much_memory_a_vector_is_still_measured(monkeypatch):
    # torch.autograd's vmap runs the backward of W @ x as one bmm over copies of W: 2 MiB a vector here, which the
    # probe's pace cannot hide (touching it takes time), and the torch.func engine the probe then puts first is not
    # bounded by it at all. With a 256 MiB room the run's chunks are measured, the first on an eighth of the rows.
    if PeakMeter("cpu").kind == "none":
        pytest.skip("no peak counter here: chunks are never measured")
    _free(monkeypatch, 0.5)
    W = torch.randn(128, 4096, dtype=torch.float32) / 64
    f = lambda x: torch.tanh(W @ x)  # noqa: E731
    x = torch.randn(4096, dtype=torch.float32)
    got = autojac.jacobian(f, x)
    r = autojac.last_report()
    torch.testing.assert_close(got, reference(f, x), rtol=1e-4, atol=1e-5)
    assert r.method.startswith("reverse/vmap") and r.verified, r
    assert len(r.chunk_sizes) > 1 and r.chunk_sizes[0] <= -(-128 // first_call.STRUCTURE_SLICES), r


def test_a_reverse_run_under_the_probes_rows_is_bounded_by_the_reference_vjp(monkeypatch):
    # 32 rows: no engine probe (PROBE_MIN_PASSES), so only the evaluation's time bounded the run, and a 50 ms
    # evaluation put 32 vectors at 77 GB: the run was split into 4 + 28 rows to learn its memory line, which on a
    # backward of many small ops (an RK4 rollout) costs nearly a second whole run. The safety net's reference VJP
    # is measured instead; it holds kilobytes, and the run goes in one chunk.
    if PeakMeter("cpu").kind == "none":
        pytest.skip("no peak counter here: chunks are never measured")
    _free(monkeypatch, 64)
    r = _reverse_vmap_report(*_slow_layer(32, 64, 0.05))
    assert r.chunk_sizes == (32,), r


def test_a_reverse_run_whose_vjp_holds_much_is_still_measured(monkeypatch):
    # Each vector's backward holds a 48 x 16384 intermediate (6 MiB in float64): 48 rows take ~300 MiB, over a
    # quarter of a 1 GiB room. The evaluation is quick (its time-bound is tens of MB), but the reference VJP
    # shows what a vector holds, and the run is measured chunk by chunk, the first chunk an eighth of the rows.
    if PeakMeter("cpu").kind == "none":
        pytest.skip("no peak counter here: chunks are never measured")
    _free(monkeypatch, 2)
    v = torch.linspace(0.5, 1.5, 16384, dtype=torch.float64)

    def f(x):
        return torch.tanh(torch.outer(x, v)).sum(1)

    r = _reverse_vmap_report(f, torch.randn(48, dtype=torch.float64) / 4)
    assert len(r.chunk_sizes) > 1 and r.chunk_sizes[0] <= -(-48 // first_call.STRUCTURE_SLICES), r


def test_a_reverse_run_with_a_large_result_is_bounded_by_the_reference_vjp_too(monkeypatch):
    # 32 rows of 262144 columns (a 64 MiB result) from an evaluation that waits 2 ms and holds one copy of x: its
    # time bounded the run at 3 GB, over a quarter of an 8 GiB room. The reference VJP used to be measured only
    # where the evaluation took 4x what touching the result could (11 ms here), so the run was split into 4 + 28
    # rows, each chunk measured: a parameter-dict MLP's first calls (256 rows, 0.3-0.7 ms evaluations) took 12-17
    # ms split, 3.5 ms whole. Measuring the VJP, which runs anyway, costs one region: one chunk. The room (a
    # quarter of it 2 GiB) lies between the old time-bound (32 x 2 x 48 MB at least) and the new one (the
    # graph's bound once, plus ~0.4 GB for the vectors) for evaluations up to ~60 ms: a loaded machine's.
    if PeakMeter("cpu").kind == "none":
        pytest.skip("no peak counter here: chunks are never measured")
    _free(monkeypatch, 16)

    def f(x):
        time.sleep(0.002)
        return (x.reshape(32, -1) ** 2).sum(1)

    r = _reverse_vmap_report(f, torch.randn(32 * 8192, dtype=torch.float64))
    assert r.chunk_sizes == (32,), r


def test_a_first_call_with_a_pattern_you_give_does_not_trim_the_heap_for_the_vjp(monkeypatch):
    # A pattern you give makes the run one of a few colours (here one), which needs no measuring: the reference
    # VJP is not measured either (the heap trim before it would make the dense result's pages fresh).
    if PeakMeter("cpu").kind == "none":
        pytest.skip("no peak counter here: chunks are never measured")
    from autojac._measure import meter

    _free(monkeypatch, 16)
    # However slow a loaded machine makes the evaluation, the rule for a slow one (measure: the trim costs less
    # than the split) stays out of this test.
    monkeypatch.setattr(first_call, "TRIM_TOUCH_FACTOR", math.inf)
    trims = []
    trim = meter.release_free_heap
    monkeypatch.setattr(meter, "release_free_heap", lambda: (trims.append(1), trim())[1])

    def f(x):
        time.sleep(0.002)
        return (x.reshape(32, -1) ** 2).sum(1)

    x = torch.randn(32 * 8192, dtype=torch.float64)
    pattern = torch.zeros(32, 32 * 8192, dtype=torch.bool)
    for i in range(32):
        pattern[i, i * 8192:(i + 1) * 8192] = True
    got = autojac.jacobian(f, x, sparsity=pattern)
    r = autojac.last_report()
    torch.testing.assert_close(got, reference(f, x))
    assert r.verified and r.chunk_sizes == (1,), r  # one colour: rows share no column
    assert trims == [], r
