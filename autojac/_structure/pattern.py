"""The `Pattern` of a Jacobian: where its nonzeros may be, as sorted row/column index arrays."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.int64)
    a.flags.writeable = False
    return a


def is_grid(shape: Sequence[int]) -> bool:
    """Whether `shape` lays a flat numbering out on two axes or more (axes of 1 do not count)."""
    return sum(d > 1 for d in shape) > 1


def side_grids(shapes: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """The grid one side's tensors (of `shapes`, concatenated flat) lay its numbering out in: one tensor's shape,
    several tensors of one shape stacked; none for tensors of different shapes or a shape with one long axis
    (NOTE: [Grids the trace saw])."""
    shapes = [tuple(int(d) for d in s) for s in shapes]
    if not shapes or any(s != shapes[0] for s in shapes):
        return ()
    grid = shapes[0] if len(shapes) == 1 else (len(shapes), *shapes[0])
    return (grid,) if is_grid(grid) else ()


@dataclass(frozen=True, eq=False)
class Pattern:
    """Positions (rows[k], cols[k]) that may be nonzero in the n_out x n_in Jacobian, sorted row-major.

    A detected pattern is a superset of the true nonzeros. `valid_everywhere` is False when only a
    trace on the actual input values worked (data-dependent control flow): the pattern then holds
    at this point only. `dense_ops` names the ops that had no exact rule and were treated as dense.
    """

    shape: tuple[int, int]
    rows: np.ndarray
    cols: np.ndarray
    valid_everywhere: bool = True
    dense_ops: tuple[str, ...] = ()
    seconds: float = 0.0
    source: str = "user"  # "fake trace", "real trace" or "user"
    notes: tuple[str, ...] = ()
    reads_captured: bool = True
    """Whether finding it read the value of a tensor `f` holds (a captured index, a weight's zeros): then it holds
    for those values only. False for a trace that read none (NOTE: [A pattern that read no captured values])."""
    grids: tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]] = ((), ())
    """Shapes the rows' and the columns' elements were seen in, row-major (the outputs', the inputs'): hints for
    the colourings' lattice search (NOTE: [Grids the trace saw]), never trusted: a colouring is checked on the
    pattern whatever its source."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "grids", tuple(tuple(tuple(int(d) for d in shape) for shape in side)
                                                for side in self.grids))
        object.__setattr__(self, "rows", _frozen(self.rows))
        object.__setattr__(self, "cols", _frozen(self.cols))
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))

    @property
    def nnz(self) -> int:
        return int(self.rows.shape[0])

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    @property
    def max_row_nnz(self) -> int:
        """Most nonzeros in one row: the fewest colours any column colouring can use."""
        return int(np.bincount(self.rows, minlength=1).max()) if self.nnz else 0

    @property
    def max_col_nnz(self) -> int:
        """Most nonzeros in one column: the fewest colours any row colouring can use."""
        return int(np.bincount(self.cols, minlength=1).max()) if self.nnz else 0

    def to_scipy(self) -> sp.csr_array:
        """The pattern as a boolean scipy CSR matrix (n_out x n_in)."""
        indptr = np.zeros(self.shape[0] + 1, np.int64)
        np.cumsum(np.bincount(self.rows, minlength=self.shape[0]), out=indptr[1:])
        m = sp.csr_array((np.ones(self.nnz, bool), self.cols.copy(), indptr), shape=self.shape)
        m.has_sorted_indices = True
        return m

    def to_dense(self) -> torch.Tensor:
        """The pattern as an (n_out, n_in) torch.bool tensor."""
        out = torch.zeros(self.shape, dtype=torch.bool)
        out.view(-1)[torch.from_numpy(self.rows * self.shape[1] + self.cols)] = True
        return out

    def covers(self, jacobian: torch.Tensor) -> bool:
        """True when every nonzero of a dense (n_out, n_in) Jacobian lies inside the pattern."""
        j = jacobian.detach().reshape(self.shape).cpu()
        return bool(((j != 0) & ~self.to_dense()).sum() == 0)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pattern):
            return NotImplemented
        return (self.shape == other.shape and np.array_equal(self.rows, other.rows)
                and np.array_equal(self.cols, other.cols))

    __hash__ = None  # mutable-looking arrays inside: compare with ==, do not hash

    def __repr__(self) -> str:
        extra = "" if self.valid_everywhere else ", valid at this point only"
        dense = f", dense_ops={list(self.dense_ops)}" if self.dense_ops else ""
        return f"Pattern(shape={self.shape}, nnz={self.nnz}, density={self.density:.3g}{extra}{dense})"

    @classmethod
    def from_csr(cls, m: sp.csr_array, **kw) -> Pattern:
        """A pattern from the nonzero structure of a scipy sparse matrix (explicit zeros count)."""
        if not (isinstance(m, sp.csr_array) and m.has_canonical_format):
            m = sp.csr_array(m)
            m.sum_duplicates()
        rows = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
        return cls(shape=m.shape, rows=rows, cols=m.indices.astype(np.int64), **kw)

    @classmethod
    def from_user(cls, mask, shape: tuple[int, int] | None = None, *,
                  out_shape: Sequence[int] | None = None, in_shape: Sequence[int] | None = None) -> Pattern:
        """A pattern the caller knows: a bool tensor (dense or torch sparse) or numpy array.

        `mask` has shape (n_out, n_in), or out_shape + in_shape for one output and one input.
        Give `shape=(n_out, n_in)` or `out_shape`/`in_shape` to have the shape checked.
        """
        if out_shape is not None and in_shape is not None:
            expected = (math.prod(out_shape), math.prod(in_shape))
            if shape is not None and tuple(shape) != expected:
                raise ValueError(f"shape={tuple(shape)} disagrees with out_shape/in_shape {expected}")
            shape = expected
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(mask)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"sparsity mask must be a torch.bool tensor or numpy bool array, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"sparsity mask must have dtype torch.bool, got {mask.dtype}; pass `mask != 0`")
        dims = tuple(mask.shape)
        if shape is None:
            if len(dims) != 2:
                raise ValueError(f"sparsity mask has shape {dims}; give shape=(n_out, n_in) to say how it splits")
            shape = dims
        shape = (int(shape[0]), int(shape[1]))
        split = next((k for k in range(len(dims) + 1)
                      if math.prod(dims[:k]) == shape[0] and math.prod(dims[k:]) == shape[1]), None)
        if split is None:
            raise ValueError(f"sparsity mask of shape {dims} does not fit a {shape[0]} x {shape[1]} Jacobian "
                             "(expected (n_out, n_in) or out_shape + in_shape)")
        if mask.layout != torch.strided:
            coo = mask.to_sparse_coo().coalesce() if mask.layout != torch.sparse_coo else mask.coalesce()
            idx = coo.indices()[:, coo.values()].cpu()
            strides = torch.tensor([math.prod(dims[i + 1:]) for i in range(len(dims))], dtype=torch.int64)
            flat = (idx * strides[:, None]).sum(0) if idx.numel() else torch.zeros(0, dtype=torch.int64)
        else:
            flat = torch.nonzero(mask.reshape(-1).cpu()).reshape(-1)
        flat = np.sort(flat.numpy().astype(np.int64))
        out_grid = tuple(out_shape) if out_shape is not None else dims[:split]
        in_grid = tuple(in_shape) if in_shape is not None else dims[split:]
        return cls(shape=shape, rows=flat // shape[1], cols=flat % shape[1], source="user",
                   grids=(side_grids([out_grid]), side_grids([in_grid])))
