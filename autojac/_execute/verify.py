"""The safety net: a method's first Jacobian of a function is checked against an independent product.

NOTE: [The verification product]
For a random cotangent w (one per output), the Jacobian J that a method built must
satisfy w^T J = (J^T w), where the right side is one plain, unbatched
`torch.autograd` VJP: the product torch's own loop Jacobian is made of. On a first
call it is taken on the plain evaluation the call starts from (evaluations are
pinned to one realization of `f`, so a random `f` is checked on the realization it
was differentiated at); on a later call that tries a method, on that method's own
plain graph or on a fresh plain evaluation, which also catches evaluations that
disagree (a generator of `f`'s own, state `f` keeps and changes). Each component
is compared within a tolerance scaled by |w|^T |J| (the size of the terms it sums),
so a wrong or missing column fails it by orders of magnitude while rounding does
not; a NaN where the reference is finite fails too. The random w comes from a
private generator, never the global RNG.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from .._core.errors import AutojacError
from .._methods.base import vjp
from .._core.problem import Problem
from .._core.pytree import leaves

# The most of |J| (bytes, per output block) the check copies at once when it judges suspect columns.
CHECK_BLOCK_BYTES = 1 << 18


class VerificationError(AutojacError, ArithmeticError):
    """A method's Jacobian disagreed with an independent vector-Jacobian product."""


@functools.cache
def _tolerance(dtype: torch.dtype) -> float:
    return 2.0 * torch.finfo(dtype).eps ** 0.5


_HOST_FLOATS = (torch.float16, torch.float32, torch.float64)


def host_view(t: torch.Tensor) -> np.ndarray | None:
    """A NumPy view of a CPU float tensor (no copy), or None for other devices and dtypes (bfloat16): the safety
    net's and the structure bounds' small reductions cost 2-5 us an op through NumPy where torch's cost 8-15 on
    the 2-core CPU."""
    if t.device.type != "cpu" or t.layout != torch.strided or t.dtype not in _HOST_FLOATS:
        return None
    return t.detach().resolve_neg().numpy()


class Blocks(list):
    """The result's (output, input) blocks as `blocks[i][j]`, each an (output size, input size) matrix, with
    their NumPy views (`views[i][j]`, None where `host_view` gives none) taken once for every reading of them:
    the structure bounds' row and column counts each took a view of every block (3-9 us apiece on the 2-core
    CPU), as the safety net's row scales do."""

    @functools.cached_property
    def views(self) -> list[list[np.ndarray | None]]:
        return [[host_view(b) for b in row] for row in self]


def blocks_of(result: object, problem: Problem) -> Blocks:
    """The result's (output, input) blocks, each viewed as (output size, input size)."""
    flat = leaves(result)
    n_in = len(problem.in_sizes)
    return Blocks([[_matrix(flat[i * n_in + j].detach(), problem.out_sizes[i], problem.in_sizes[j])
                    for j in range(n_in)] for i in range(len(problem.out_sizes))])


