"""Peak extra memory and wall time of a region of work, from counters the allocator or kernel keep anyway:
the CUDA caching allocator's peak, or on Linux the resettable peak RSS (VmHWM), at tens of microseconds a region."""

from __future__ import annotations

import ctypes
import math
import os
import threading
import time
from typing import Any

import torch


class _Counter:
    """One process-wide peak counter that regions share: read (current, peak), reset peak to current.

    The counter is global state, so regions take `lock` without waiting: a second thread
    gets an unmeasured region instead of a reading disturbed by the first thread's resets.
    The lock is reentrant, so regions nest within one thread (see `Region`).
    """

    kind = "none"

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.stack: list[Region] = []  # the open regions of the thread holding `lock`
        self.seen = 0  # the highest peak read before any reset: what resets hid from others
        self.dead = False  # set in a forked child, whose counters are new objects

    def sync(self) -> None:
        pass

    def read(self) -> tuple[int, int]:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def trim(self) -> None:
        pass


class _RssCounter(_Counter):
    """Linux: VmRSS and VmHWM from /proc/self/status; writing "5" to clear_refs resets VmHWM to VmRSS."""

    kind = "peak RSS"

    def __init__(self) -> None:
        super().__init__()
        # Opened once: a region then costs two preads and a write, not four open/close pairs.
        self._status = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
        self.read()  # fails here, not in a region, where /proc/self/status lacks the fields
        self._clear: int | None = None  # set by `probe`
        self._probed = False

    def probe(self) -> bool:
        """Whether the peak can be reset: clear_refs is writable and takes "5" (kernels before 4.0
        refuse it). Tried once, by the first CPU meter, so before any region can be open; reading
        the peak (process_peak_rss) alone never resets it."""
        if not self._probed:
            self._probed = True
            try:
                clear = os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
            except OSError:
                return False
            try:
                self.seen = max(self.seen, self.read()[1])  # the write resets the peak
                os.write(clear, b"5")
            except OSError:
                os.close(clear)
                return False
            self._clear = clear
        return self._clear is not None

    def read(self) -> tuple[int, int]:
        # VmHWM and VmRSS are in the first ~600 bytes; the kernel formats the whole file anyway.
        text = os.pread(self._status, 4096, 0)
        return _kib_field(text, b"VmRSS:"), _kib_field(text, b"VmHWM:")

    def reset(self) -> None:
        os.write(self._clear, b"5")

    def trim(self) -> None:
        release_free_heap()


def _kib_field(text: bytes, key: bytes) -> int:
    start = text.index(key) + len(key)
    return int(text[start:text.index(b"kB", start)]) * 1024


class _CudaCounter(_Counter):
    """The caching allocator's allocated and peak-allocated bytes on one device."""

    kind = "cuda allocator"

    def __init__(self, cuda: Any, index: int) -> None:
        super().__init__()
        self.cuda, self.index = cuda, index

    def sync(self) -> None:
        self.cuda.synchronize(self.index)  # queued kernels allocate and free when they run

    def read(self) -> tuple[int, int]:
        return self.cuda.memory_allocated(self.index), self.cuda.max_memory_allocated(self.index)

    def reset(self) -> None:
        self.cuda.reset_peak_memory_stats(self.index)


_counters: dict[Any, _Counter | None] = {}
_counters_lock = threading.Lock()


def _shared_counter(key: Any, make) -> _Counter | None:
    """The one counter per process for `key`, made on first use; None where it cannot exist."""
    with _counters_lock:
        if key not in _counters:
            try:
                _counters[key] = make()
            except (OSError, ValueError):  # no /proc (not Linux), not allowed to read it, or no VmHWM in it
                _counters[key] = None
        return _counters[key]


def _rss_counter() -> _RssCounter | None:
    return _shared_counter("rss", _RssCounter)


