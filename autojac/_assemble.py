"""Writing chunks of Jacobian rows or columns into the blocks the user gets back."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._problem import Problem


class Assembler:
    """Owns one preallocated block per (output, input) pair and fills it chunk by chunk.

    Reverse-mode chunks are rows of the Jacobian: one tensor per input, of shape
    (k, *input_shape). Forward-mode chunks are columns: one tensor per output, of
    shape (k, *output_shape). Each block is its own contiguous tensor, so the
    result needs no copy at the end and matches `torch.autograd.functional.jacobian`.
    """

    def __init__(self, problem: Problem, by_rows: bool):
        self.problem = problem
        self.by_rows = by_rows
        device = problem.inputs.device
        self.blocks = [
            [torch.zeros(m, n, dtype=dt, device=device) for n, dt in zip(problem.in_sizes, problem.inputs.dtypes)]
            for m in problem.out_sizes
        ]

    def add(self, start: int, stop: int, parts: Sequence[torch.Tensor | None]) -> None:
        """Store basis vectors start..stop; `parts` has one entry per input (rows) or output (columns)."""
        p = self.problem
        k = stop - start
        # The basis runs over outputs (rows) or inputs (columns); `parts` over the other side.
        basis_sizes = p.out_sizes if self.by_rows else p.in_sizes
        offset = 0
        for b, size in enumerate(basis_sizes):
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                for q, part in enumerate(parts):
                    if part is None:  # independent: the block stays zero
                        continue
                    flat = part.reshape(k, -1)[lo - start : hi - start]
                    if self.by_rows:
                        self.blocks[b][q][lo - offset : hi - offset].copy_(flat)
                    else:
                        self.blocks[q][b][:, lo - offset : hi - offset].copy_(flat.T)
            offset += size

    def result(self) -> object:
        """The Jacobian with the nesting of `torch.autograd.functional.jacobian`."""
        p = self.problem
        rows = [
            tuple(
                block.view(out_shape + in_shape)
                for block, in_shape in zip(row, p.inputs.shapes)
            )
            for row, out_shape in zip(self.blocks, p.out_shapes)
        ]
        per_output = [row if p.inputs.is_tuple else row[0] for row in rows]
        return tuple(per_output) if p.outputs_tuple else per_output[0]
