"""Which seed vectors are pushed and how their products become the Jacobian: dense, or a structured layout.

Dense: one seed per basis vector (slices of the identity, built one chunk at a
time) and products written into the result's blocks. A structured layout (a
sparsity pattern's colour groups) supplies its own `seeds`, `collector` and
pass counts; the methods and the chunking are the same for both.
"""

from __future__ import annotations

from .._core.problem import Problem
from .assemble import Assembler
from .basis import basis_chunk


def seeds(problem: Problem, by_rows: bool, start: int, stop: int):
    """Seeds start..stop: one tensor per output (reverse) or input (forward), of shape (k, *shape)."""
    if problem.layout is not None:
        return problem.layout.seeds(problem, by_rows, start, stop)
    if by_rows:
        return basis_chunk(start, stop, problem.out_shapes, problem.out_sizes, problem.out_dtypes, problem.inputs.device)
    return basis_chunk(start, stop, problem.inputs.shapes, problem.in_sizes, problem.inputs.dtypes, problem.inputs.device)


def collector(problem: Problem, by_rows: bool):
    """What the products of the seeds are written into; its `result()` is the Jacobian."""
    if problem.layout is not None:
        return problem.layout.collector(problem, by_rows)
    return Assembler(problem, by_rows=by_rows)
