"""Whether a new plan computes a compressed (sparse) Jacobian: detect the pattern, colour it, or stay dense.

NOTE: [When structure is worth finding]
Detection traces `f` once and propagates index sets through its ops; colouring is
cheap beside it. It pays when the dense Jacobian is long. A first call of a
function with at least MIN_PASSES dense passes whose upper bound (one unbatched
VJP per pass: a loop) could pay for a trace (about TRACE_FACTOR evaluations of
`f`) runs its dense method on a first slice of the basis, times it, and projects
the whole dense Jacobian; structure is looked for only if the trace is estimated
under DETECT_SHARE of that projection, so a dense function's first call is slowed
by at most that share (plus one extra chunk). The slice's own rows (or columns)
are a free hint: where at most LOOKS_SPARSE of their entries are nonzero, the
trace may take up to SPARSE_DETECT_SHARE of the projection (a 2-D Brusselator's
first 64 rows hold 6 nonzeros in 2048 each; its trace, about 40 evaluations, was
12% of the projection, so its first call ran dense: 130 ms against 40 ms). With a pattern, compression is
used when it needs at most SAVES of the dense passes; the dense slice is then
dropped and the Jacobian computed one seed per colour. A user's pattern is
always coloured and used. A dense plan whose first call did not look (too short
for that call to pay a trace) looks on a later call, from the exploration credit
(`later_calls._look_for_structure`): a Jacobian called again and again pays for it.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import scipy.sparse as sp
import torch

from .._core.errors import InputError
from .._core.problem import Problem
from .._execute.sparse import SparseLayout
from .._execute.verify import Blocks, host_view
from .._structure import Coloring, Pattern, color_columns, color_rows, color_symmetric, detect
from .._structure.detect import TooDense, TooLong
from .._structure.pattern import side_grids

logger = logging.getLogger("autojac")

MIN_PASSES = 64
"""Below this many dense passes, structure is never looked for."""
TRACE_FACTOR = 40.0
"""Detection is estimated at this many evaluations of `f` (tracing plus the index-set rules)..."""
TRACE_SECONDS_MIN = 0.004
"""... and at least this long: a fake-tensor trace has a fixed cost (3.7 ms for a 6-op stencil whose
evaluation takes 22 us, 170 evaluations; 29 ms the first time in a process)."""


def trace_estimate(eval_seconds: float) -> float:
    return max(TRACE_FACTOR * eval_seconds, TRACE_SECONDS_MIN)


DETECT_SHARE = 0.1
"""Look for structure only if its estimated cost is under this share of the dense Jacobian's estimate."""
STRUCTURE_BYTES_PER_NONZERO = 192
"""What finding and colouring a pattern takes at its peak, per nonzero (NOTE: [Structure first when only a sparse
result fits]). Measured peaks over the call's start (MALLOC_MMAP_THRESHOLD_=131072): detection 40-141 bytes a
nonzero (a real trace holds `f`'s real intermediates; fake tensors 40-85), colouring 34-68 after it; a whole first
call of a 450 x 450 heat equation (1.0 million nonzeros, output="sparse") peaked at 182 MiB, 189 bytes a nonzero,
with its forward pass, reference product and sparse result."""
SAVES = 0.5
"""Use compression only if it needs at most this share of the dense passes."""
DETECT_LIMIT = 3.0
"""Detection is stopped once it has taken this many times the projected dense Jacobian (then: dense).

The estimate (TRACE_FACTOR evaluations of `f`) can be far off: index sets that grow op after op make
propagation cost grow with them, and a rollout whose sets fill up could take hours. A 60-step RK4 rollout
of 3000 unknowns (a band 481 wide at the end) took 50 s to detect against an estimate under a second; its
dense Jacobian was projected at 26 s from the first slice and took 89 s, the compressed one (639 colours)
6 s. With a limit of 1x the projection, detection stopped at 26 s: a first call of 119 s and dense later
calls of 89 s, against 58 s and 6 s without a limit. 3x (the planning issue's bar for a first call) lets
such a pattern be found and still bounds what a failed search adds. `sparsity=autojac.sparsity(f, x)`
detects without a limit."""


