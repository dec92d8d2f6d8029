"""Zero-filled results without writing the zeros twice.

NOTE: [Zeros from calloc]
A large fresh CPU allocation comes from the kernel as zeroed pages, mapped on first
touch. `torch.zeros` then writes zeros over them again: for a dense result of a
sparse Jacobian (4096 x 4096, float64) that fill was 35 ms of a 41 ms call, twice
what the kernel's own zeroing takes (2-core CPU: 134 MB zeroed and a diagonal
written in 19 ms through calloc, 37 ms through `torch.zeros`; followed by a full
read, 27 against 60 ms). `numpy.zeros` allocates with calloc, which skips the fill
when the memory is fresh from the kernel and clears it when it is not, so large CPU
results start from there (shared with torch without a copy). Such a tensor cannot
be resized in place (its storage is numpy's); everything else is an ordinary tensor.
"""

from __future__ import annotations

import math

import numpy as np
import torch

CALLOC_FROM_BYTES = 1 << 20
"""Below this, `torch.zeros` (small allocations come from reused heap memory anyway)."""

_NUMPY = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
          torch.complex64: np.complex64, torch.complex128: np.complex128}


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.zeros(shape, dtype, device)`, from calloc for large CPU tensors (see NOTE: [Zeros from calloc])."""
    np_dtype = _NUMPY.get(dtype)
    if (device.type != "cpu" or np_dtype is None
            or math.prod(shape) * dtype.itemsize < CALLOC_FROM_BYTES):
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.zeros(shape, dtype=np_dtype))