def _after_fork_in_child() -> None:
    # The child's /proc/self is another file (the open descriptors still show the parent),
    # its peak starts afresh, and a lock held by another thread would never be released.
    global _counters_lock
    for counter in _counters.values():
        if counter is not None:
            counter.dead = True
            for fd in (getattr(counter, "_status", None), getattr(counter, "_clear", None)):
                if fd is not None:
                    os.close(fd)
    _counters.clear()
    _counters_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Region:
    """A measured stretch of work; use as `with meter.region() as r: ...`.

    After exit, `peak_bytes` is the peak of the counter over its value at entry (bytes, >= 0),
    or None where nothing could be measured: no counter on this platform, another thread
    measuring at the same time, or a fork inside the region. `seconds` is the wall time
    (CUDA-synchronized) of the work, without the measuring.

    Both counters belong to the whole process (or device): what other threads allocate in
    the meantime counts, and what they free can hide some of the region's own use.

    Regions nest within one thread: an inner region's reset first hands the peak read so far
    to the region around it, so both readings are right.
    """

    def __init__(self, counter: _Counter | None, trim: bool = False) -> None:
        self._counter = counter
        self._trim = trim
        self._held = False
        self._start = 0
        self._high = 0
        self._t0 = 0.0
        self.peak_bytes: int | None = None
        self.seconds = math.nan

    @property
    def start_bytes(self) -> int | None:
        """What the counter read when the region began (resident or allocated bytes), if it was measured."""
        return self._start if self.peak_bytes is not None else None

    def _note(self, peak: int) -> None:
        counter = self._counter
        counter.seen = max(counter.seen, peak)
        if counter.stack:
            counter.stack[-1]._high = max(counter.stack[-1]._high, peak)

    def __enter__(self) -> Region:
        counter = self._counter
        if counter is not None and not counter.dead and counter.lock.acquire(blocking=False):
            self._held = True
            try:
                if self._trim:
                    counter.trim()
                counter.sync()
                self._start, peak = counter.read()
                self._note(peak)  # before the reset erases it
                counter.reset()
            except BaseException:
                self._held = False
                counter.lock.release()
                raise
            self._high = self._start
            counter.stack.append(self)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        counter = self._counter
        if counter is not None and not counter.dead:
            counter.sync()
        self.seconds = time.perf_counter() - self._t0
        if not self._held or counter.dead:  # dead: forked inside the region; this process's counter is another
            self._held = False
            return
        self._held = False
        try:
            _, peak = counter.read()
            self._high = max(self._high, peak)
        finally:
            counter.stack.pop()
            self._note(self._high)  # the outer region's peak includes this one's
            counter.lock.release()
        self.peak_bytes = max(0, self._high - self._start)


class PeakMeter:
    """Measures regions of work on one device.

    `kind` says what is read: "cuda allocator" (bytes allocated through the caching
    allocator), "peak RSS" (resident memory of the whole process, Linux), or "none"
    (regions report `peak_bytes` None). `cuda` replaces `torch.cuda` (for tests).

    Peak RSS counts only pages the work newly touches. glibc's malloc keeps freed blocks
    under its mmap threshold (dynamic, up to 32 MiB) for reuse, so in a long-lived process
    readings match the work's need only if the process started with
    MALLOC_MMAP_THRESHOLD_=131072; see benchmarks/results/cpu-2core-meter.md.
    """

    def __init__(self, device: torch.device | str, cuda: Any = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            cuda = cuda if cuda is not None else torch.cuda
            index = self.device.index if self.device.index is not None else cuda.current_device()
            # Keyed by the module object's id; the counter keeps the object alive, so the id stays unique.
            self._counter = _shared_counter(("cuda", id(cuda), index), lambda: _CudaCounter(cuda, index))
        elif self.device.type == "cpu":
            counter = _rss_counter()
            with _counters_lock:
                resettable = counter is not None and counter.probe()
            self._counter = counter if resettable else None
        else:
            self._counter = None

    @property
    def kind(self) -> str:
        return self._counter.kind if self._counter is not None else "none"

    def region(self, trim: bool | None = None) -> Region:
        """A region to measure work in. `trim` (CPU): first return glibc's free heap memory to the
        kernel (malloc_trim), so that work reusing it shows as growth. Without MALLOC_MMAP_THRESHOLD_
        that turns readings that can be far too low into ones that err high; it costs about a
        millisecond (tens with a fragmented heap) and the work touches those pages afresh.
        None (default): trim exactly when the peak RSS cannot be trusted as is (see
        `rss_follows_allocations`)."""
        if trim is None:
            # Always on the CPU: even with MALLOC_MMAP_THRESHOLD_, blocks under the threshold fragment the
            # heaps of the threads that allocate them, so the resident memory between chunks creeps up
            # (18 MiB over 9 chunks of wide_mlp) unless the holes are returned before each chunk.
            trim = self.kind == "peak RSS"
        counter = self._counter
        if counter is not None and counter.dead:  # this meter was made before a fork
            self.__init__(self.device, getattr(counter, "cuda", None))
        return Region(self._counter, trim)


_TRIMMER = None


def release_free_heap() -> None:
    """Return glibc's free heap memory to the kernel (malloc_trim): between the chunks of a run under a budget,
    so that fragments of earlier chunks do not pile up in the resident memory. A no-op elsewhere."""
    global _TRIMMER
    if _TRIMMER is None:
        try:
            _TRIMMER = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _TRIMMER = lambda pad: 0  # noqa: E731 - not glibc
    _TRIMMER(0)


def rss_follows_allocations() -> bool:
    """Whether this process's resident memory grows and shrinks with its allocations: glibc was started
    with MALLOC_MMAP_THRESHOLD_ at most 128 KiB, so freed blocks go back to the kernel instead of staying
    resident for reuse (without it, a region around work that reuses them reads 0)."""
    value = os.environ.get("MALLOC_MMAP_THRESHOLD_", "")
    return value.isdigit() and int(value) <= 131072


def process_peak_rss() -> int | None:
    """The true peak RSS of this process since it started, in bytes (None where /proc is missing).

    Regions reset the kernel's peak (VmHWM, and with it getrusage's ru_maxrss), so read
    this instead: it adds back the peaks seen before each reset.
    """
    counter = _rss_counter()
    if counter is None:
        return None
    # VmHWM first: a reset in another thread records `seen` before it resets, so this order never loses a peak.
    _, peak = counter.read()
    return max(peak, counter.seen)