LOOP_TO_VMAP = 0.2
"""A vmapped pass is counted at this share of an unbatched VJP when deciding whether to time a first slice
(the slice's extra chunk costs a dense function a few percent, so only a Jacobian likely to be long pays it)."""


SLICE_SHARE = 0.25
"""A first slice is timed when the trace is estimated under this share of the dense estimate. Held to
DETECT_SHARE (0.1), a per-sample MLP whose estimate sat at 0.95 of that bar after a noisy timing ran dense
for 100-120 ms, against 21-33 ms compressed, in 4 of 5 first calls of a benchmark run; at SPARSE_DETECT_SHARE
(0.5) short dense runs were split for a slice they could not use (pde_residual small: 256 passes estimated at
8 ms, run in 1.6 ms; its first call 1.64 -> 1.98 ms)."""


def might_pay(problem: Problem, eval_seconds: float, vjp_seconds: float, per_pass: float | None = None,
              share: float = SLICE_SHARE) -> bool:
    """Whether the dense Jacobian is likely long enough for a trace to pay: worth timing a first slice.

    A dense pass costs `per_pass` seconds where the engine probe measured it, LOOP_TO_VMAP plain VJPs otherwise.
    The bar is `share` of the estimate: the slice, not this estimate, then decides
    (`worth_detecting`, with the share its own entries allow)."""
    passes = min(problem.n_in, problem.n_out)
    per_pass = LOOP_TO_VMAP * vjp_seconds if per_pass is None else max(per_pass, LOOP_TO_VMAP * vjp_seconds)
    return passes >= MIN_PASSES and trace_estimate(eval_seconds) < share * passes * per_pass


LOOKS_SPARSE = 1 / 16
SPARSE_DETECT_SHARE = 0.5
"""A first slice whose computed entries are at most LOOKS_SPARSE nonzero lets the trace take up to this share
of the dense projection. Exact zeros in the values are only a hint (the pattern itself comes from the trace,
which sees every op, so a hint can only cost time): a function whose Jacobian is numerically sparse at this
point but structurally dense pays at most this share once, on its first call."""


def worth_detecting(projected_dense_seconds: float, eval_seconds: float, nonzero_share: float | None = None) -> bool:
    """Whether the trace is estimated under DETECT_SHARE of the dense Jacobian's projected time (under
    SPARSE_DETECT_SHARE when the first slice's entries were at most LOOKS_SPARSE nonzero)."""
    sparse_looking = nonzero_share is not None and nonzero_share <= LOOKS_SPARSE
    share = SPARSE_DETECT_SHARE if sparse_looking else DETECT_SHARE
    return trace_estimate(eval_seconds) < share * projected_dense_seconds


REAL_TRACE_BELOW = 0.002
"""A first call traces an `f` whose evaluation took under this many seconds on its real values, not on fake
tensors (NOTE: [A real trace first])."""


# NOTE: [A real trace first]
# A fake-tensor trace costs about 0.1-0.2 ms an op whatever the sizes (FakeTensorMode's dispatch and caches):
# 6.4 ms for the 34 ops of a 2-D Brusselator whose evaluation takes 0.24 ms, 3.4 ms for a 3-layer MLP that
# evaluates in 0.23 ms; a trace on the real values took 0.97 and 0.48 ms (2-core CPU). So a first call traces a
# cheap `f` (evaluated in under REAL_TRACE_BELOW, not random) for real, in isolation (RNG and buffers put back,
# not counted as an evaluation). Such a pattern holds at this point only: a value read where the trace cannot
# see it (`.tolist()`, `.numpy()` of a detached tensor) can steer `f` elsewhere at other inputs. So the plan
# checks every call, as for any pattern valid at one point, until the next call (charged to the exploration
# credit, whatever it holds: the trace ends a check on every call) traces `f` on fake tensors: if that pattern, valid for every input of these shapes,
# lies within the real one, the real one holds everywhere too and calls stop checking; if not, or if the fake
# trace fails, every call stays checked (a nonzero outside the pattern fails the check, and the plan is made
# again, dense; on new captured values, with the pattern found again: NOTE: [A pattern found again]).


