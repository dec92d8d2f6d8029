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
be resized in place (its storage is numpy's or an anonymous mapping's); everything
else is an ordinary tensor.

NOTE: [Pages a sparse result touches]
numpy asks for transparent huge pages on large arrays (madvise), so the first write
into each 2 MiB of the result makes the kernel zero all of it: a 10^4 x 10^4 float64
diagonal (800 MB) took 87-111 ms to write its 10^4 values, every huge page zeroed.
When the writes are known and touch few of the 4 KiB pages (a diagonal, a
permutation, a narrow band in long rows), the result is an anonymous mapping of
ordinary pages instead: the same diagonal wrote in 14-15 ms, and a later full read
(which maps the kernel's shared zero page) took 92 ms against 31 ms for resident
zeros, so even a caller who reads every entry once pays less in all (107 against
120 ms). Results whose writes reach most pages keep the huge pages (fewer faults).

NOTE: [Faulting a sparse result's pages on every core]
Writing a sparse Jacobian's few values into such a result is one `index_copy_`, too
small for torch to split over threads, so one core takes every page fault and zeroes
every page: for the 2-D Brusselator's 2048 x 2048 float64 result (12288 values, most
huge pages reached) 7.7-9.0 ms of a ~10 ms warm call. When the writes reach at least
FAULT_FROM_SHARE of the pages of a result of FAULT_FROM_BYTES or more, `zeros` first
writes a zero one page's length apart through a strided `zero_` sized for torch's
intra-op threads to split (about GRAIN_ELEMENTS a thread): 5.4-5.7 ms with the write,
on 2 cores (Python threads splitting the `index_copy_` took 5.2-5.4 ms, and would
have to carry thread-local grad and inference modes over). Pages the writes would not
have reached are then at most as many as those they reach, and with transparent huge
pages (numpy asks for them from 4 MiB) a huge page is zeroed whole at its first touch
anyway. Measured on the 2-core CPU only.
"""

from __future__ import annotations

import math
import mmap

import numpy as np
import torch

CALLOC_FROM_BYTES = 1 << 20
"""Below this, `torch.zeros` (small allocations come from reused heap memory anyway)."""
PAGE_BYTES = mmap.PAGESIZE
SMALL_PAGES_BELOW = 0.25
"""Ordinary pages when the writes can touch at most this share of the result's pages."""
FAULT_FROM_SHARE = 0.5
FAULT_FROM_BYTES = 4 << 20
"""Pages are faulted ahead (NOTE: [Faulting a sparse result's pages on every core]) for results of at least this
size whose writes reach at least FAULT_FROM_SHARE of their pages."""
GRAIN_ELEMENTS = 1 << 15
"""torch's grain size: an elementwise op over fewer elements than this runs on one thread."""

_NUMPY = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
          torch.complex64: np.complex64, torch.complex128: np.complex128}
_ANONYMOUS = getattr(mmap, "MAP_PRIVATE", None) is not None and getattr(mmap, "MAP_ANONYMOUS", None) is not None


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
          touched_pages: int | None = None) -> torch.Tensor:
    """`torch.zeros(shape, dtype, device)`, from calloc for large CPU tensors (see NOTE: [Zeros from calloc]);
    `touched_pages`: how many PAGE_BYTES pages the caller's writes will reach (None: unknown, or no writes), for
    NOTE: [Pages a sparse result touches] and NOTE: [Faulting a sparse result's pages on every core]."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < CALLOC_FROM_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    if touched_pages is not None and _ANONYMOUS and touched_pages < SMALL_PAGES_BELOW * (nbytes / PAGE_BYTES):
        return _mapped_zeros(shape, dtype, nbytes)
    np_dtype = _NUMPY.get(dtype)
    if np_dtype is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    out = torch.from_numpy(np.zeros(shape, dtype=np_dtype))
    if (touched_pages is not None and nbytes >= FAULT_FROM_BYTES
            and touched_pages >= FAULT_FROM_SHARE * (nbytes / PAGE_BYTES)):
        fault_pages(out)
    return out


def fault_pages(out: torch.Tensor) -> None:
    """Write zeros one page's length apart (and a few after each) into the contiguous, zero-filled `out`, with one
    op torch splits over all its threads (NOTE: [Faulting a sparse result's pages on every core]); nothing on one
    thread."""
    per_page = PAGE_BYTES // out.element_size()
    pages = out.numel() // per_page
    threads = torch.get_num_threads()
    if threads < 2 or pages < 2 or PAGE_BYTES % out.element_size():
        return
    width = min(per_page, max(1, -(-GRAIN_ELEMENTS * threads // pages)))
    with torch.no_grad():
        out.reshape(-1)[:pages * per_page].view(pages, per_page)[:, :width].zero_()


def pages_touched(flat: torch.Tensor, itemsize: int) -> int:
    """How many PAGE_BYTES pages writes at the sorted flat indices `flat` reach in a page-aligned tensor."""
    if flat.numel() == 0:
        return 0
    pages = torch.div(flat * itemsize, PAGE_BYTES, rounding_mode="floor")
    return int((pages[1:] != pages[:-1]).sum()) + 1


def _mapped_zeros(shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> torch.Tensor:
    """Zeros in a private anonymous mapping of ordinary pages; the tensor holds the mapping (unmapped when the
    tensor's storage goes)."""
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)
