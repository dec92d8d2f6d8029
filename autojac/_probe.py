"""Capability and cost probes: run each candidate method on small chunks and measure it.

The results (`Cost`) are the planner's inputs. A method that fails on a probe
chunk is dropped with the reason kept; one whose vmap fell back to a slow
per-sample loop keeps running, and its measured cost shows the slowdown.

NOTE: [No warning filters]
Probes never touch `warnings` filters: `warnings.catch_warnings` saves and
restores the process-wide filter list, so two threads probing at once left it
changed for good (later user warnings vanished). `f`'s own warnings show as
Python's default filters decide (once per place).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

import torch

from ._execute.basis import basis_chunk
from ._core.errors import NotBatchAwareError
from ._execute.run import run_method
from ._measure.tracker import measure_peak_bytes, timed
from ._methods.base import Method, call, grad_mode
from ._plan import Cost
from ._planner import SAFETY, estimate_seconds
from ._core.problem import Problem
from ._methods.reverse import ReverseLoop

logger = logging.getLogger("autojac")

PROBE_SMALL = 2
"""Vectors in the small probe chunk: 2, not 1, because a chunk of one bypasses vmap."""
PROBE_LARGE = 16
"""Vectors in the large probe chunk of vectorized methods; the line through both gives the slope."""
PROBE_LARGE_LOOP = 4
"""A loop costs the same per vector at any chunk size, so fewer vectors tell as much."""


def check_batch_aware(f: Callable, xs: Sequence[torch.Tensor], problem: Problem) -> None:
    """Raise NotBatchAwareError unless f maps a batch of 2 inputs to the 2 matching outputs.

    The batch holds the input and a perturbed copy; each output row must match f
    on that row alone, which catches functions that mix rows (reductions over
    dim 0, batch norm in training mode) as well as ones that reject the shape.
    """
    generator = torch.Generator(device=xs[0].device).manual_seed(0)
    others = [x.detach() + 0.5 * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) for x in xs]
    batch = [torch.stack([x.detach(), o]) for x, o in zip(xs, others)]
    with torch.no_grad():
        alone = [call(f, [x.detach().clone() for x in xs]), call(f, others)]
        try:
            together = call(f, batch)
        except Exception as exc:
            raise NotBatchAwareError(
                "jacobian: vectorize='repeat' needs `f` to accept inputs with an extra leading batch "
                f"dimension, but `f` raised {type(exc).__name__} on a batch of 2. Use vectorize='vmap' or 'loop'."
            ) from exc
    expected = [(2, *s) for s in problem.out_shapes]
    got = [tuple(y.shape) for y in together]
    if got != expected:
        raise NotBatchAwareError(
            f"jacobian: vectorize='repeat' needs `f` to map a batch of 2 inputs to outputs of shapes {expected}, "
            f"but got {got}. Use vectorize='vmap' or 'loop', or make `f` batch-aware."
        )
    for row in range(2):
        for y_batch, y_alone in zip(together, alone[row]):
            scale = 1e-5 * (1 + float(y_alone.detach().abs().nan_to_num(0, 0, 0).max()) if y_alone.numel() else 1)
            if not torch.allclose(y_batch[row], y_alone, rtol=1e-3, atol=scale, equal_nan=True):
                raise NotBatchAwareError(
                    "jacobian: vectorize='repeat' needs the rows of a batch to be independent, but `f` on a batch "
                    f"of 2 gave row {row} different from `f` on that input alone (does `f` reduce over the first "
                    "dimension, or use batch statistics?). Use vectorize='vmap' or 'loop'."
                )


def check_trick_consistent(method: Method, f: Callable, xs: Sequence[torch.Tensor], problem: Problem) -> None:
    """Raise unless the double-VJP trick agrees with a plain VJP on one random pair of vectors.

    For any u and w, w . (J u) must equal (J^T w) . u. A backward formula that is
    not differentiable but does not say so (it detaches, or goes through Python
    numbers) makes the trick return zeros; this catches it before it is used.
    """
    generator = torch.Generator(device=problem.inputs.device).manual_seed(1)
    device = problem.inputs.device
    u = [torch.randn((1, *s), generator=generator, dtype=d, device=device) for s, d in zip(problem.inputs.shapes, problem.inputs.dtypes)]
    w = [torch.randn((1, *s), generator=generator, dtype=d, device=device) for s, d in zip(problem.out_shapes, problem.out_dtypes)]
    with grad_mode(False):
        state = method.prepare(f, xs, problem, False)
        Ju = method.chunk(state, u)
        with torch.enable_grad():  # on the trick's own graph where it has one: the same evaluation of f
            JTw = method.same_realization_vjp(state, [wi[0] for wi in w])
        if JTw is None:
            JTw = ReverseLoop().chunk(ReverseLoop().prepare(f, xs, problem, False), w)
        else:
            JTw = tuple(None if g is None else g.unsqueeze(0) for g in JTw)
    left = sum(float((wi * ji).sum()) for wi, ji in zip(w, Ju) if ji is not None)
    right = sum(float((ui * gi).sum()) for ui, gi in zip(u, JTw) if gi is not None)
    if not (math.isfinite(left) and math.isfinite(right)):
        return  # NaN or Inf at this point (e.g. in the inputs): the check cannot tell here
    if abs(left - right) > 1e-3 * (abs(left) + abs(right)) + 1e-6:
        raise ValueError(
            f"the double-VJP trick gave w.(J u) = {left:.6g} but the VJP gives (J^T w).u = {right:.6g}: "
            "a backward formula of `f` is not differentiable (it detaches or leaves torch)"
        )


def _run(method: Method, f: Callable, xs: Sequence[torch.Tensor], problem: Problem, create_graph: bool, k: int) -> None:
    shapes, sizes, dtypes = method.basis_layout(problem)
    with grad_mode(create_graph):
        state = method.prepare(f, xs, problem, create_graph)
        method.chunk(state, basis_chunk(0, k, shapes, sizes, dtypes, problem.inputs.device))


def _chunk_seconds(method, f, xs, problem, create_graph, k, repeats) -> tuple[float, float]:
    """(prepare seconds, chunk seconds) at chunk size k, each the fastest of 2 to `repeats` runs.

    Cheap probes are repeated more (up to `repeats`, while under 50 ms in all):
    their noise is what decides between near-equal candidates on small problems.
    """
    device = problem.inputs.device
    shapes, sizes, dtypes = method.basis_layout(problem)
    best_prep = best_chunk = float("inf")
    spent, runs = 0.0, 0
    while runs < 2 or (runs < repeats and spent < 0.05):
        with grad_mode(create_graph):
            prep, state = timed(lambda: method.prepare(f, xs, problem, create_graph), device)
            basis = basis_chunk(0, k, shapes, sizes, dtypes, device)
            seconds, _ = timed(lambda: method.chunk(state, basis), device)
        best_prep, best_chunk = min(best_prep, prep), min(best_chunk, seconds)
        spent, runs = spent + prep + seconds, runs + 1
    return best_prep, best_chunk


def _line(k0: int, y0: float, k1: int, y1: float) -> tuple[float, float]:
    """(intercept, slope) through two probe measurements, neither negative.

    With one probe size (the whole basis fit in it), the probe is the run: all per vector.
    """
    if k1 == k0:
        return 0.0, y0 / max(k0, 1)
    slope = max((y1 - y0) / (k1 - k0), 0.0)
    return max(y0 - slope * k0, 0.0), slope


REFINE_ROUNDS = (3, 9)
"""Interleaved rounds of whole runs when refining: at least 3 (1 if they are slow), at most 9..."""
REFINE_SECONDS = 0.3
"""...adding rounds while the rounds so far took less than this (3 rounds while under 3 times this).
A contender estimated under a third of this runs once first to warm up; slower runs need no warm-up
(first-run costs such as tracing and fresh pages are small beside them) and would double the cost."""


def _large_within(room_bytes: int | None, small: int, peak_small: int, large: int) -> int:
    """The largest probe chunk up to `large` whose peak surely fits in `room_bytes`.

    Peak memory is a + b*k with a, b >= 0, so for k >= small it is at most
    peak_small * k / small: charging the whole small peak to its vectors bounds
    the larger chunk from above. If not even one more vector fits, the large
    probe is skipped (the memory line is then all per-vector: pessimistic).
    """
    if room_bytes is None or peak_small <= 0:
        return large
    fits = int(room_bytes / SAFETY * small / peak_small)
    return max(small, min(large, fits))


def refine(contenders: Sequence[tuple[Cost, Method, int]], f: Callable, xs: Sequence[torch.Tensor],
           problem: Problem, create_graph: bool) -> list[Cost]:
    """Time whole Jacobians of close contenders, each at the chunk size the plan would use.

    The probes' small chunks extrapolate poorly to chunks of hundreds (caches,
    BLAS blocking, fresh pages for large buffers), and leave out building the
    basis and assembling the result; for close calls between cheap candidates
    the real run is what should decide. Each cheap contender runs once to warm
    up (not counted), then all run in interleaved rounds, so a burst of noise on
    a busy machine hits every contender alike; each keeps its fastest round.
    Noise here only ever adds time, and comes in bursts that last for rounds (on
    the 2-core benchmark machine one method took 4 to 18 ms run to run on
    pde_residual): the median of 9 rounds still caught a burst now and then and
    chose a method 1.8x slower, the fastest round did not.
    A contender that fails at its full chunk (for example out of memory) keeps
    its extrapolated estimate.
    """
    device = problem.inputs.device
    alive: dict[int, list[float]] = {}

    def run(i: int) -> float | None:
        _, method, chunk_size = contenders[i]
        try:
            seconds, _ = timed(lambda: run_method(method, f, xs, problem, chunk_size, create_graph, []), device)
        except Exception as exc:
            logger.debug("%s not refined at chunk %d: %s", method.name, chunk_size, exc)
            alive.pop(i, None)
            return None
        return seconds

    for i, (cost, _, chunk_size) in enumerate(contenders):
        alive[i] = []
        estimate = estimate_seconds(cost, chunk_size)
        if estimate is None or estimate < REFINE_SECONDS / 3:
            run(i)
    spent, rounds = 0.0, 0
    while alive and rounds < REFINE_ROUNDS[1] and (
        rounds == 0 or spent < REFINE_SECONDS or (rounds < REFINE_ROUNDS[0] and spent < 3 * REFINE_SECONDS)
    ):
        order = list(alive)
        order = order[rounds % len(order):] + order[:rounds % len(order)]  # rotate who goes first
        for i in order:
            seconds = run(i)
            if seconds is not None:
                alive[i].append(seconds)
                spent += seconds
        rounds += 1
    refined = []
    for i, (cost, _, chunk_size) in enumerate(contenders):
        times = alive.get(i)
        refined.append(dataclasses.replace(cost, measured_run=(chunk_size, min(times))) if times else cost)
    return refined


def _and(note: str, more: str) -> str:
    return f"{note}; {more}" if note else more


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def probe(
    method: Method,
    f: Callable,
    xs: Sequence[torch.Tensor],
    problem: Problem,
    create_graph: bool,
    measure: bool = True,
    repeats: int = 5,
    chunk_size: int | None = None,
    room_bytes: int | None = None,
    beat_seconds: float | None = None,
) -> Cost:
    """Check that `method` runs on `f`, and (if `measure`) fit its time and memory lines.

    A fixed `chunk_size` caps the capability probe, so chunk_size=1 with vmap is
    judged by what it runs: no vmap at all. With `room_bytes` (what a memory
    budget leaves to the probes), the large probe chunk is cut to what surely
    fits, judged from the small probe's peak: see `_large_within`. If the small
    chunk alone takes longer than `beat_seconds` (what the best candidate so
    far needs for the whole Jacobian, with a margin), this method cannot win on
    time, so its time is not measured at the large chunk; its memory still is,
    as it may be the one that fits a tight budget.
    """
    n = method.basis_size(problem)
    device = problem.inputs.device
    small = min(n, PROBE_SMALL, chunk_size or PROBE_SMALL)
    try:
        if method.vectorize == "repeat":
            check_batch_aware(f, xs, problem)
        if n == 0:
            return Cost(method.mode, method.vectorize, n, engine=method.engine, seconds_fixed=0.0, seconds_per_chunk=0.0,
                        seconds_per_vector=0.0, bytes_fixed=0, bytes_per_vector=0)
        m_small = measure_peak_bytes(lambda: _run(method, f, xs, problem, create_graph, small), device)[0]
        if method.mode == "forward-trick":
            check_trick_consistent(method, f, xs, problem)
    except Exception as exc:
        logger.debug("%s dropped: %s", method.name, exc)
        return Cost(method.mode, method.vectorize, n, engine=method.engine, dropped=_first_line(exc), error=exc)
    note = ""
    if not measure:
        return Cost(method.mode, method.vectorize, n, engine=method.engine, note=note)

    large = min(n, PROBE_LARGE_LOOP if method.vectorize == "loop" else PROBE_LARGE)

    def chunk_seconds(k: int) -> tuple[float, float]:
        return _chunk_seconds(method, f, xs, problem, create_graph, k, repeats)

    def peak(k: int) -> int:
        return measure_peak_bytes(lambda: _run(method, f, xs, problem, create_graph, k), device)[0]

    try:
        prep, t_small = chunk_seconds(small)
        capped = _large_within(room_bytes, small, m_small, large)
        if capped < large:
            note = _and(note, f"probed at {capped} vectors, not {large}, to stay within the budget")
            large = capped
        if large > small:
            if beat_seconds is not None and t_small > beat_seconds:
                note = _and(note, f"{small} vectors took longer than the best whole Jacobian: timed at one size")
                t_large = t_small * large / small  # all per vector: pessimistic, and it cannot win anyway
            else:
                _, t_large = chunk_seconds(large)
            m_large = peak(large)
        else:
            t_large, m_large = t_small, m_small
    except Exception as exc:
        logger.debug("%s dropped while measuring: %s", method.name, exc)
        return Cost(method.mode, method.vectorize, n, engine=method.engine, dropped=_first_line(exc), error=exc)
    per_chunk, per_vector = _line(small, t_small, large, t_large)
    bytes_fixed, bytes_per_vector = _line(small, m_small, large, m_large)
    cost = Cost(
        method.mode, method.vectorize, n, engine=method.engine,
        seconds_fixed=prep, seconds_per_chunk=per_chunk, seconds_per_vector=per_vector,
        bytes_fixed=int(bytes_fixed), bytes_per_vector=int(bytes_per_vector + 0.5), note=note,
    )
    logger.debug("%s measured: %s", method.name, cost)
    return cost