def confirm_real_trace(f, xs, pattern: Pattern, max_seconds: float | None) -> tuple[str, bool]:
    """Trace `f` on fake tensors: ("", whether that trace read the value of a tensor `f` holds) if its pattern
    (valid for every input of these shapes) lies within `pattern`, a first call's real-trace one, else (why
    not, True) (NOTE: [A real trace first]; NOTE: [A pattern that read no captured values])."""
    try:
        fake = detect(f, xs, trace="fake", max_nnz=pattern.nnz, max_seconds=max_seconds)
    except TooDense as more:
        return f"the fake trace's pattern holds {more.nnz} nonzeros against {pattern.nnz}", True
    except Exception as exc:  # noqa: BLE001 - unconfirmed: every call stays checked
        return f"the fake trace failed ({type(exc).__name__})", True
    n_in = pattern.shape[1]
    if fake.nnz and not np.isin(fake.rows * n_in + fake.cols, pattern.rows * n_in + pattern.cols,
                                assume_unique=True).all():
        return f"the fake trace's pattern ({fake.nnz} nonzeros) reaches beyond it", True
    return "", fake.reads_captured


# NOTE: [Batch-aware at every point]
# The repeat trick is right only where `f` treats its copies as independent rows, and that can hold at one
# point and not at another: `sin(x @ A.T) + relu(x.norm() - 2) * x` reduces over every copy, but its coupling
# term is zero while the copies' joint norm stays under 2. The rows check (NOTE: [Batch-aware, checked on
# different rows]) and the first check at each chunk size passed there; a plan settled on the repeat trick
# then returned a wrong Jacobian, unchecked, as soon as x left the ball. So a repeat method's Jacobian is
# checked on every call (an evaluation of `f` and a VJP) until `f` is shown batch-aware for every input of
# these shapes: a trace of `f` on fake tensors holding two stacked copies of its inputs, whose dependency
# sets (the sparsity detector's, which never miss a nonzero and are dense across an op without an exact rule),
# followed for values rather than derivatives, must tie every output of each copy to inputs of that copy only:
# `x * relu(x.detach().norm() - 2)` couples the copies through a detached value, a mask or an index can too,
# so detached tensors, piecewise-constant ops and integer and boolean results carry their operands' sets there,
# and a random op refuses (each copy would draw its own numbers). The trace holds for the values `f`
# captures when it ran (an index or a weight's zeros enter its rules), so a call on other values is checked
# again. A trace that fails (data-dependent control flow, an op without a fake kernel) or runs out of time
# leaves the checks in place, priced into the method's cost. Not covered: an `f` that reads its batch size
# as data (`x * x.shape[0]`), which the rows check and the check at each chunk size catch at the point they
# ran, unless the term vanishes there.


def copies_independent(f, xs, problem: Problem, max_seconds: float | None) -> str:
    """"" when a fake-tensor trace of `f` on two stacked copies of `xs` ties each copy's outputs to that
    copy's inputs only (for every input of these shapes), else why not (NOTE: [Batch-aware at every point])."""
    stacked = tuple(torch.stack([x, x]) for x in xs)
    try:
        pattern = detect(f, stacked, trace="fake", max_seconds=max_seconds, values=True)
    except TooLong as late:
        return f"the trace ran past its allowance ({late})"
    except Exception as exc:  # noqa: BLE001 - unconfirmed: every repeat call stays checked
        return f"the fake trace failed ({type(exc).__name__})"
    if pattern.shape != (2 * problem.n_out, 2 * problem.n_in):
        return "its outputs on two copies are not two copies of its outputs"
    random = [note[len("random op: "):] for note in pattern.notes if note.startswith("random op: ")]
    if random:  # each copy would draw its own numbers
        return f"it draws random numbers ({random[0]})"
    rows = _copy_of(pattern.rows, problem.out_sizes)
    cols = _copy_of(pattern.cols, problem.in_sizes)
    mixed = int(np.count_nonzero(rows != cols))
    if mixed:
        dense = f"; no exact rule for {', '.join(pattern.dense_ops[:3])}" if pattern.dense_ops else ""
        return f"{mixed} dependencies of one copy's outputs on the other copy's inputs{dense}"
    return ""


