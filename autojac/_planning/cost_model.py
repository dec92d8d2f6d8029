"""Pure arithmetic of cost: balanced chunks, memory lines fitted to measured chunks, chunk sizes that fit.

Nothing here runs `f` or asks the machine anything; measurements come in as numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MEMORY_SAFETY = 1.15
"""Measured memory is scaled by this before it is compared with the budget (allocator slack, noise)."""
GROWTH = 4
"""A chunk may be at most this many times the largest one measured so far (extrapolation stays short)."""
FAR_FROM_BUDGET = 16
"""A run whose measured line (one chunk's peak charged per vector, if it is the only one) puts everything
left under 1/FAR_FROM_BUDGET of the room takes it in one chunk, past GROWTH, if that chunk is at most
FAR_FROM_BUDGET times the largest measured: workspaces a larger chunk might meet do not come near the
budget. A line without a slope (a reading of nothing, or two noisy points clipped flat) does not count. Under the default budget (half the free memory) the bound that
has a first call's chunks measured is loose (24 GB per second of evaluation on 2 threads), so small
functions were measured and held to GROWTH: a transformer layer ran its first call in chunks of 32, 112
and 112 (about 12 MiB for all 256 rows), an RK4 rollout in 2, 7 and 7: three backward passes where two
do (15 ms instead of 18-20; the rollout 16 ms instead of 29)."""
PAYS = 0.95
"""A larger chunk pays if its time per vector is below this share of the smaller one's..."""
PAYS_FROM = 64
"""...compared only from this many vectors a chunk: below it, per-chunk overhead always makes growing pay,
and the timings of small chunks are too noisy to stop on."""


def n_chunks(n: int, chunk_size: int) -> int:
    return 0 if n <= 0 else -(-n // max(chunk_size, 1))


def balanced(n: int, chunk_size: int) -> int:
    """The size of each of ceil(n / chunk_size) nearly equal chunks (DifferentiationInterface's rule)."""
    if n <= 0:
        return 0
    return -(-n // n_chunks(n, chunk_size))


@dataclass(frozen=True)
class Line:
    """y = fixed + per_vector * k, both >= 0."""

    fixed: float
    per_vector: float

    def at(self, k: int) -> float:
        return self.fixed + self.per_vector * k


CLOSE_SIZES = 2
"""A slope is read only between chunk sizes at least this factor apart: measured at 73 and 74 vectors, peaks
19.2 and 18.5 MiB made a line with no per-vector cost, which put the whole basis (150 MiB) in one chunk."""


def fit_line(points: Sequence[tuple[int, float]]) -> Line | None:
    """The line through measured (chunk size, value) points.

    One size, or sizes less than CLOSE_SIZES apart: everything is charged to the
    vectors (the conservative bound for k above them, since values are a + b*k
    with a, b >= 0). Otherwise: the line through the smallest and the largest
    size's lowest values, clipped to a, b >= 0.
    """
    if not points:
        return None
    lowest: dict[int, float] = {}
    for k, y in points:
        lowest[k] = min(y, lowest.get(k, math.inf))
    ks = sorted(lowest)
    k0, k1 = ks[0], ks[-1]
    if k1 < CLOSE_SIZES * k0:  # sizes too close for a slope (noise could make it anything): the one-size bound
        return Line(0.0, max(lowest[k] / max(k, 1) for k in ks))
    slope = max((lowest[k1] - lowest[k0]) / (k1 - k0), 0.0)
    return Line(max(lowest[k0] - slope * k0, 0.0), slope)


def largest_fitting(line: Line, room_bytes: float, n: int) -> int:
    """The largest chunk size (0 if none) whose peak, scaled by MEMORY_SAFETY, fits in `room_bytes`."""
    if line.per_vector <= 0:
        return n if MEMORY_SAFETY * line.fixed <= room_bytes else 0
    k = int((room_bytes / MEMORY_SAFETY - line.fixed) // line.per_vector)
    return max(0, min(n, k))


def fitting_size(line: Line, room_bytes: float, n: int, measured_up_to: int, new_size_reserve: float) -> int:
    """The largest chunk size that fits by `line`: up to `measured_up_to` (sizes measured) in the whole room,
    beyond it with `new_size_reserve` kept back (NOTE: [A larger chunk meets new workspaces]); a room smaller
    than the reserve does not grow past the sizes measured."""
    k = largest_fitting(line, room_bytes, n)
    if k <= measured_up_to or new_size_reserve <= 0:
        return k
    beyond = largest_fitting(line, room_bytes - new_size_reserve, n)
    return max(beyond, min(k, measured_up_to))


# NOTE: [A larger chunk meets new workspaces]
# A line through measured chunk peaks holds for chunk sizes the process has run; a larger chunk is a new shape
# for the matrix kernels, whose per-thread packing buffers and workspaces (NOTE: [Why a CPU reserve]) appear in
# the peak RSS the first time. wide_mlp (large, 64 MiB weights) in a fresh process, each size measured twice in
# increasing order after malloc_trim: torch.autograd's vmap engine 12 -> 9.2 then 4.5 MiB, 46 -> 27.1 then
# 17.5 MiB, 0.38 MiB a vector from the second run on; torch.func's 4.8-9.5 MiB above its line up to 60
# vectors. A later call that learned its memory again (chunks 1, 4, 16, then 55 by the line) measured
# 30.8 MiB where the line said 21.5 and the room was 26.9; the budget test's process went 0.2-0.5 MiB over a
# 32.6 MiB budget on such calls. On an AMD EPYC VM the workspaces stay resident once met: at 13.1 MiB the
# first call's second chunk (8 vectors after 2) read 12.7 MiB against 3.2 MiB by the line, and the call and the
# next went over (12.8 and 18.4 MiB); at 8.7 MiB the same. So a chunk beyond the sizes measured keeps the CPU
# reserve out of the room its line may fill, and a room smaller than the reserve does not grow past the sizes
# measured; sizes already measured may fill the room as their line says. Held to a quarter of the room, the
# reserve let the tight budgets grow into the workspaces and over (budget sweep: 10x and 15x failed); whole,
# every budget held there (7.4 and 2.6 MiB first calls), at a price: chunks of 2 at 10x and 15x, 20-23 s
# against 2.0 s unbudgeted, where a CPU without such workspaces ran 4-5 s. The workspaces are for the operands
# the kernels pack, so the reserve is at most the largest of them a first call knows (the largest tensor `f`
# holds, its forward pass, the inputs and outputs): `tanh(A @ x) * x` with a 2 MiB A keeps 2 MiB, and a
# 4.9 MiB room ran 7 chunks (2, 8, 32, 118, ...) where the whole 8 MiB held it to 256 chunks of 2.

def next_chunk(
    n_left: int,
    sizes_done: Sequence[int],
    memory: Line | None,
    room_bytes: float | None,
    prior_bytes_per_vector: float | None,
    seconds_per_vector: Sequence[tuple[int, float]] = (),
    minimum: int = 1,
    first: int | None = None,
    reserve_bytes: float = 0.0,
    measured_up_to: int = 0,
    new_size_reserve: float = 0.0,
) -> int:
    """How many basis vectors the next chunk of a growing run takes (before balancing).

    - Memory: everything left if there is no budget to keep; else what the
      measured memory line lets fit, or before any measurement what the prior
      (bytes per vector, charged in full) lets fit in the room less `reserve_bytes`
      (workspaces a measurement would see, which the prior does not know).
    - A chunk larger than any measured (`measured_up_to`) keeps `new_size_reserve` back, see NOTE: [A larger
      chunk meets new workspaces].
    - The first chunk is at most `first` (a run expected to be long starts small,
      so that its time is known early); later chunks are at most GROWTH times the
      largest so far, and no larger than the largest once a larger chunk stopped
      paying (time per vector not below PAYS of the smaller one's).
    """
    if room_bytes is None:
        k = n_left
    elif memory is not None:
        k = fitting_size(memory, room_bytes, n_left, measured_up_to, new_size_reserve)
    elif prior_bytes_per_vector:
        k = int(max(room_bytes - reserve_bytes, 0) / MEMORY_SAFETY // prior_bytes_per_vector)
    else:
        k = n_left
    if not sizes_done:
        if first is not None:
            k = min(k, first)
    else:
        plenty = room_bytes is not None and memory is not None and (
            (len(sizes_done) >= 2 and 2 * MEMORY_SAFETY * memory.at(n_left) <= room_bytes
             and 4 * GROWTH * max(sizes_done) >= n_left)
            or (memory.per_vector > 0 and FAR_FROM_BUDGET * MEMORY_SAFETY * memory.at(n_left) <= room_bytes
                and n_left <= FAR_FROM_BUDGET * max(sizes_done)))
        if not plenty:  # extrapolate at most GROWTH times the largest chunk measured, unless far from the budget
            k = min(k, GROWTH * max(sizes_done))
        cap = paying_cap(seconds_per_vector)
        if cap is not None:
            k = min(k, cap)
    return max(minimum, min(n_left, k))


def paying_cap(seconds_per_vector: Sequence[tuple[int, float]]) -> int | None:
    """The chunk size to stay at once a larger chunk stopped paying, from (chunk size, seconds per vector)
    points: the size with the best time per vector, if the largest chunk's is not below PAYS of the smallest's.
    Only among chunks of at least PAYS_FROM vectors: small chunks always pay to grow.

    The smallest chunks of a run are below PAYS_FROM, so comparing with the smallest of all (as before) never
    stopped a run: a 60-step RK4 rollout of 3000 unknowns ran chunks of 25, 99 and 359 vectors at 17.1, 18.0
    and 19.9 ms a vector, then all 2509 left in one chunk at 49.1 ms a vector (2-core CPU): 132 s in all."""
    timed = sorted((k, t) for k, t in seconds_per_vector if k >= PAYS_FROM)
    if len(timed) < 2:
        return None
    (k_small, t_small), (k_big, t_big) = timed[0], timed[-1]
    if k_big > k_small and t_big > PAYS * t_small:
        return min(timed, key=lambda point: point[1])[0]
    return None


def projected_seconds(fixed_seconds: float, slice_seconds: float, slice_vectors: int, n: int) -> float:
    """A whole run's time from one slice of it: the slice's rate for every vector (pessimistic for vmap)."""
    return fixed_seconds + slice_seconds * n / max(slice_vectors, 1)
