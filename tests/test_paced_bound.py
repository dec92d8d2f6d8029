"""A first call's chunks are measured only where the memory they can take calls for it: the first evaluation's
time bounds its graph, and the engine probe's pace bounds a reverse vmap run's vectors (NOTE: [A run's memory
bounded by its pace])."""

from __future__ import annotations

import math
import time

import torch

import autojac
from autojac._measure.device import MemoryFacts
from autojac._planning import session
from autojac._planning.choose import MethodId

from reference import reference


def _free(monkeypatch, gib: float) -> None:
    """Pretend the CPU has this much free memory: the default budget, and so the room, follow it."""
    monkeypatch.setattr(session, "free_memory", lambda device: MemoryFacts("cpu", int(gib * 2**30), "test"))


def test_the_paced_bound_counts_each_vector_at_the_probes_pace_and_the_func_engines_own_evaluation():
    x = torch.randn(64, dtype=torch.float64)
    problem = autojac.plan(lambda x: torch.tanh(x[:32]), x).problem
    rate = session.CPU_TOUCH_BYTES_PER_THREAD_PER_SECOND * torch.get_num_threads()
    per_vector = rate * 1e-5 + problem.in_bytes + problem.out_bytes
    autograd = MethodId("reverse", "vmap", "autograd")
    func = MethodId("reverse", "vmap", "func")
    assert session._paced_bound(autograd, 32, 10**9, 1e-5, problem) == 32 * per_vector
    assert session._paced_bound(func, 32, 10**9, 1e-5, problem) == 10**9 + 32 * per_vector
    # no probe, or a method the probe did not time: nothing tighter than the evaluation's bound
    assert session._paced_bound(autograd, 32, 10**9, None, problem) == math.inf
    assert session._paced_bound(MethodId("forward", "vmap", "func"), 32, 10**9, 1e-5, problem) == math.inf
    assert session._paced_bound(MethodId("reverse", "loop"), 32, 10**9, 1e-5, problem) == math.inf


def test_a_slow_evaluation_that_holds_little_is_not_measured_chunk_by_chunk(monkeypatch):
    # A forward pass that waits 50 ms (I/O, Python work) but saves a few kilobytes: its time alone bounds its graph
    # at a gigabyte, which over 120 rows put the run over the line, so the run was split into an eighth and the rest
    # and every chunk measured (heap trimmed first). The probe's batched vectors take microseconds each.
    _free(monkeypatch, 64)
    W = torch.randn(128, 256, dtype=torch.float64) / 16

    def f(x):
        time.sleep(0.05)
        return torch.tanh(W @ torch.sin(x))

    x = torch.randn(256, dtype=torch.float64)
    want = reference(f, x)
    got = autojac.jacobian(f, x)
    r = autojac.last_report()
    torch.testing.assert_close(got, want)
    assert r.method.startswith("reverse/vmap") and r.verified, r
    assert r.chunk_sizes == (128 - session.PROBE_VECTORS,), r  # after the probe's rows, one chunk: not split


def test_a_backward_that_touches_much_memory_a_vector_is_still_measured(monkeypatch):
    # torch.autograd's vmap runs the backward of W @ x as one bmm over copies of W: 2 MiB a vector here, which the
    # probe's pace cannot hide (touching it takes time; the probe then puts the torch.func engine first, which its
    # pace bounds too). With a 256 MiB room the run's chunks are measured, the first on an eighth of the rows.
    _free(monkeypatch, 0.5)
    W = torch.randn(128, 4096, dtype=torch.float32) / 64
    f = lambda x: torch.tanh(W @ x)  # noqa: E731
    x = torch.randn(4096, dtype=torch.float32)
    got = autojac.jacobian(f, x)
    r = autojac.last_report()
    torch.testing.assert_close(got, reference(f, x), rtol=1e-4, atol=1e-5)
    assert r.method.startswith("reverse/vmap") and r.verified, r
    rows = 128 - session.PROBE_VECTORS
    assert r.chunk_sizes[0] <= -(-rows // session.STRUCTURE_SLICES), r