def _copy_of(positions: np.ndarray, sizes) -> np.ndarray:
    """Which of two stacked copies each flat position belongs to, for tensors of `sizes` elements per copy
    concatenated (each stacked along a new leading dimension)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(2 * sizes)[:-1]])
    which = np.searchsorted(starts, positions, side="right") - 1
    return (positions - starts[which]) // np.maximum(sizes[which], 1)


DENSE_SAMPLES = 16
"""Rows and columns of a first call's dense Jacobian read to tell whether any pattern could pay."""
COUNT_ALL_UP_TO = 1 << 14
"""A Jacobian of at most this many entries has every row and column counted, not DENSE_SAMPLES of them: one count
per block and side. Picking the samples cost 0.34-0.52 ms of 2.7-4.0 ms first calls on the suite's small
tuple_inputs, per_sample_mlp and pde_residual, counting everything 0.11-0.21 ms; at 2^16 entries both took
0.44-0.49 ms (bool reductions run at about 2 ns an entry; 2-core CPU). The bounds are then the true ones."""


def sampled_bounds(blocks: Blocks, problem: Problem) -> tuple[int, int] | None:
    """(the most nonzeros in DENSE_SAMPLES evenly spaced rows, in as many columns; in every row and column up to
    COUNT_ALL_UP_TO entries) of a first call's dense Jacobian: lower bounds of a column and a row colouring's
    colours (a structural pattern holds every entry nonzero at some point). Columns are read only when the rows
    exceed PROMISING of the passes (otherwise the rows' count stands for both: the Jacobian is promising, and
    `too_dense_to_pay` needs more than half the passes on both sides; the share may read up to 1/8 higher than the
    columns would give). None for symmetric Jacobians (peeling dense lines beats these bounds) and sparse blocks."""
    if problem.symmetric or any(b.layout != torch.strided for row in blocks for b in row):
        return None
    every = problem.n_in * problem.n_out <= COUNT_ALL_UP_TO
    views = blocks.views if problem.inputs.device.type == "cpu" else None
    with torch.no_grad():
        rows = _fullest(blocks, problem.out_sizes, along_rows=True, every=every, views=views)
        # Columns only where they can change a verdict: rows sparse enough make the Jacobian promising already.
        columns = rows
        if rows > PROMISING * min(problem.n_in, problem.n_out):
            columns = _fullest(blocks, problem.in_sizes, along_rows=False, every=every, views=views)
        return rows, columns


def too_dense_to_pay(bounds: tuple[int, int] | None, problem: Problem) -> str:
    """Why no pattern can halve the passes, read off a first call's dense Jacobian's `sampled_bounds` ("" if
    one might): over SAVES of the dense passes on both sides, a look for structure (a trace and a colouring,
    taken from a later call's exploration credit) cannot pay."""
    if bounds is None:
        return ""
    rows, columns = bounds
    passes = min(problem.n_in, problem.n_out)
    if min(rows, columns) <= SAVES * passes:
        return ""
    return (f"not looked for: the first call's Jacobian has rows with {rows} and columns with {columns} nonzeros, "
            f"so any colouring needs at least {min(rows, columns)} of the {passes} dense passes")


