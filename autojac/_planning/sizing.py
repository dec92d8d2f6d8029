"""How big the next chunk is: fixed, or growing while measurements say it fits the budget and pays."""

from __future__ import annotations

from collections.abc import Sequence

from .._execute.run import ChunkResult
from .cost_model import Line, balanced, fit_line, next_chunk


class Sizer:
    """Chunk sizes for one run: fixed, or growing while measurements say the next one fits and pays.

    A growing sizer starts from what the prior allows (bytes per vector, charged
    in full, see `cost_model.next_chunk`), then fits a line to the measured chunk
    peaks. `timed`/`measured` say what each chunk must report.
    """

    def __init__(self, chunk_size: int | None = None, *, room_bytes: float | None = None,
                 prior_bytes_per_vector: float | None = None, memory: Sequence[tuple[int, float]] = (),
                 timed: bool = False, measured: bool = False, minimum: int = 1, first: int | None = None,
                 reserve_bytes: float = 0.0, trim_between: bool = False, cap_fixed: bool = False,
                 new_size_reserve: float = 0.0) -> None:
        self.fixed = chunk_size
        self.trim_between = trim_between
        """Return free heap memory between chunks (CPU under a budget; see `meter.release_free_heap`)."""
        self.cap_fixed = cap_fixed
        """Hold a fixed chunk size to what the memory allows too (a trial's slice; a user's size is honoured)."""
        self.first = first
        self.reserve = reserve_bytes
        self.new_size_reserve = new_size_reserve
        """Kept back from the room by a chunk larger than any measured (NOTE: [A larger chunk meets new workspaces])."""
        self.room = room_bytes
        self.prior = prior_bytes_per_vector
        self.points = list(memory)
        self.rates: list[tuple[int, float]] = []
        self.sizes: list[int] = []
        self.timed = timed or measured
        self.measured = measured
        self.minimum = minimum
        self.ceiling: int | None = None
        """Set after running out of memory: no chunk may be larger again in this run."""

    def next(self, n_left: int) -> int:
        if self.fixed is not None:
            k = self.fixed
            if self.cap_fixed and self.room is not None:
                line = fit_line(self.points) if self.points else None
                k = min(k, next_chunk(n_left, self.sizes, line, self.room, self.prior, self.rates, self.minimum,
                                      None, self.reserve, self._measured_up_to(), self.new_size_reserve))
        else:
            line = fit_line(self.points) if self.points else None
            k = next_chunk(n_left, self.sizes, line, self.room, self.prior, self.rates, self.minimum, self.first,
                           self.reserve, self._measured_up_to(), self.new_size_reserve)
        if self.ceiling is not None:
            k = min(k, self.ceiling)
        return balanced(n_left, max(1, min(k, n_left)))

    def _measured_up_to(self) -> int:
        return max((k for k, _ in self.points), default=0)

    def observe(self, chunk: ChunkResult) -> None:
        self.sizes.append(chunk.size)
        if chunk.peak_bytes is not None:
            self.points.append((chunk.size, float(chunk.peak_bytes)))
        if chunk.seconds is not None and chunk.size:
            self.rates.append((chunk.size, chunk.seconds / chunk.size))

    def shrink(self, failed: int) -> int:
        self.ceiling = max(1, failed // 2)
        return self.ceiling

    def memory_line(self) -> Line | None:
        return fit_line(self.points)


