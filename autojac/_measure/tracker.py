"""Measuring what a piece of work really allocates (peak extra bytes) and how long it takes."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveStorageTracker(TorchDispatchMode):
    """Counts the bytes of tensor storages created while active, until each is freed.

    Every op's outputs pass through `__torch_dispatch__`, below autograd and
    vmap, so storages made in forward, backward and batched passes are all seen.
    A weak reference to each storage fires when the storage dies, so `peak` is
    the true high-water mark of live bytes, not a sum of allocations. Outputs
    that share storage with an op's inputs (views, in-place ops) are not new.

    Buffers a kernel allocates inside itself never pass through here; the one
    large kind is modelled: see `_blas_copy_bytes`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inside = _blas_copy_bytes(func, args)
        out = func(*args, **(kwargs or {}))
        seen = {_data_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            try:
                storage = t.untyped_storage()
                storage.data_ptr()
            except RuntimeError:  # a tensor without real storage of its own (a wrapper)
                continue
            key = id(storage)
            if key in self._refs or storage.data_ptr() in seen:
                continue
            nbytes = storage.nbytes()
            self._refs[key] = weakref.ref(storage, lambda _, key=key, n=nbytes: self._freed(key, n))
            self.live += nbytes
        self.peak = max(self.peak, self.live + inside)
        return out


# NOTE: [Copies inside matrix kernels]
# CPU mm/mv kernels copy an operand that BLAS cannot read in place (one with a
# zero stride, i.e. expanded) into a contiguous temporary, below the dispatcher.
# Forward-mode AD hits this on every matrix product with a weight that has no
# tangent: the weight's zero tangent is an expanded scalar, and mm copies it to
# a full weight-sized buffer (pytorch/pytorch#69687: ZeroTensor products are not
# O(1) yet). Measured: 64 MiB of peak RSS per 64 MiB weight that the live-storage
# count alone missed, so forward-mode plans could exceed a CPU budget by that.
_MATRIX_OPERANDS = {"mm": (0, 1), "addmm": (1, 2), "mv": (0, 1), "addmv": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2)}


def _blas_copy_bytes(func, args) -> int:
    """Bytes of the temporaries a CPU matrix kernel makes of operands BLAS cannot read in place."""
    operands = _MATRIX_OPERANDS.get(getattr(func, "__name__", "").split(".")[0])
    if operands is None:
        return 0
    total = 0
    for i in operands:
        t = args[i] if i < len(args) else None
        if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not _blas_readable(t):
            total += t.numel() * t.element_size()
    return total


def _blas_readable(t: torch.Tensor) -> bool:
    """Whether the last one or two dims have a layout BLAS takes as is (no zero stride on a real dim)."""
    return all(stride != 0 or size == 1 for size, stride in zip(t.shape[-2:], t.stride()[-2:]))


def _data_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return None


def measure_peak_bytes(work: Callable[[], Any], device: torch.device) -> tuple[int, Any]:
    """Run `work()`; return the peak bytes it held beyond what existed before, and its result.

    On CUDA this is the caching allocator's own peak statistic; elsewhere, the
    live-storage tracker. What `work` returns is counted while it is alive.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = work()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before), result
    tracker = LiveStorageTracker()
    with tracker:
        result = work()
    return tracker.peak, result


def timed(work: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of `work()`, synchronizing CUDA so queued kernels are counted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result
