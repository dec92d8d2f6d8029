"""Pushing basis chunks through a method: sized by a policy, measured when asked, halved when memory runs out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .._core.problem import Problem
from .._methods.base import Method
from .._measure.meter import release_free_heap
from .layout import collector, seeds

logger = logging.getLogger("autojac")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "not enough memory" in text or "out of memory" in text
    )


@dataclass
class ChunkResult:
    size: int
    seconds: float | None
    """Wall seconds of this chunk (CUDA-synchronized), if it was timed."""
    peak_bytes: int | None
    """Peak extra bytes while it ran, its outputs included, if it was measured."""


@dataclass
class RunLog:
    """What a run did, chunk by chunk; `events` in words (out-of-memory retries)."""

    chunks: list[ChunkResult] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    @property
    def vectors(self) -> int:
        return sum(c.size for c in self.chunks)

    @property
    def seconds(self) -> float | None:
        if not self.chunks or any(c.seconds is None for c in self.chunks):
            return None
        return sum(c.seconds for c in self.chunks)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def push(
    method: Method,
    state: object,
    assembler,
    problem: Problem,
    start: int,
    stop: int,
    sizer,
    log: RunLog,
    meter=None,
    progress: Callable[[int], None] | None = None,
    after_chunk: Callable[[RunLog], bool] | None = None,
) -> int:
    """Push basis vectors start..stop through `method` into `assembler`; returns where it stopped.

    `sizer` decides each chunk's size (`next`, `observe`, `shrink`; see
    `_planning.sizing.Sizer`) and whether chunks are timed or measured.

    Chunks that run out of memory are retried at half the size (down to 1; the
    chunks already done are kept). `after_chunk(log)` returning False stops the
    run early (a trial that projects too slow); the return value says where.
    """
    device = problem.inputs.device
    position = start
    trim = getattr(sizer, "trim_between", False)
    baseline = None  # the counter at the run's first measured chunk
    while position < stop:
        if trim and position > start:
            release_free_heap()  # fragments of the last chunk must not pile up under a budget
        k = sizer.next(stop - position)
        try:
            basis = seeds(problem, method.by_rows, position, position + k)
            if sizer.measured and meter is not None:
                with meter.region() as region:
                    parts = method.chunk(state, basis)
                seconds, peak = region.seconds, region.peak_bytes
                if peak is not None:
                    # Against the run's start, not the chunk's: workspaces that kernels keep after a larger chunk
                    # than any before (BLAS and oneDNN buffers per thread) stay resident, and count.
                    baseline = region.start_bytes if baseline is None else baseline
                    peak += max(region.start_bytes - baseline, 0)
            elif sizer.timed:
                _synchronize(device)
                began = time.perf_counter()
                parts = method.chunk(state, basis)
                _synchronize(device)
                seconds, peak = time.perf_counter() - began, None
            else:
                parts = method.chunk(state, basis)
                seconds = peak = None
            assembler.add(position, position + k, parts)
            parts = basis = None
        except Exception as exc:
            if not is_out_of_memory(exc) or k == 1:
                raise
            parts = basis = None  # drop this chunk's tensors before retrying
            if device.type == "cuda":
                torch.cuda.empty_cache()
            smaller = sizer.shrink(k)
            log.events.append(f"{method.name}: out of memory at chunk size {k}; retried at {smaller}")
            logger.debug(log.events[-1])
            continue
        chunk = ChunkResult(k, seconds, peak)
        sizer.observe(chunk)
        log.chunks.append(chunk)
        position += k
        if progress is not None:
            progress(k)
        if after_chunk is not None and position < stop and not after_chunk(log):
            break
    if trim:
        release_free_heap()  # and before the check and assembly that follow the run
    return position


class FixedChunks:
    """The simplest sizer: `chunk_size` vectors a chunk (balanced), halved for good after running out of memory."""

    timed = False
    measured = False

    def __init__(self, chunk_size: int, trim_between: bool = False) -> None:
        self.chunk_size = max(1, chunk_size)
        self.trim_between = trim_between

    def next(self, n_left: int) -> int:
        k = min(self.chunk_size, n_left)
        return -(-n_left // -(-n_left // k)) if k else 0

    def observe(self, chunk: ChunkResult) -> None:
        pass

    def shrink(self, failed: int) -> int:
        self.chunk_size = max(1, failed // 2)
        return self.chunk_size

    def sizes(self, n: int) -> set[int]:
        """The chunk sizes a run of n vectors takes, none running out of memory."""
        sizes, left = set(), n
        while left > 0:
            size = self.next(left)
            sizes.add(size)
            left -= size
        return sizes


def run_method(method: Method, f: Callable, xs: Sequence[torch.Tensor], problem: Problem, chunk_size: int,
               create_graph: bool = False, events: list[str] | None = None) -> object:
    """The whole Jacobian by one method at one chunk size, with nothing measured or checked (for tests and tools)."""
    from .._methods.base import grad_mode

    log = RunLog()
    with grad_mode(create_graph):
        state = method.prepare(f, xs, problem, create_graph)
        assembler = collector(problem, method.by_rows)
        push(method, state, assembler, problem, 0, method.basis_size(problem), FixedChunks(chunk_size), log)
        result = assembler.result()
    if events is not None:
        events += log.events
    return result