# NOTE: [Structure before trials]
# A dense plan whose first call was too short to pay for a trace looks for structure on a later call, from the
# exploration credit, once the credit covers a trace; trials of the other dense methods draw on the same credit.
# Taken in the order they came, the trials spent the credit first: a per-sample MLP (256 x 640, block diagonal,
# 4 row colours) ran dense at 1.9-2.0 ms after 10 calls and looked only after some 120, while its compressed run
# takes 1.0-1.1 ms, far more than any dense method could save. So when the plan's own Jacobian (read on its
# second call: NOTE: [Structure bounds on the second call]) says a
# colouring could need at most PROMISING of the dense passes (DENSE_SAMPLES rows and columns bound it from below;
# zeros at this point are only a hint), no trial runs until the look has been taken, and the look may draw,
# beyond the credit, on what that bound says it saves over LOOK_PAYBACK_CALLS calls (a look that finds nothing
# leaves the plan in debt: no trials until later calls' shares have paid it back). A sampled Jacobian with no
# nonzero at all says nothing about structure (a zero-initialised last layer, dead ReLUs): not promising. Nor
# is a closure rebuilt around new tensors every call (the tensors `f` holds differ from the first call's when
# the look would borrow): a structured plan checks every call made on new values (NOTE: [Patterns and values]),
# which ate what the pattern saved on the suite's small grid residual (20 steps 2.5x torch.func's loop, from
# 1.8-1.9x with the look left to the credit); there the look waits for the credit, trials resume. Nor does a
# look out of reach hold the trials back: one whose allowance would not cover its estimated trace within
# LOOK_WAIT_CALLS more calls' exploration share (the suite's small per-sample MLP, 64 x 160 at 0.4-0.5 ms a
# call: 3.3 ms of allowance against a trace estimated at 4 ms or more, 0.04 ms more a call) blocked every trial
# for some 20 calls; its repeat trick, untried, runs in 0.17-0.2 ms. Such a look is taken when the credit
# covers it, as any alternative is, and still before any trial once it does.

PROMISING = 1 / 8
"""A first call's dense Jacobian whose sampled rows or columns could be coloured in at most this share of the
dense passes makes the look for structure the plan's next exploration (NOTE: [Structure before trials])."""


LOOK_PAYBACK_CALLS = 5
"""A promising look may take, beyond the credit, what its lower bound says it saves over this many calls."""
LOOK_WAIT_CALLS = 10
"""Trials wait for a promising look only while the exploration share of this many more calls would let it be
taken; a look further out than that waits for the credit like any other alternative."""


def promising_share(bounds: tuple[int, int] | None, problem: Problem) -> float | None:
    """The least share of the dense passes a colouring could need by the sampled bounds, where it is at most
    PROMISING (else None)."""
    if bounds is None or min(bounds) == 0:
        return None
    share = min(bounds) / min(problem.n_in, problem.n_out)
    return share if share <= PROMISING else None


def _fullest(blocks: list[list[torch.Tensor]], sizes: tuple[int, ...], along_rows: bool, every: bool = False,
             views: list[list[np.ndarray | None]] | None = None) -> int:
    """The most nonzeros in DENSE_SAMPLES evenly spaced rows (or columns) of the whole Jacobian's blocks, or in
    every one of them (`every`): one count per block, after one gather of the sampled lines (a count per sampled
    line was 32 small ops on a first call). CPU blocks are counted through NumPy views (no copy): its small ops
    cost 1-2 us where torch's cost 8-15 on the 2-core CPU (a 2 x 2-block Jacobian of 256 x 256 took 0.45 ms to
    bound through torch). `views`: the blocks' NumPy views, where taken already."""
    dim = 0 if along_rows else 1
    starts = np.cumsum((0, *sizes))
    if every:
        lines: dict[int, np.ndarray | None] = {k: None for k, size in enumerate(sizes) if size}
    else:
        total = sum(sizes)
        picks = np.unique(np.linspace(0, total - 1, min(DENSE_SAMPLES, total)).astype(np.int64))
        group = np.searchsorted(starts, picks, side="right") - 1
        lines = {int(k): picks[group == k] - starts[k] for k in np.unique(group)}
    best = 0
    for k, local in lines.items():
        line_blocks = blocks[k] if along_rows else [row[k] for row in blocks]
        if views is None:
            line_views = [None] * len(line_blocks)
        else:
            line_views = views[k] if along_rows else [row[k] for row in views]
        counts = sum(_line_counts(b, dim, local, a) for b, a in zip(line_blocks, line_views))
        best = max(best, int(counts.max()))
    return best


