"""The structured layout: one seed per colour of a sparsity pattern, products decompressed by one gather.

Reverse modes push row-colour seeds (the outputs of one colour at once) and get
one VJP per colour; forward modes push column-colour seeds. Every nonzero of the
Jacobian is one element of the stacked products (see `_structure/compress.py`),
so the products of all colours are collected in one small buffer and gathered
into the result at the end: a dense result of the usual structure, or torch
sparse tensors that never hold the zeros.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch.utils import _pytree

from .._core.csr import csr_tensor, to_csr
from .._core.problem import Problem
from .._core.pytree import nest
from .._structure import Coloring, Decompressor, Pattern

OUTPUTS = ("dense", "sparse", "csr")


AT_ONE_POINT = "; valid at this point only, verified on every call"
"""How a layout's description ends when its pattern holds at the first call's point only."""


class SparseLayout:
    """A pattern with its row and column colourings; `output` is "dense", "sparse" (COO) or "csr"."""

    def __init__(self, pattern: Pattern, rows: Coloring, columns: Coloring, output: str = "dense") -> None:
        self.pattern, self.rows, self.columns, self.output = pattern, rows, columns, output
        self.row_passes = rows.n_colors
        self.col_passes = columns.n_colors
        self._decompressors = {True: Decompressor(pattern, rows), False: Decompressor(pattern, columns)}
        self._colors: dict[tuple[bool, torch.device], torch.Tensor] = {}

    def describe(self) -> str:
        p = self.pattern
        text = f"sparse: {p.nnz} nonzeros of {p.shape[0]} x {p.shape[1]} ({p.source}), "
        if self.columns.peeled is not None:
            text += (f"{self.columns.n_colors} colours by symmetry ({len(self.columns.peeled)} dense line(s) peeled "
                     f"off, each its own colour; a row or column colouring needs at least {self.columns.lower_bound})")
        else:
            text += (f"{self.rows.n_colors} row colours (at least {self.rows.lower_bound}), "
                     f"{self.columns.n_colors} column colours (at least {self.columns.lower_bound})")
        if p.dense_ops:
            text += f"; treated as dense: {', '.join(p.dense_ops)}"
        if not p.valid_everywhere:
            text += AT_ONE_POINT
        return text

    def _color_tensor(self, by_rows: bool, device: torch.device) -> torch.Tensor:
        key = (by_rows, device)
        colors = self._colors.get(key)
        if colors is None:
            coloring = self.rows if by_rows else self.columns
            colors = self._colors[key] = torch.from_numpy(coloring.colors.copy()).to(device)
        return colors

    def seeds(self, problem: Problem, by_rows: bool, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        """Seeds for colours start..stop: ones at the outputs (rows) or inputs (columns) of each colour."""
        device = problem.inputs.device
        colors = self._color_tensor(by_rows, device)
        wanted = torch.arange(start, stop, device=device).unsqueeze(1)
        if by_rows:
            shapes, sizes, dtypes = problem.out_shapes, problem.out_sizes, problem.out_dtypes
        else:
            shapes, sizes, dtypes = problem.inputs.shapes, problem.in_sizes, problem.inputs.dtypes
        out, offset = [], 0
        for shape, size, dtype in zip(shapes, sizes, dtypes):
            part = colors[offset:offset + size]
            out.append((part.unsqueeze(0) == wanted).to(dtype).reshape(stop - start, *shape))
            offset += size
        return tuple(out)

    def collector(self, problem: Problem, by_rows: bool) -> SparseCollector:
        return SparseCollector(self, problem, by_rows)

    def products_bytes(self, problem: Problem, by_rows: bool | None = None) -> int:
        """The stacked products of every colour on one side (what `SparseCollector` holds); None: the smaller side."""
        if by_rows is None:
            return min(self.products_bytes(problem, True), self.products_bytes(problem, False))
        return (self.row_passes * problem.n_in if by_rows else self.col_passes * problem.n_out) * _itemsize(problem)

    def result_bytes(self, problem: Problem) -> int:
        """What making the result takes: the dense blocks for a dense output; for a sparse one, the stacked
        products of every colour (on the side with fewer colours: a method on the other side needs more, see
        `PlanEntry`), the nonzeros gathered from them, and the sparse blocks' values and int64 indices (one per
        dimension of a COO block; a CSR block's column indices and row pointers)."""
        if self.output == "dense":
            return problem.dense_result_bytes
        nnz = self.pattern.nnz
        if self.output == "csr":
            indices = nnz * 8 + sum(8 * (m + 1) for m in problem.out_sizes) * len(problem.in_sizes)
        else:
            ndim = max(len(o) + len(i) for o in problem.out_shapes for i in problem.inputs.shapes)
            indices = nnz * 8 * max(ndim, 2)
        return self.products_bytes(problem) + 2 * nnz * _itemsize(problem) + indices


def _itemsize(problem: Problem) -> int:
    """Bytes of one element of the stacked products (the promoted dtype of every input and output)."""
    return max(dt.itemsize for dt in (*problem.inputs.dtypes, *problem.out_dtypes))


