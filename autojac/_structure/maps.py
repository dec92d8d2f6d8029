"""Position maps: int64 tensors holding each element's 1-based flat index (0 = no source element).

Running a data-movement op on position maps instead of values tells, for every output element,
which input element it was copied from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .engine import arange1


def pos_map(shape: Sequence[int], offset: int = 0) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    if offset == 0:
        return arange1(n).view(tuple(shape))
    return torch.arange(offset + 1, offset + n + 1, dtype=torch.int64).view(tuple(shape))


def broadcast_positions(shape: Sequence[int], out_shape: Sequence[int]) -> np.ndarray | None:
    """1-based position of the operand element feeding each output element; None when shapes agree."""
    if tuple(shape) == tuple(out_shape):
        return None
    return pos_map(shape).expand(tuple(out_shape)).reshape(-1).numpy()


def norm_dims(dims, ndim: int) -> list[int]:
    """Reduction dims as sorted non-negative ints; None or [] means every dim."""
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    dims = list(dims)
    if not dims:
        return list(range(ndim))
    return sorted({d % ndim if ndim else 0 for d in dims})


def group_positions(shape: Sequence[int], dims: Sequence[int]) -> np.ndarray:
    """(n_groups, k) positions: the elements reduced together, groups in row-major order of kept dims."""
    ndim = len(shape)
    kept = [d for d in range(ndim) if d not in dims]
    p = pos_map(shape)
    if ndim:
        p = p.permute(*kept, *dims)
    n_groups = 1
    for d in kept:
        n_groups *= shape[d]
    k = 1
    for d in dims:
        k *= shape[d]
    return p.reshape(n_groups, k).numpy()


def line_positions(shape: Sequence[int], dim: int, out_shape: Sequence[int] | None = None) -> np.ndarray:
    """For each element of out_shape (shape with dim resized), the 1-based index of its line."""
    shape = list(shape)
    kept = shape[:dim] + shape[dim + 1:]
    lines = pos_map(kept).unsqueeze(dim)
    target = list(out_shape) if out_shape is not None else shape
    return lines.expand(target).reshape(-1).numpy()
