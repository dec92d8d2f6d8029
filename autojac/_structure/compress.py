"""Compressed evaluation: seed tensors that sum the basis vectors of one colour, and a one-gather decompression.

Column colouring: the product for colour c is J @ s_c (a JVP); for every nonzero J[i, j] with
colour(j) = c it equals J[i, j] at row i. Row colouring: s_c^T @ J (a VJP) equals J[i, j] at
column j for colour(i) = c. So every nonzero is one element of the stacked products.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .._core.csr import csr_tensor
from .._core.zeros import pages_touched, zeros
from .coloring import Coloring
from .pattern import Pattern


def seeds(coloring: Coloring, start: int, stop: int, shapes: Sequence[Sequence[int]],
          dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
    """Seeds for colours start..stop-1, one tensor of shape (stop - start, *shape) per part.

    The parts are the inputs for a column colouring and the outputs for a row colouring; the seed
    of colour c holds ones at the elements of colour c, so it can be pushed like a slice of the identity.
    """
    if not 0 <= start <= stop <= coloring.n_colors:
        raise ValueError(f"colour range {start}..{stop} is outside 0..{coloring.n_colors}")
    sizes = [math.prod(s) for s in shapes]
    if sum(sizes) != coloring.colors.shape[0]:
        raise ValueError(f"shapes hold {sum(sizes)} elements but the {coloring.side} colouring has "
                         f"{coloring.colors.shape[0]} vertices: pass the {'input' if coloring.side == 'column' else 'output'} shapes")
    colors = torch.from_numpy(coloring.colors.copy()).to(device=device)
    wanted = torch.arange(start, stop, device=device)
    out, offset = [], 0
    for shape, n in zip(shapes, sizes):
        part = colors[offset:offset + n]
        out.append((part.unsqueeze(0) == wanted.unsqueeze(1)).to(dtype).reshape(stop - start, *shape))
        offset += n
    return tuple(out)


class Decompressor:
    """Recovers the pattern's nonzero values from the stacked compressed products with one gather."""

    def __init__(self, pattern: Pattern, coloring: Coloring) -> None:
        n_out, n_in = pattern.shape
        rows, cols = pattern.rows, pattern.cols
        if coloring.side == "column":
            if coloring.colors.shape[0] != n_in:
                raise ValueError(f"column colouring has {coloring.colors.shape[0]} colours entries, pattern has {n_in} columns")
            self.n_other = n_out
            vertex, other = cols, rows
        elif coloring.side == "row":
            if coloring.colors.shape[0] != n_out:
                raise ValueError(f"row colouring has {coloring.colors.shape[0]} entries, pattern has {n_out} rows")
            self.n_other = n_in
            vertex, other = rows, cols
        else:
            raise ValueError(f"unknown colouring side {coloring.side!r}")
        if coloring.peeled is not None:
            # NOTE: [Peeling dense lines of a symmetric Jacobian]: an entry in a peeled line, read across
            # (its vertex not peeled), is the transposed entry of that line's own product.
            peel = np.zeros(n_in, bool)
            peel[coloring.peeled] = True
            across = peel[other] & ~peel[vertex]
            vertex, other = np.where(across, other, vertex), np.where(across, vertex, other)
        index = coloring.colors[vertex] * self.n_other + other
        self.pattern = pattern
        self.coloring = coloring
        self._index = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
        self._by_device: dict[torch.device, torch.Tensor] = {}
        self._rows = torch.from_numpy(rows.copy())
        self._cols = torch.from_numpy(cols.copy())
        self._pairs: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._flat: dict[torch.device, torch.Tensor] = {}  # row * n_in + col: where a dense result is written
        self._pages: dict[int, int] = {}  # pages a dense result's writes reach, per item size (CPU)

    def pairs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The pattern's (row, column) indices (int64, row-major order) on `device`, copied there once."""
        got = self._pairs.get(device)
        if got is None:
            got = self._pairs[device] = (self._rows.to(device), self._cols.to(device))
        return got

    def index(self, device: torch.device) -> torch.Tensor:
        idx = self._by_device.get(device)
        if idx is None:
            idx = self._by_device[device] = self._index.to(device)
        return idx

    def decompress(self, products: torch.Tensor) -> torch.Tensor:
        """Nonzero values in the pattern's (row-major) order from products of shape (n_colors, n_other)."""
        expected = (self.coloring.n_colors, self.n_other)
        if tuple(products.shape) != expected:
            what = "JVPs over all outputs" if self.coloring.side == "column" else "VJPs over all inputs"
            raise ValueError(f"products have shape {tuple(products.shape)}, expected {expected}: one row per colour, "
                             f"each the flattened {what}")
        return products.reshape(-1).index_select(0, self.index(products.device))

    def to_dense(self, values: torch.Tensor, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """The (n_out, n_in) dense Jacobian with `values` at the pattern's positions and zeros elsewhere."""
        device = torch.device(device) if device is not None else values.device
        n_out, n_in = self.pattern.shape
        dtype = dtype or values.dtype
        flat = self._flat.get(device)
        if flat is None:  # once per device, not on every call
            rows, cols = self.pairs(device)
            flat = self._flat[device] = rows * n_in + cols
        pages = None
        if device.type == "cpu":
            pages = self._pages.get(dtype.itemsize)
            if pages is None:
                pages = self._pages[dtype.itemsize] = pages_touched(flat, dtype.itemsize)
        out = zeros((n_out * n_in,), dtype, device, touched_pages=pages)
        out.index_copy_(0, flat, values.to(device=device, dtype=out.dtype))
        return out.view(n_out, n_in)

    def to_sparse_coo(self, values: torch.Tensor) -> torch.Tensor:
        """A coalesced torch sparse COO tensor of shape (n_out, n_in)."""
        idx = torch.stack(self.pairs(values.device))
        return torch.sparse_coo_tensor(idx, values, self.pattern.shape, is_coalesced=True, check_invariants=False)

    def to_sparse_csr(self, values: torch.Tensor) -> torch.Tensor:
        """A torch sparse CSR tensor of shape (n_out, n_in)."""
        rows, cols = self.pairs(values.device)
        return csr_tensor(rows, cols, values, self.pattern.shape)