def _line_counts(block: torch.Tensor, dim: int, local: np.ndarray | None, a: np.ndarray | None = None) -> np.ndarray:
    """Nonzeros in the lines `local` (all when None) of a 2-D block along `dim` (0: rows, 1: columns); `a`: its
    NumPy view, if taken already."""
    a = host_view(block) if a is None else a
    if a is not None:
        if local is not None:
            a = a[local] if dim == 0 else a[:, local]
        return np.count_nonzero(a, axis=1 - dim)
    if local is not None:
        block = block.index_select(dim, torch.as_tensor(local, device=block.device))
    return torch.count_nonzero(block, dim=1 - dim).cpu().numpy()


def colorings(pattern: Pattern, symmetric: bool = False) -> tuple[Coloring, Coloring]:
    """(row colouring, column colouring), paying for only what can matter.

    The side with the smaller lower bound is coloured first; the other only if
    its lower bound is below the colours found (else it cannot be the one used,
    and gets the trivial colouring, one colour per row or column). A structurally
    symmetric pattern (a stencil, a Hessian) is coloured once: its row colouring is
    its column colouring. A symmetric Jacobian (a Hessian) also tries peeling its
    dense lines (see NOTE: [Peeling dense lines of a symmetric Jacobian]).
    """
    lower_rows, lower_cols = pattern.max_col_nnz, pattern.max_row_nnz
    first_rows = lower_rows <= lower_cols
    first = color_rows(pattern) if first_rows else color_columns(pattern)
    if pattern.shape[0] == pattern.shape[1] and lower_rows == lower_cols and _symmetric(pattern):
        if symmetric:
            first = color_symmetric(pattern, first)
        other = Coloring("column" if first_rows else "row", first.colors, first.n_colors, first.lower_bound,
                         first.order + " (symmetric pattern)", 0.0, peeled=first.peeled)
    elif (lower_cols if first_rows else lower_rows) < first.n_colors:
        other = color_columns(pattern) if first_rows else color_rows(pattern)
    else:
        n = pattern.shape[1] if first_rows else pattern.shape[0]
        other = Coloring("column" if first_rows else "row", np.arange(n), n, lower_cols if first_rows else lower_rows,
                         "not coloured: its lower bound is above the other side's colours", 0.0)
    return (first, other) if first_rows else (other, first)


def _symmetric(pattern: Pattern) -> bool:
    """Whether a square pattern is its own transpose: its CSR arrays are its CSC arrays (scipy's conversion is a
    counting pass that keeps each column's rows in order; 0.10 against 0.34 ms for sorting the transposed
    positions, on a Brusselator's 12288 nonzeros)."""
    rows = pattern.to_scipy()
    columns = sp.csc_array(rows)
    return bool(np.array_equal(columns.indptr, rows.indptr) and np.array_equal(columns.indices, rows.indices))


def user_pattern(mask: object, problem: Problem, who: str) -> Pattern:
    """A user's pattern (bool tensor, dense or sparse, (n_out, n_in) or out_shape + in_shape, or the `Pattern`
    that `autojac.sparsity` returned), checked."""
    shape = (problem.n_out, problem.n_in)
    if isinstance(mask, Pattern):
        if mask.shape != shape:
            raise InputError(f"{who}: the `sparsity` pattern is {mask.shape[0]} x {mask.shape[1]}, but the Jacobian is "
                             f"{shape[0]} x {shape[1]}. Find it with `autojac.sparsity` on the same shapes.")
        # Found for some function, perhaps another: checked on new captured values like any pattern you give
        # (NOTE: [A pattern that read no captured values] holds for the function whose trace it was).
        return mask if mask.reads_captured else dataclasses.replace(mask, reads_captured=True)
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"{who}: `sparsity` must be 'auto', None, or a bool tensor marking the Jacobian's possible nonzeros, but got {type(mask).__name__}.")
    if mask.is_sparse or mask.layout != torch.strided:
        mask = mask.to_dense()
    if mask.dtype != torch.bool:
        mask = mask != 0
    if mask.numel() != shape[0] * shape[1]:
        raise InputError(f"{who}: the `sparsity` pattern has {tuple(mask.shape)} ({mask.numel()} entries), but the Jacobian "
                         f"is {shape[0]} x {shape[1]}. Pass a mask of shape ({shape[0]}, {shape[1]}).")
    return dataclasses.replace(Pattern.from_user(mask.reshape(shape)),
                               grids=(side_grids(problem.out_shapes), side_grids(problem.inputs.shapes)))


