"""PeakMeter: peak RSS regions on Linux (64 MiB seen, nothing seen, nesting, threads, the process peak kept),
and the CUDA arithmetic with a fake allocator."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from autojac._measure import meter as meter_module
from autojac._measure.meter import PeakMeter, process_peak_rss

MiB = 2**20


linux_rss = pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                               reason="needs a writable /proc/self/clear_refs (Linux)")


def _touched(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes // 4).fill_(1.0)  # empty alone maps pages without touching them


def _vmhwm() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


@linux_rss
def test_a_touched_64mib_tensor_is_seen_and_nothing_is_not():
    meter = PeakMeter("cpu")
    assert meter.kind == "peak RSS"
    with meter.region() as big:
        x = _touched(64 * MiB)
    del x
    assert 0.75 * 64 * MiB <= big.peak_bytes <= 1.25 * 64 * MiB
    assert big.seconds > 0
    with meter.region() as nothing:
        pass
    assert 0 <= nothing.peak_bytes < 4 * MiB


@linux_rss
def test_a_trimmed_region_measures_too():
    with PeakMeter("cpu").region(trim=True) as r:
        x = _touched(64 * MiB)
    del x
    assert 0.75 * 64 * MiB <= r.peak_bytes <= 1.25 * 64 * MiB


@linux_rss
def test_regions_nest_and_an_outer_region_keeps_what_came_before_an_inner_reset():
    meter = PeakMeter("cpu")
    with meter.region() as outer:
        x = _touched(96 * MiB)  # the outer peak, before the inner region resets the kernel's counter
        del x
        with meter.region() as inner:
            y = _touched(48 * MiB)
            del y
        z = _touched(16 * MiB)
        del z
    assert 0.75 * 48 * MiB <= inner.peak_bytes <= 1.25 * 48 * MiB
    assert 0.75 * 96 * MiB <= outer.peak_bytes <= 1.25 * 96 * MiB

    with meter.region() as outer:
        with meter.region() as inner:
            y = _touched(64 * MiB)  # the outer peak, inside the inner region
            del y
    assert 0.75 * 64 * MiB <= inner.peak_bytes <= outer.peak_bytes <= 1.25 * 64 * MiB


@linux_rss
def test_a_second_thread_gets_an_unmeasured_region_while_the_first_measures():
    meter = PeakMeter("cpu")
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def other():
        inside.wait(10)
        with meter.region() as r:
            pass
        seen["while"] = r.peak_bytes
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with meter.region() as first:
        inside.set()
        assert done.wait(10)
    t.join()
    assert seen["while"] is None
    assert first.peak_bytes is not None

    def after():
        with meter.region() as r:
            pass
        seen["after"] = r.peak_bytes

    t = threading.Thread(target=after)
    t.start()
    t.join()
    assert seen["after"] is not None  # the lock was given back


@linux_rss
def test_an_exception_ends_the_region_and_frees_the_counter():
    meter = PeakMeter("cpu")
    with pytest.raises(ValueError):
        with meter.region() as r:
            raise ValueError("boom")
    assert r.peak_bytes is not None
    assert meter_module._rss_counter().stack == []
    result = {}

    def other():
        with meter.region() as r2:
            pass
        result["r"] = r2

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert result["r"].peak_bytes is not None  # the lock was given back


@linux_rss
def test_process_peak_rss_keeps_the_peaks_that_regions_reset():
    meter = PeakMeter("cpu")
    x = _touched(128 * MiB)
    del x
    before = process_peak_rss()
    assert before >= _vmhwm()
    readings = [before]
    for _ in range(3):
        with meter.region():
            y = _touched(8 * MiB)
            del y
        readings.append(process_peak_rss())
        assert readings[-1] >= _vmhwm()
    assert readings == sorted(readings)
    assert _vmhwm() < before  # the kernel's peak was reset below the 128 MiB peak, ours was not


@linux_rss
def test_reading_the_process_peak_alone_resets_nothing():
    script = textwrap.dedent("""
        import json, resource
        x = b"\\1" * (64 * 2**20)  # a peak, then gone
        del x
        hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
        before = hwm()
        from autojac._measure.meter import process_peak_rss
        peak = process_peak_rss()
        print(json.dumps({"before": before, "peak": peak, "after": hwm(),
                          "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["after"] >= facts["before"] >= 64 * MiB
    assert facts["peak"] >= facts["before"] and facts["maxrss"] >= facts["before"]


def test_no_counter_gives_unmeasured_regions(monkeypatch):
    monkeypatch.setitem(meter_module._counters, "rss", None)  # as on a platform without /proc
    meter = PeakMeter("cpu")
    assert meter.kind == "none"
    with meter.region() as r:
        pass
    assert r.peak_bytes is None and r.seconds >= 0
    assert process_peak_rss() is None
    assert PeakMeter("meta").kind == "none"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_a_peak_that_cannot_be_reset_is_still_read(monkeypatch):
    monkeypatch.setattr(meter_module._rss_counter(), "_clear", None)  # as where clear_refs is not writable
    meter = PeakMeter("cpu")
    assert meter.kind == "none"
    with meter.region() as r:
        pass
    assert r.peak_bytes is None
    assert process_peak_rss() >= _vmhwm()


class FakeCuda:
    """The four allocator statistics calls of torch.cuda, over a simulated allocation count."""

    def __init__(self, allocated: int) -> None:
        self.allocated = self.peak = allocated
        self.syncs = 0

    def alloc(self, n: int) -> None:
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def current_device(self) -> int:
        return 0

    def synchronize(self, index: int) -> None:
        self.syncs += 1

    def memory_allocated(self, index: int) -> int:
        return self.allocated

    def max_memory_allocated(self, index: int) -> int:
        return self.peak

    def reset_peak_memory_stats(self, index: int) -> None:
        self.peak = self.allocated


def test_cuda_peak_is_the_allocator_peak_over_the_start():
    cuda = FakeCuda(allocated=1000)
    cuda.alloc(5000)  # a peak before the region must not count
    cuda.alloc(-5000)
    meter = PeakMeter("cuda", cuda=cuda)
    assert meter.kind == "cuda allocator"
    with meter.region() as r:
        cuda.alloc(300)
        cuda.alloc(-200)
        cuda.alloc(50)
    assert r.peak_bytes == 300
    assert cuda.syncs >= 2  # before the start reading and the end reading

    with meter.region() as outer:
        cuda.alloc(700)
        cuda.alloc(-700)
        with PeakMeter("cuda:0", cuda=cuda).region() as inner:  # another meter, the same counter
            cuda.alloc(100)
    assert (inner.peak_bytes, outer.peak_bytes) == (100, 700)


def test_cuda_devices_are_counted_apart():
    cuda = FakeCuda(allocated=0)
    with PeakMeter("cuda:0", cuda=cuda).region() as r0:
        with PeakMeter("cuda:1", cuda=cuda).region() as r1:  # another device's counter: not nested, not refused
            cuda.alloc(10)
    assert r0.peak_bytes == 10 and r1.peak_bytes == 10


@linux_rss
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_reads_its_own_process():
    meter = PeakMeter("cpu")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its counter must be new, not the parent's /proc files
        try:
            # Fresh pages straight from the kernel: not torch, whose thread pool may not survive a fork,
            # and not malloc, which may hand back pages the parent had already touched.
            with meter.region() as r:
                pages = mmap.mmap(-1, 16 * MiB)
                pages[::4096] = b"\1" * (16 * MiB // 4096)
                pages.close()
            ok = meter_module._rss_counter().seen > 0 and 0.75 * 16 * MiB <= r.peak_bytes <= 1.25 * 16 * MiB
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
