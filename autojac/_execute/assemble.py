"""Writing chunks of Jacobian rows or columns into the blocks the user gets back."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._core.problem import Problem
from .._core.pytree import nest
from .._core.zeros import zeros

TILED_COLUMNS_UP_TO = 16
"""Columns written in tiles (`_write_columns`) when a chunk holds at most this many."""
TILE_ROWS = 64


def _write_columns(dest: torch.Tensor, flat: torch.Tensor) -> None:
    """dest (m, k) = flat (k, m) transposed.

    NOTE: [Writing few long columns]
    torch copies a transposed (k, m) tensor into (m, k) rows of k elements slowly when k is small: 16 forward
    columns of a 114688-row result (float64, the habits benchmark's springs at B=4096) took 5.7-7.7 ms, the same
    copy split into tiles of 64 rows (a 3-D permuted view) 1.9-2.6 ms; 3 columns of 10^6 rows 13.1 against 3.2 ms.
    From 64 columns up the tiles were slower (64 x 10^5 float32: 12.4 against 10.2 ms; 512 x 512: 0.68 against
    0.60 ms), so they are kept for chunks of at most TILED_COLUMNS_UP_TO (2-core CPU, torch 2.13); on CPUs only, as
    nothing was measured on GPUs.
    """
    k, m = flat.shape
    main = m - m % TILE_ROWS
    if k > TILED_COLUMNS_UP_TO or main < 4 * TILE_ROWS or flat.device.type != "cpu":
        dest.copy_(flat.T)
        return
    dest[:main].unflatten(0, (main // TILE_ROWS, TILE_ROWS)).copy_(
        flat[:, :main].unflatten(1, (main // TILE_ROWS, TILE_ROWS)).permute(1, 2, 0))
    if main < m:
        dest[main:].copy_(flat[:, main:].T)


class Assembler:
    """Collects one block per (output, input) pair, chunk by chunk.

    Reverse-mode chunks are rows of the Jacobian: one tensor per input, of shape
    (k, *input_shape). Forward-mode chunks are columns: one tensor per output, of
    shape (k, *output_shape). A block is allocated when a chunk first writes to
    it, except when one chunk covers the whole basis: then the chunk's rows are
    the block already (a view, no copy), or its columns are copied once,
    transposed (NOTE: [Writing few long columns]). Blocks nothing wrote to are zeros (outputs independent of inputs).
    """

    def __init__(self, problem: Problem, by_rows: bool):
        self.problem = problem
        self.by_rows = by_rows
        self.n_basis = problem.n_out if by_rows else problem.n_in
        self.blocks: list[list[torch.Tensor | None]] = [[None] * len(problem.in_sizes) for _ in problem.out_sizes]

    def _block(self, i: int, j: int) -> torch.Tensor:
        if self.blocks[i][j] is None:
            p = self.problem
            self.blocks[i][j] = zeros((p.out_sizes[i], p.in_sizes[j]), p.inputs.dtypes[j], p.inputs.device)
        return self.blocks[i][j]

    def add(self, start: int, stop: int, parts: Sequence[torch.Tensor | None]) -> None:
        """Store basis vectors start..stop; `parts` has one entry per input (rows) or output (columns)."""
        p = self.problem
        k = stop - start
        whole = start == 0 and stop == self.n_basis
        basis_sizes = p.out_sizes if self.by_rows else p.in_sizes
        offset = 0
        for b, size in enumerate(basis_sizes):
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                for q, part in enumerate(parts):
                    if part is None:  # independent: the block stays zero
                        continue
                    flat = part.reshape(k, -1)
                    if hi - lo != k:
                        flat = flat[lo - start : hi - start]
                    i, j = (b, q) if self.by_rows else (q, b)
                    dtype = p.inputs.dtypes[j]
                    if whole:
                        block = flat if self.by_rows else flat.T
                        if block.dtype != dtype or not block.is_contiguous():  # e.g. an expanded view (stride 0)
                            fresh = torch.empty(block.shape, dtype=dtype, device=block.device)
                            if self.by_rows:
                                fresh.copy_(block)
                            else:
                                _write_columns(fresh, flat)
                            block = fresh
                        self.blocks[i][j] = block
                    elif self.by_rows:
                        self._block(i, j)[lo - offset : hi - offset].copy_(flat)
                    else:
                        _write_columns(self._block(i, j)[:, lo - offset : hi - offset], flat)
            offset += size

    def nonzero_share(self, start: int, stop: int) -> float | None:
        """The share of nonzero entries among the rows (reverse) or columns (forward) start..stop written so
        far, over every block (a block never written counts as zeros); None for an empty range."""
        p = self.problem
        basis_sizes = p.out_sizes if self.by_rows else p.in_sizes
        other = sum(p.in_sizes) if self.by_rows else sum(p.out_sizes)
        total = (stop - start) * other
        if total <= 0:
            return None
        nonzero, offset = None, 0
        for b, size in enumerate(basis_sizes):
            lo, hi = max(start, offset) - offset, min(stop, offset + size) - offset
            if lo < hi:
                for q in range(len(p.in_sizes) if self.by_rows else len(p.out_sizes)):
                    i, j = (b, q) if self.by_rows else (q, b)
                    block = self.blocks[i][j]
                    if block is None:
                        continue
                    part = block[lo:hi] if self.by_rows else block[:, lo:hi]
                    count = torch.count_nonzero(part)
                    nonzero = count if nonzero is None else nonzero + count
            offset += size
        return 0.0 if nonzero is None else int(nonzero) / total  # one device sync

    def result(self) -> object:
        """The Jacobian, nested output-major (see `_core/pytree.py`)."""
        p = self.problem
        rows = [
            tuple(
                self._block(i, j).reshape(out_shape + in_shape)
                for j, in_shape in enumerate(p.inputs.shapes)
            )
            for i, out_shape in enumerate(p.out_shapes)
        ]
        return nest(rows, p.out_spec, p.inputs.spec)

    def checkable(self, result: object) -> object:
        """What the safety net's product w^T J is taken from: the result itself."""
        return result