def _matrix(block: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """A block as an (m, n) matrix: a view of a dense block, or a 2-D sparse COO matrix (never densified)."""
    if block.layout == torch.strided:
        return block.reshape(m, n)
    if block.layout != torch.sparse_coo:
        block = block.to_sparse_coo()
    block = block.coalesce()
    index = block.indices()
    if block.dim() == 2 and tuple(block.shape) == (m, n):
        return block
    flat = torch.zeros(index.shape[1], dtype=torch.int64, device=index.device)
    for d, size in enumerate(block.shape):
        flat = flat * size + index[d]
    return torch.sparse_coo_tensor(torch.stack([flat // n, flat % n]), block.values(), (m, n), is_coalesced=True, check_invariants=False)


def _vecmat(w: torch.Tensor, matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w @ matrix for a dense or sparse (COO) matrix, computed in the matrix's dtype and given in `dtype` (a check
    by tangents pairs an output's dtype with blocks of an input's: NOTE: [Checks by tangents])."""
    if w.dtype != matrix.dtype:
        w = w.to(matrix.dtype)
    if matrix.layout == torch.strided:
        return (w @ matrix).to(dtype)
    rows, cols = matrix.coalesce().indices()
    out = torch.zeros(matrix.shape[1], dtype=matrix.dtype, device=matrix.device)
    return out.index_add_(0, cols, matrix.values() * w[rows]).to(dtype)


# NOTE: [Checks by tangents]
# The check needs a VJP of `f`, so an `f` whose backward fails (a custom autograd.Function with a forward-mode
# formula and no backward) could not be answered at all, though forward mode computes its Jacobian (as
# torch.func.jacfwd does). For such an `f` a first call whose reference VJP fails, with forward mode allowed,
# plans again in forward mode with the problem's `tangent_checks` set: every check then compares J v, for a
# random tangent v (one per input, from a private generator), with one plain forward-AD pass of `f` on dual
# numbers, unbatched, on a fresh evaluation: the product torch's own forward loop is made of. It is the same
# check on the transposed Jacobian (J v = (v^T J^T)^T): the blocks are transposed views and inputs and outputs
# trade places, so the tolerance scaled by |v|^T |J^T| and the columns weighed alike where they differ widely
# (NOTE: [Rows of very different sizes], for J^T) come unchanged. Inputs of different dtypes are checked apart,
# one product per dtype with the other inputs' tangents zero: an output's product summed blocks of every input,
# and compared in the coarsest dtype it put a float64 input's columns under float16's tolerance (6% of the
# terms) and its large entries past float16's range (inf, judged nowhere), so a wrong Jacobian passed. Each
# product is computed in its blocks' dtype and compared in the coarser of that and the output's.


class _Transposed:
    """A problem as the check of J^T sees it: inputs and outputs swapped, each output compared in the coarser of
    its dtype and `dtype`, the dtype of the inputs whose tangents this check uses (NOTE: [Checks by tangents])."""

    def __init__(self, problem: Problem, dtype: torch.dtype) -> None:
        self.n_in, self.n_out = problem.n_out, problem.n_in
        self.in_sizes, self.out_sizes = problem.out_sizes, problem.in_sizes
        self.out_shapes, self.out_dtypes = problem.inputs.shapes, problem.inputs.dtypes
        self.inputs = _Side(problem.inputs.device, tuple(
            max((d, dtype), key=lambda t: torch.finfo(t).eps) if d.is_floating_point else d
            for d in problem.out_dtypes))


class _Side:
    def __init__(self, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> None:
        self.device, self.dtypes = device, dtypes


def _transposed(blocks: Blocks) -> Blocks:
    """J^T's blocks: `out[j][i]` is `blocks[i][j]` transposed (a view, or a sparse COO transpose)."""
    if not blocks:
        return Blocks()
    def t(block: torch.Tensor) -> torch.Tensor:
        return block.t() if block.layout == torch.strided else block.t().coalesce()
    return Blocks([[t(blocks[i][j]) for i in range(len(blocks))] for j in range(len(blocks[0]))])


def check_vectors(problem: Problem) -> tuple[torch.Tensor, ...]:
    """The check's random vectors: cotangents (one per output), or with `tangent_checks` tangents (one per
    input)."""
    return random_cotangents(_Transposed(problem, torch.float64) if problem.tangent_checks else problem)


def _by_dtype(problem: Problem) -> list[tuple[torch.dtype, list[int]]]:
    """The inputs grouped by dtype, in order of first appearance."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, d in enumerate(problem.inputs.dtypes):
        groups.setdefault(d, []).append(i)
    return list(groups.items())


def _only(vectors: Sequence[torch.Tensor], members: list[int]) -> tuple[torch.Tensor | None, ...]:
    return tuple(v if i in members else None for i, v in enumerate(vectors))


def random_cotangents(problem: Problem) -> tuple[torch.Tensor, ...]:
    """One random cotangent per output, from a private generator (never the global RNG)."""
    device = problem.inputs.device
    generator = torch.Generator(device=device).manual_seed(0x5AFE)
    return tuple(torch.randn(s, generator=generator, dtype=d, device=device)
                 for s, d in zip(problem.out_shapes, problem.out_dtypes))


def reference_product(ys: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], w: Sequence[torch.Tensor]) -> tuple:
    """w^T J by one plain, unbatched autograd VJP on a plain graph: the product torch's own loop is made of."""
    with torch.enable_grad():
        grads = vjp(ys, xs, w, create_graph=False)
    return tuple(None if g is None else g.detach() for g in grads)


def check_against(name: str, result: object, w: Sequence[torch.Tensor], reference: Sequence, problem: Problem,
                  blocks: Blocks | None = None, product: str = "vector-Jacobian product", side: str = "input") -> None:
    """Raise VerificationError unless w^T J matches `reference` (see NOTE above); `blocks` are the result's
    `blocks_of`, where the caller has them.

    Cheap path first: the difference within the tolerance times |w^T J| + |reference|.
    Only the elements that fail it are judged again against the tolerance times
    |w|^T |J| (the size of the terms the product sums, so that cancellation is not
    taken for an error), which needs a pass over |J|.
    """
    if problem.n_in == 0 or problem.n_out == 0:
        return
    device = problem.inputs.device
    blocks = blocks_of(result, problem) if blocks is None else blocks
    with torch.no_grad():
        for j, size in enumerate(problem.in_sizes):
            dtype = problem.inputs.dtypes[j]
            got = torch.zeros(size, dtype=dtype, device=device)
            for i, wi in enumerate(w):
                if wi is not None:  # None: a tangent left out of this check (NOTE: [Checks by tangents])
                    got += _vecmat(wi.reshape(-1), blocks[i][j], dtype)
            if reference[j] is None:
                ref = torch.zeros(size, dtype=dtype, device=device)
            else:
                ref = reference[j].reshape(-1).to(dtype)
            tolerance = _tolerance(dtype)
            # Fast path: within tolerance * |reference| (stricter than the bound below, and false on any NaN),
            # nothing is suspect.
            if got.shape == ref.shape and _close(got, ref, tolerance, torch.finfo(dtype).tiny):
                continue
            difference = (got - ref).abs()
            # Written as "not within", so that a NaN the method produced where the reference is finite fails.
            suspect = ~(difference <= tolerance * (got.abs() + ref.abs()) + torch.finfo(dtype).tiny)
            finite = torch.isfinite(ref)
            if not bool(finite.all()):
                # NaN or Inf in play (a sqrt at 0, a NaN input): where the reference is not finite nothing can be
                # judged, and where only the product is, a mode may have spread it (0 * nan lands in a row or a
                # column); every element where both are finite is still judged.
                suspect &= finite & torch.isfinite(got)
            if not bool(suspect.any()):
                continue
            # |J| for the suspect columns only (dense or sparse COO): a copy of all of it could overrun a budget.
            # Taken a few columns at a time (at most CHECK_BLOCK_BYTES of |J| at once): under float32 rounding
            # most columns can be suspect, and two copies of them (selected, absolute) broke an 8.7 MiB budget.
            columns = suspect.nonzero().reshape(-1)
            scale = torch.zeros(columns.numel(), dtype=dtype, device=device)
            rows = max([1] + [int(b[j].shape[0]) for b in blocks])
            step = max(1, CHECK_BLOCK_BYTES // (rows * dtype.itemsize))
            for i, wi in enumerate(w):
                if wi is None:
                    continue
                block, wa = blocks[i][j], wi.reshape(-1).abs()
                if block.layout != torch.strided:  # |w|^T |J| over the nonzeros at once: a copy of them, no more
                    scale += _vecmat(wa, block.abs(), dtype)[columns]
                    continue
                for lo in range(0, columns.numel(), step):
                    scale[lo:lo + step] += _vecmat(wa, block.index_select(1, columns[lo:lo + step]).abs(), dtype)
            bad = ~(difference[columns] <= tolerance * (scale + ref[columns].abs()) + torch.finfo(dtype).tiny)
            if bool(bad.any()):
                k = int(columns[bad.nonzero()[0, 0]])
                raise VerificationError(
                    f"{name} gave a Jacobian whose product with a random vector disagrees with an "
                    f"independent {product} ({side} {j}, element {k}: {float(got[k]):.6g} against "
                    f"{float(ref[k]):.6g}; {int(bad.sum())} of {size} elements differ)"
                )


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> bool:
    """|got - ref| <= atol + rtol |ref| everywhere (False on any NaN or infinity: the caller judges those). On the
    CPU through Python floats (up to SMALL_CLOSE elements) or NumPy views: `torch.allclose` took 28-34 us on 8 to
    1024 elements, Python floats 5 us on 8 and 26 on 128, NumPy 20-24 throughout (2-core CPU)."""
    if got.device.type == "cpu" and ref.device.type == "cpu":
        if got.numel() <= SMALL_CLOSE:
            return all(abs(a - b) <= atol + rtol * abs(b) for a, b in zip(got.tolist(), ref.tolist()))
        a, b = (host_view(got), host_view(ref)) if got.dtype in (torch.float32, torch.float64) else (None, None)
        if a is not None and b is not None and a.dtype == b.dtype:
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: not close, and no warning for it
                return bool((np.abs(a - b) <= atol + rtol * np.abs(b)).all())
    return torch.allclose(got, ref, rtol=rtol, atol=atol)


SMALL_CLOSE = 96
"""Vectors up to this many elements are compared as Python floats by `_close` (NumPy's fixed cost is larger)."""


# NOTE: [Rows of very different sizes]
# The product's tolerance is scaled by |w|^T |J|, a sum over the rows: where some outputs' rows are a million
# times larger than others (a 1e9 * sum(x) beside O(1) outputs, physical units side by side), the large rows set
# the tolerance of every column, and a method wrong only in the small rows passes (an adversarial test: the
# repeat trick on an `f` that averages over its first dimension, wrong by 3-100% in the O(1) rows, "verified").
# So when the rows' largest entries differ by more than UNBALANCED_ROWS, the check runs once more with each
# output element's cotangent divided by its row's largest entry (rows of zeros keep the largest scale; no row
# weighs more than eps^(1/3) of the largest allows, so that rounding in a row that should be zero never counts
# as an error), so that rows weigh alike; that needs one more reference product, paid only by such Jacobians.
# The row scales are taken by reductions over the result (no copy of it).

UNBALANCED_ROWS = 1e3
"""The check runs again with rows weighed alike where their largest entries differ by more than this, or by more
than 1 / (10 x the tolerance) where that is more (float64: 1.7e6): only there can an error of 10% in the smallest
row hide under the largest's share of the tolerance (a tanh layer's saturated units differ by 1e4 in float64)."""


def balanced_cotangents(result: object, problem: Problem,
                        blocks: Blocks | None = None) -> tuple[torch.Tensor, ...] | None:
    """Cotangents that weigh every row of J alike, when the rows' sizes differ by more than UNBALANCED_ROWS;
    else None (NOTE: [Rows of very different sizes]). `blocks`: the result's `blocks_of`, if at hand."""
    blocks = blocks_of(result, problem) if blocks is None else blocks
    views = blocks.views if problem.inputs.device.type == "cpu" else None
    scales = []
    for i, size in enumerate(problem.out_sizes):
        s = None
        for j, block in enumerate(blocks[i]):
            if block.numel():
                row = _row_scale(block, size, None if views is None else views[i][j])
                if not np.isfinite(row).all():
                    row = np.where(np.isfinite(row), row, 0.0)  # a row with a NaN or an infinity: 0
                s = row if s is None else np.maximum(s, row)
        scales.append(np.zeros(size) if s is None else s)
    if not scales:
        return None
    every = scales[0] if len(scales) == 1 else np.concatenate(scales)
    if every.size < 2:
        return None
    # The largest scale and the smallest nonzero one (no nonzero row: 0 and inf; one: equal; balanced either way).
    positive = every[every > 0]
    largest, smallest = float(every.max()), float(positive.min()) if positive.size else math.inf
    if largest <= _spread(problem.out_dtypes) * smallest:
        return None
    device = problem.inputs.device
    generator = torch.Generator(device=device).manual_seed(0xBA1A)
    out = []
    for s, shape, dtype in zip(scales, problem.out_shapes, problem.out_dtypes):
        # Rows under eps^(1/3) of the largest weigh no more than that: a row that should be zero holds rounding
        # of about eps times the largest, which weighed in full would fail a right Jacobian.
        floor = largest * torch.finfo(dtype).eps ** (1 / 3) if dtype.is_floating_point else 0.0
        divisor = torch.as_tensor(np.where(s > 0, np.maximum(s, floor), largest), device=device)
        w = torch.randn(s.shape, generator=generator, dtype=torch.float64, device=device) / divisor
        out.append(w.to(dtype).reshape(shape))
    return tuple(out)


def _row_scale(block: torch.Tensor, size: int, a: np.ndarray | None = None) -> np.ndarray:
    """max |J| in each row of a (size x n) block, as float64 on the host, without a copy of |J|: a dense CPU block
    through a NumPy view (`a`, if taken already; its small reductions cost 2-5 us where torch's cost 8-15 on the
    2-core CPU), another dense block by two reductions on its device (`vector_norm(ord=inf)` took 75 us on
    128 x 128 where these take 16), a sparse one by a scatter of its values."""
    a = host_view(block) if a is None else a
    if a is not None:  # NaN propagates through max and min without a warning
        return np.maximum(a.max(1), -a.min(1)).astype(np.float64)
    if block.layout == torch.strided:  # detached by `blocks_of`: no grad mode needed
        row = torch.maximum(block.amax(1), block.amin(1).neg_())
    else:
        rows, _ = block.indices()
        row = torch.zeros(size, dtype=block.dtype, device=block.device)
        row.scatter_reduce_(0, rows, block.values().abs(), reduce="amax")  # (index_reduce_ warns: beta)
    return row.double().cpu().numpy()


@functools.cache
def _spread(dtypes: tuple[torch.dtype, ...]) -> float:
    return max([UNBALANCED_ROWS] + [1.0 / (10.0 * _tolerance(d)) for d in dtypes if d.is_floating_point])


def check(name: str, result: object, problem: Problem, reference_of, w: Sequence[torch.Tensor] | None = None,
          reference: Sequence | None = None, blocks: Blocks | None = None) -> None:
    """The safety net on a method's result: `check_against` with random cotangents (`w`, whose product
    `reference` may be given), then once more with rows weighed alike where they differ widely; `reference_of(w)` is
    w^T J by an independent product, or with the problem's `tangent_checks` J w for tangents w (NOTE: [Checks
    by tangents]). `blocks`: the result's `blocks_of`, if the caller has them."""
    blocks = blocks_of(result, problem) if blocks is None else blocks
    if not problem.tangent_checks:
        w = random_cotangents(problem) if w is None else w
        check_against(name, result, w, reference_of(w) if reference is None else reference, problem, blocks)
        balanced = balanced_cotangents(result, problem, blocks)
        if balanced is not None:
            check_against(name, result, balanced, reference_of(balanced), problem, blocks)
        return
    # The same check on J^T, one product per input dtype (NOTE: [Checks by tangents]).
    transposed, words = _transposed(blocks), {"product": "Jacobian-vector product", "side": "output"}
    groups = _by_dtype(problem)
    single = len(groups) == 1  # one product, on the tangents given if any; else one per dtype, drawn here
    vectors = w if single and w is not None else check_vectors(problem)
    for dtype, members in groups:
        seen = _Transposed(problem, dtype)
        v = vectors if single else _only(vectors, members)
        ref = reference if v is w and reference is not None else reference_of(v)
        check_against(name, result, v, ref, seen, transposed, **words)
        balanced = balanced_cotangents(result, seen, transposed)
        if balanced is not None:
            balanced = _only(balanced, members)
            check_against(name, result, balanced, reference_of(balanced), seen, transposed, **words)


def check_columns(name: str, columns: object, start: int, stop: int, result: object, problem: Problem) -> None:
    """Raise VerificationError unless columns start..stop of `columns` (a trial's slice) match `result`."""
    got, want = blocks_of(columns, problem), blocks_of(result, problem)
    offset = 0
    for j, size in enumerate(problem.in_sizes):
        lo, hi = max(start - offset, 0), min(stop - offset, size)
        if lo < hi:
            dtype = problem.inputs.dtypes[j]
            for i in range(len(got)):
                a, b = got[i][j][:, lo:hi], want[i][j][:, lo:hi]
                finite = torch.isfinite(b)
                bad = finite & ~((a - b).abs() <= _tolerance(dtype) * (b.abs() + a.abs() + 1))
                if bool(bad.any()):
                    raise VerificationError(f"{name} gave columns that disagree with the verified method's "
                                            f"({int(bad.sum())} of {a.numel()} elements of output {i}, input {j})")
        offset += size