class SparseCollector:
    """Stacks the products of every colour, then decompresses them in one gather."""

    def __init__(self, layout: SparseLayout, problem: Problem, by_rows: bool) -> None:
        self.layout, self.problem, self.by_rows = layout, problem, by_rows
        n_colors = layout.row_passes if by_rows else layout.col_passes
        self.n_other = problem.n_in if by_rows else problem.n_out
        dtype = functools.reduce(torch.promote_types, (*problem.inputs.dtypes, *problem.out_dtypes))
        self.products = torch.zeros(n_colors, self.n_other, dtype=dtype, device=problem.inputs.device)
        self.values: torch.Tensor | None = None  # a dense result's nonzeros, for `checkable`

    def add(self, start: int, stop: int, parts: Sequence[torch.Tensor | None]) -> None:
        k = stop - start
        sizes = self.problem.in_sizes if self.by_rows else self.problem.out_sizes
        offset = 0
        self.values = None
        for part, size in zip(parts, sizes):
            if part is not None:
                self.products[start:stop, offset:offset + size].copy_(part.reshape(k, size))
            offset += size

    def result(self) -> object:
        p, layout = self.problem, self.layout
        decompressor = layout._decompressors[self.by_rows]
        values = decompressor.decompress(self.products)
        if layout.output == "dense":
            self.values = values
            full = decompressor.to_dense(values)
            blocks = _blocks(full, p, lambda block, j: block.to(p.inputs.dtypes[j]).contiguous())
        else:
            blocks = _sparse_blocks(values, layout, p)
        return nest(blocks, p.out_spec, p.inputs.spec)

    def checkable(self, result: object) -> object:
        """What the safety net's product w^T J is taken from: for a dense result of a sparse enough pattern, the
        same values as 2-D sparse COO blocks (w^T J over the nonzeros alone: a dense n x n product read 200 MB
        for a 5000-element permutation, a quarter of its first call). The dense result is a scatter of exactly
        these values. A pattern whose COO form would take over a quarter of the dense result's bytes is checked
        on the dense result, as before (the COO copy could break a budget the dense product does not)."""
        if self.values is None:
            return result
        p = self.problem
        if self.values.numel() * COO_BYTES_PER_NONZERO > p.dense_result_bytes // 4:
            return result
        return nest(_sparse_blocks(self.values, self.layout, p, "sparse", flat=True), p.out_spec, p.inputs.spec)


COO_BYTES_PER_NONZERO = 24
"""Two int64 indices and a float64 value."""


def as_output(result: object, in_sizes: Sequence[int], output: str) -> object:
    """A dense result's blocks as torch sparse COO tensors (same shapes) or 2-D CSR matrices."""
    if output == "dense":
        return result
    leaves, spec = _pytree.tree_flatten(result)
    converted = []
    for k, block in enumerate(leaves):
        if block.layout != torch.strided:
            converted.append(block)
            continue
        n = in_sizes[k % len(in_sizes)]
        matrix = block.reshape(block.numel() // max(n, 1), n)
        converted.append(to_csr(matrix) if output == "csr" else block.to_sparse())
    return _pytree.tree_unflatten(converted, spec)


def _blocks(full: torch.Tensor, p: Problem, finish) -> list[list[torch.Tensor]]:
    rows, r0 = [], 0
    for i, (m, out_shape) in enumerate(zip(p.out_sizes, p.out_shapes)):
        row, c0 = [], 0
        for j, (n, in_shape) in enumerate(zip(p.in_sizes, p.inputs.shapes)):
            row.append(finish(full[r0:r0 + m, c0:c0 + n], j).reshape(*out_shape, *in_shape))
            c0 += n
        rows.append(row)
        r0 += m
    return rows


def _sparse_blocks(values: torch.Tensor, layout: SparseLayout, p: Problem, output: str | None = None,
                   flat: bool = False) -> list[list[torch.Tensor]]:
    """One sparse tensor per (output, input) block: COO in the block's dense shape (2-D with `flat`), or a 2-D
    CSR matrix (`output`, the layout's own by default)."""
    output = output or layout.output
    rows, cols = layout._decompressors[True].pairs(values.device)
    single = len(p.out_shapes) == 1 and len(p.inputs.shapes) == 1  # one block: every nonzero, no masks
    out_offsets = [0, *torch.tensor(p.out_sizes).cumsum(0).tolist()]
    in_offsets = [0, *torch.tensor(p.in_sizes).cumsum(0).tolist()]
    blocks = []
    for i, out_shape in enumerate(p.out_shapes):
        row = []
        in_rows = None if single else (rows >= out_offsets[i]) & (rows < out_offsets[i + 1])
        for j, in_shape in enumerate(p.inputs.shapes):
            if single:
                r, c, v = rows, cols, values.to(p.inputs.dtypes[j])
            else:
                keep = in_rows & (cols >= in_offsets[j]) & (cols < in_offsets[j + 1])
                r, c = rows[keep] - out_offsets[i], cols[keep] - in_offsets[j]
                v = values[keep].to(p.inputs.dtypes[j])
            m, n = p.out_sizes[i], p.in_sizes[j]
            if output == "csr":
                # one block: the cached column indices themselves, so the caller gets a copy of them
                row.append(csr_tensor(r, c.clone() if single else c, v, (m, n)))
            else:
                matrix = torch.sparse_coo_tensor(torch.stack([r, c]), v, (m, n), is_coalesced=True, check_invariants=False)
                row.append(matrix if flat or (len(out_shape), len(in_shape)) == (1, 1) else _reshape_coo(matrix, (*out_shape, *in_shape)))
        blocks.append(row)
    return blocks


def _reshape_coo(flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A 2-D COO matrix as a COO tensor of `shape` (the dense result's shape)."""
    m, n = flat.shape
    r, c = flat.indices()
    linear = r * n + c
    index = torch.stack(torch.unravel_index(linear, shape)) if shape else linear.new_zeros(0, linear.numel())
    return torch.sparse_coo_tensor(index, flat.values(), shape, is_coalesced=True, check_invariants=False)
