"""Balanced chunking of the basis, and slices of the identity built one chunk at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._core.problem import Shape

# NOTE: [Why the basis is built lazily]
# The identity for n basis vectors holds n * n numbers; for a 10^5-element input
# that is 40 GB in float32, far more than the Jacobian chunk it produces. Each
# chunk therefore builds only its own k rows of the identity, split into one
# tensor per input (or output), and drops them when the chunk is done.


def balanced_chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """Split range(n) into ceil(n / chunk_size) chunks of nearly equal size.

    With n = 10 and chunk_size = 8 this gives sizes 5 and 5, not 8 and 2: the
    number of chunks is what costs time, and equal chunks keep the peak low.
    """
    if n == 0:
        return []
    n_chunks = -(-n // chunk_size)
    size = -(-n // n_chunks)
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def n_chunks(n: int, chunk_size: int) -> int:
    return len(balanced_chunks(n, chunk_size))


def basis_chunk(
    start: int,
    stop: int,
    shapes: Sequence[Shape],
    sizes: Sequence[int],
    dtypes: Sequence[torch.dtype],
    device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """Rows start..stop of the identity over the concatenated flat parts.

    Returns one tensor per part, of shape (stop - start, *shape): row r is the
    (start + r)-th standard basis vector, cut into the parts' shapes.
    """
    k = stop - start
    parts = []
    offset = 0
    for shape, size, dtype in zip(shapes, sizes, dtypes):
        # Row r has its one at column start + r - offset of this part: the
        # diagonal at that offset, clipped to the part by `diagonal` itself.
        if start == offset:
            part = torch.eye(k, size, dtype=dtype, device=device)  # one op: the common whole-basis case
        else:
            part = torch.zeros(k, size, dtype=dtype, device=device)
            part.diagonal(start - offset).fill_(1)
        parts.append(part.view(k, *shape))
        offset += size
    return tuple(parts)