def layout_for(f, xs, problem: Problem, sparsity: object, output: str, who: str,
               max_seconds: float | None = None, trace: str = "auto",
               max_nnz: int | None = None) -> tuple[SparseLayout | None, str]:
    """(the layout to use, or None for dense; a note for the plan). Detection may take `max_seconds` at most;
    `trace` as in `detect` (a first call's cheap `f` is traced on its real values: NOTE: [A real trace first]).
    With `max_nnz` (NOTE: [Structure first when only a sparse result fits]) the dense Jacobian cannot be
    made at all: a pattern of at most that many nonzeros is used however many colours it needs."""
    if sparsity is None:
        return None, ""
    dense_passes = min(problem.n_in, problem.n_out)
    must = max_nnz is not None
    if isinstance(sparsity, str):
        # No colouring beats its side's lower bound (the most nonzeros in one row or column), and the mean
        # bounds the most: a pattern this full is dense for the planner before it is spelled out or coloured
        # (a dense 2048 x 2048 one took 0.2 s to spell out and 0.4 s more to colour, on a first call that then
        # ran dense anyway).
        too_many = max_nnz if must else int(SAVES * dense_passes * max(problem.n_out, problem.n_in))
        try:
            # Structure first: the propagation's memory is bounded too; an op's sets store a row map entry per
            # element and a table entry per distinct dependency, so a pattern within max_nnz stores at most twice it.
            pattern = detect(f, xs, trace=trace, max_nnz=too_many, max_seconds=max_seconds,
                             max_stored=2 * max_nnz if must else None)
        except TooLong as late:
            return None, (f"structure detection stopped after {late.seconds:.2f} s of propagation ({late.done} of "
                          f"{late.total} ops), over its limit of {max_seconds:.2f} s; dense. "
                          "`sparsity=autojac.sparsity(f, x)` detects without a limit")
        except TooDense as full:
            if must:
                return None, (f"the pattern, or an intermediate's dependency sets, came to {full.nnz} entries: more than "
                              f"the budget allows ({max_nnz} nonzeros at {STRUCTURE_BYTES_PER_NONZERO} bytes each)")
            return None, (f"pattern found ({full.nnz} nonzeros) but at least {math.ceil(full.nnz / max(problem.n_out, problem.n_in))} "
                          f"colours against {dense_passes} dense passes: dense")
        except Exception as exc:  # noqa: BLE001 - no pattern is no reason to fail: dense works
            logger.debug("sparsity detection failed: %s", exc)
            return None, f"structure detection failed ({type(exc).__name__}); dense"
    else:
        pattern = user_pattern(sparsity, problem, who)
    if must and pattern.nnz > max_nnz:  # a pattern the user gave
        return None, f"the pattern's {pattern.nnz} nonzeros are more than the budget holds ({max_nnz})"
    if isinstance(sparsity, str) and not problem.symmetric and not must:  # peeling dense lines beats this bound
        fewest = min(pattern.max_row_nnz, pattern.max_col_nnz)
        if fewest > SAVES * dense_passes:
            return None, (f"pattern found ({pattern.nnz} nonzeros) but at least {math.ceil(fewest)} colours "
                          f"against {dense_passes} dense passes: dense")
    rows, columns = colorings(pattern, problem.symmetric)
    compressed = min(rows.n_colors, columns.n_colors)
    if isinstance(sparsity, str) and compressed > SAVES * dense_passes and not must:
        return None, (f"pattern found ({pattern.nnz} nonzeros) but {compressed} colours against {dense_passes} "
                      "dense passes: dense")
    layout = SparseLayout(pattern, rows, columns, output)
    return layout, layout.describe()


