"""Memory facts from psutil / pynvml / torch.cuda (with fakes), and every form of `memory_budget`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import autojac
from autojac._measure.tracker import LiveStorageTracker, measure_peak_bytes
from autojac._core.units import DEFAULT_BUDGET_SHARE, parse_budget
from autojac._measure.device import _nvml_index, cpu_free_bytes, cuda_free_bytes

GiB = 2**30


@pytest.mark.parametrize("budget, expected", [
    (None, int(8 * GiB * DEFAULT_BUDGET_SHARE)),
    (123456, 123456),
    ("512MiB", 512 * 2**20),
    ("2GB", 2 * 10**9),
    ("1.5 GiB", int(1.5 * GiB)),
    ("100kb", 100_000),
    ("64M", 64 * 2**20),
    ("4096", 4096),
    (0.25, 2 * GiB),
    (1.0, 8 * GiB),
])
def test_budget_forms(budget, expected):
    assert parse_budget(budget, free_bytes=8 * GiB) == expected


@pytest.mark.parametrize("budget, error, match", [
    (0, autojac.InputError, "must be positive"),
    (-5, autojac.InputError, "must be positive"),
    (0.0, autojac.InputError, r"in \(0, 1\]"),
    (1.5, autojac.InputError, r"in \(0, 1\]"),
    ("lots", autojac.InputError, "number and a unit"),
    ("12 parsecs", autojac.InputError, "number and a unit"),
    ("0MiB", autojac.InputError, "at least 1 byte"),
    ("0.5", autojac.InputError, "has no unit.*float 0.5"),
    ("1.5", autojac.InputError, "has no unit.*'1.5GiB'"),
    ("0.0001kb", autojac.InputError, "at least 1 byte"),
    (True, autojac.InputTypeError, "must be None"),
    ([1], autojac.InputTypeError, "must be None"),
])
def test_bad_budgets(budget, error, match):
    with pytest.raises(error, match=match):
        parse_budget(budget, free_bytes=GiB)


def test_every_spelling_of_a_size_is_one_budget_and_one_cache_entry():
    from autojac._core.units import normalize_budget

    assert {normalize_budget(b) for b in ("1 GiB", "1gib", "1GiB", " 1 G ", 2**30, "1073741824")} == {2**30}
    f = lambda t: torch.tanh(t) * 2  # noqa: E731
    x = torch.randn(4, dtype=torch.float64)
    assert autojac.plan(f, x, memory_budget="1 GiB").entry is autojac.plan(f, x, memory_budget=2**30).entry


def test_a_budget_above_the_whole_memory_is_refused():
    from autojac._measure.device import total_bytes

    too_much = 2 * total_bytes(torch.device("cpu"))
    with pytest.raises(autojac.InputError, match="the device has only"):
        autojac.jacobian(torch.sin, torch.randn(3), memory_budget=too_much)


@pytest.mark.parametrize("budget", ["much", [1], -1.0])
def test_bad_budget_is_refused_before_f_runs(budget):
    calls = []
    with pytest.raises(autojac.AutojacError, match="memory_budget"):
        autojac.jacobian(lambda x: calls.append(1) or x, torch.ones(2), memory_budget=budget)
    assert calls == []


def test_cpu_free_bytes_is_psutil_available(monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=12345))
    assert cpu_free_bytes().free_bytes == 12345


@pytest.mark.parametrize("visible, torch_index, expected", [
    (None, 0, 0),
    ("", 1, 1),
    ("3,1", 0, 3),
    ("3,1", 1, 1),
    ("GPU-8d5a,2", 0, "GPU-8d5a"),
])
def test_nvml_index_follows_cuda_visible_devices(visible, torch_index, expected):
    assert _nvml_index(torch_index, visible) == expected


class FakeNvml:
    def __init__(self, free_by_index, uuids=()):
        self.free = free_by_index
        self.uuids = list(uuids)
        self.asked = []

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.free)

    def nvmlDeviceGetHandleByIndex(self, i):
        self.asked.append(i)
        return i

    def nvmlDeviceGetUUID(self, handle):
        return self.uuids[handle]

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(free=self.free[handle])


class FakeCuda:
    def __init__(self, free, reserved=0, allocated=0):
        self.free, self.reserved, self.allocated = free, reserved, allocated

    def current_device(self):
        return 0

    def memory_reserved(self, i):
        return self.reserved

    def memory_allocated(self, i):
        return self.allocated

    def mem_get_info(self, i):
        return (self.free, 80 * GiB)


def test_cuda_free_uses_the_smaller_reading_plus_torch_cache(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    nvml = FakeNvml([10 * GiB, 11 * GiB, 5 * GiB])
    facts = cuda_free_bytes(torch.device("cuda:0"), pynvml=nvml, cuda=FakeCuda(free=6 * GiB, reserved=3 * GiB, allocated=1 * GiB))
    assert nvml.asked == [2]  # torch's cuda:0 is NVML's device 2
    assert facts.free_bytes == 5 * GiB + 2 * GiB
    assert "pynvml" in facts.source


def test_cuda_free_by_uuid(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")
    nvml = FakeNvml([1 * GiB, 4 * GiB], uuids=["GPU-aaaa-1", "GPU-bbbb-2"])
    facts = cuda_free_bytes(torch.device("cuda:0"), pynvml=nvml, cuda=FakeCuda(free=9 * GiB))
    assert facts.free_bytes == 4 * GiB


def test_cuda_free_falls_back_to_torch_without_noise(monkeypatch, caplog):
    class Broken(FakeNvml):
        def nvmlInit(self):
            raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with caplog.at_level("WARNING", logger="autojac"):
        facts = cuda_free_bytes(torch.device("cuda:0"), pynvml=Broken([0]), cuda=FakeCuda(free=6 * GiB, reserved=GiB))
    assert facts.free_bytes == 7 * GiB and "torch.cuda" in facts.source
    assert caplog.records == []


def test_tracker_counts_live_bytes_not_the_sum_of_allocations():
    def work():
        for _ in range(10):
            a = torch.ones(1000, dtype=torch.float64)  # 8000 bytes, freed each round
            b = a * 2
            del a, b
        return torch.zeros(500, dtype=torch.float64)

    peak, kept = measure_peak_bytes(work, torch.device("cpu"))
    assert 16_000 <= peak < 20_000
    assert kept.shape == (500,)


def test_tracker_does_not_count_views_of_existing_tensors():
    x = torch.ones(10_000)
    tracker = LiveStorageTracker()
    with tracker:
        y = x.view(100, 100).t()[:5]
        x.add_(1)
    assert tracker.peak == 0 and y.shape == (5, 100)


def test_tracker_sees_the_backward_pass():
    x = torch.randn(1000, requires_grad=True)
    W = torch.randn(500, 1000)
    y = torch.tanh(W @ x)
    V = torch.eye(500)[:64]
    peak, _ = measure_peak_bytes(lambda: torch.autograd.grad(y, x, V, is_grads_batched=True, retain_graph=True), torch.device("cpu"))
    assert peak >= 64 * 1000 * 4  # at least the batched gradient itself


def test_tracker_counts_the_copy_a_matrix_kernel_makes_of_an_expanded_operand():
    # Forward-mode AD hands mm the zero tangent of a weight as an expanded scalar; the CPU
    # kernel copies it to a full buffer (64 MiB of peak RSS for a 64 MiB weight, measured).
    a = torch.randn(4, 512)
    zero_weight = torch.zeros(()).expand(512, 2048)
    peak, _ = measure_peak_bytes(lambda: a @ zero_weight, torch.device("cpu"))
    assert peak >= 512 * 2048 * 4 + 4 * 2048 * 4  # the copy, alive with the output


def test_tracker_counts_no_copy_of_operands_blas_reads_in_place():
    a, W, zero_bias = torch.randn(4, 512), torch.randn(2048, 512), torch.zeros(()).expand(4, 2048)
    out_bytes = 4 * 2048 * 4
    transposed, _ = measure_peak_bytes(lambda: a @ W.T, torch.device("cpu"))
    bias, _ = measure_peak_bytes(lambda: torch.addmm(zero_bias, a, W.T), torch.device("cpu"))
    batched, _ = measure_peak_bytes(lambda: torch.bmm(a.expand(3, 4, 512), W.T.expand(3, 512, 2048)), torch.device("cpu"))
    assert transposed == out_bytes and bias == out_bytes and batched == 3 * out_bytes


@pytest.mark.skipif(not autojac._measure.meter.PeakMeter("cpu").kind == "peak RSS",
                    reason="chunks are measured through the CPU's peak RSS (Linux)")
def test_a_small_room_still_grows_its_chunks_when_the_function_holds_small_operands():
    """NOTE: [A larger chunk meets new workspaces]: the reserve a new chunk size keeps back is at most the largest
    operand the kernels could pack (here a 2 MiB matrix), not the CPU's whole 8 MiB: a 4.9 MiB room grows its
    chunks, where a constant 8 MiB reserve held them at 2 vectors for 256 chunks. In a fresh process with the
    allocator setting the budget benchmarks use (readings in a process with other work behind it can be steeper)."""
    script = textwrap.dedent("""
        import json, torch, autojac
        from autojac._api import jacobian as api
        from autojac._measure.device import untracked_reserve
        torch.manual_seed(0)
        A = torch.randn(512, 512, dtype=torch.float64) / 20
        f = lambda x: torch.tanh(A @ x) * x
        x = torch.randn(512, dtype=torch.float64)
        J = autojac.jacobian(f, x, memory_budget="8MiB")
        entry = [e for _, e in api._cache.items()][0]
        ok = torch.allclose(J, torch.autograd.functional.jacobian(f, x))
        print(json.dumps({"chunks": list(autojac.last_report().chunk_sizes), "reserve": entry.new_size_reserve,
                          "room": entry.room_bytes(), "cpu_reserve": untracked_reserve(torch.device("cpu")),
                          "A": A.numel() * A.element_size(), "ok": ok}))
    """)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["ok"]
    assert facts["reserve"] == facts["A"] < facts["cpu_reserve"]
    assert facts["room"] < facts["cpu_reserve"]  # a constant reserve would not let it grow
    assert max(facts["chunks"]) >= 16 and len(facts["chunks"]) < 64, facts


def test_what_a_first_backward_keeps_allocated_is_counted_on_cuda_only():
    """NOTE: [Workspaces a first backward keeps]: on CUDA, bytes left allocated beyond the tensors the caller
    holds (cuBLAS's workspace for autograd's thread) count in the plan's fixed memory; the CPU has no such
    counter (its untracked margin covers the like)."""
    from conftest import DEVICE

    from autojac._measure.device import allocated_bytes, kept_by_libraries

    held = (torch.ones(1000, device=DEVICE),)
    if DEVICE.type != "cuda":
        assert allocated_bytes(DEVICE) is None and kept_by_libraries(DEVICE, None, held) == 0
        return
    before = allocated_bytes(DEVICE)
    made = (torch.ones(3000, device=DEVICE),)  # the caller's own: 12000 bytes, a 12288-byte block
    workspace = torch.empty(1 << 20, dtype=torch.uint8, device=DEVICE)  # what a library would keep
    assert kept_by_libraries(DEVICE, before, made) == workspace.numel()
    del workspace
    assert kept_by_libraries(DEVICE, before, made) == 0


def test_what_the_reference_vjp_leaves_allocated_is_part_of_the_plans_fixed_memory(monkeypatch):
    """The planner's side of NOTE: [Workspaces a first backward keeps], on any device: what `kept_by_libraries`
    reports after the first call's reference VJP is added to the plan's fixed bytes, so chunks are sized in
    what the budget leaves above it."""
    from conftest import DEVICE

    from autojac._planning import first_call

    W = torch.randn(48, 48, dtype=torch.float64, device=DEVICE) / 7
    x = torch.randn(48, dtype=torch.float64, device=DEVICE)

    def fixed(kept: int) -> int:
        monkeypatch.setattr(first_call, "kept_by_libraries", lambda device, before, made: kept)
        autojac.clear_cache()  # plans are keyed by code: each reading makes its own
        f = lambda x: torch.tanh(W @ x) * x  # noqa: E731
        autojac.jacobian(f, x, memory_budget="256 MiB", mode="reverse", vectorize="vmap")
        return autojac.plan(f, x, memory_budget="256 MiB", mode="reverse", vectorize="vmap").entry.fixed_bytes

    # The rest of the fixed bytes (the result, the measured forward pass, the CPU's margin) is measured anew by
    # each first call: a page or two apart.
    assert abs(fixed(5 << 20) - fixed(0) - (5 << 20)) <= 64 << 10
