"""Memory facts: free and total bytes on the inputs' device (psutil, NVML, torch.cuda)."""

from __future__ import annotations

import functools
import logging
import time
import os
from collections.abc import Sequence
from dataclasses import dataclass

import psutil
import torch


logger = logging.getLogger("autojac")

CPU_WORKSPACE_RESERVE = 8 * 2**20
"""Host memory kept back for BLAS/OpenMP per-thread workspaces, which the CPU probes cannot see.

NOTE: [Why a CPU reserve]
On the CPU, probes count tensor storages (see `_measure.LiveStorageTracker`),
plus the copies matrix kernels make of expanded operands (forward mode's zero
tangents; see NOTE: [Copies inside matrix kernels]).
Matrix kernels also allocate packing buffers of their own, per thread, on first
use of a shape; in a fresh process the first Jacobian's peak RSS was measured
5-9 MiB above the tracked peak on a 2-core machine (benchmarks/). CUDA probes
read the caching allocator, which sees the cuBLAS workspace, so need none.
"""

@dataclass(frozen=True)
class MemoryFacts:
    """Free memory on one device, and where the number came from."""

    device: str
    free_bytes: int
    source: str


def cpu_free_bytes() -> MemoryFacts:
    return MemoryFacts("cpu", int(psutil.virtual_memory().available), "psutil.virtual_memory().available")


def _nvml_index(torch_index: int, visible: str | None) -> int | str:
    """The NVML device (index or UUID) behind torch's cuda:<torch_index>.

    torch numbers only the devices in CUDA_VISIBLE_DEVICES, in that order; NVML
    numbers all devices. Entries may be indices or (prefixes of) UUIDs.
    """
    if not visible:
        return torch_index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if torch_index >= len(entries):
        raise IndexError(f"cuda:{torch_index} is not among CUDA_VISIBLE_DEVICES={visible!r}")
    entry = entries[torch_index]
    return int(entry) if entry.isdigit() else entry


def _nvml_free_bytes(torch_index: int, pynvml=None) -> int:
    if pynvml is None:
        import pynvml
    pynvml.nvmlInit()
    try:
        which = _nvml_index(torch_index, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if isinstance(which, int):
            handle = pynvml.nvmlDeviceGetHandleByIndex(which)
        else:
            handle = _handle_by_uuid_prefix(pynvml, which)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
    finally:
        pynvml.nvmlShutdown()


def _handle_by_uuid_prefix(pynvml, prefix: str):
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        if uuid.startswith(prefix) or uuid.startswith("GPU-" + prefix.removeprefix("GPU-")):
            return handle
    raise LookupError(f"no NVML device has a UUID starting with {prefix!r}")


def cuda_free_bytes(device: torch.device, pynvml=None, cuda=torch.cuda) -> MemoryFacts:
    """Free bytes on a CUDA device, counting PyTorch's reserved-but-unallocated cache as usable.

    NVML and `torch.cuda.mem_get_info` should agree; the smaller one is used, so
    another process allocating between the two readings makes us more careful,
    not less. If NVML is missing or fails, `torch.cuda` alone is used, silently.
    """
    index = device.index if device.index is not None else cuda.current_device()
    cached = int(cuda.memory_reserved(index) - cuda.memory_allocated(index))
    torch_free = int(cuda.mem_get_info(index)[0])
    try:
        nvml_free = _nvml_free_bytes(index, pynvml)
    except Exception as exc:  # pynvml absent, no driver access, odd CUDA_VISIBLE_DEVICES
        logger.debug("pynvml unavailable (%s); using torch.cuda.mem_get_info", exc)
        return MemoryFacts(str(device), torch_free + cached, "torch.cuda.mem_get_info + PyTorch cache")
    return MemoryFacts(str(device), min(nvml_free, torch_free) + cached, "pynvml, checked against torch.cuda.mem_get_info, + PyTorch cache")


def untracked_reserve(device: torch.device) -> int:
    return CPU_WORKSPACE_RESERVE if device.type == "cpu" else 0


UNTRACKED_SHARE = 8
"""On the CPU, 1/8 of a budget (at most the reserve) is kept from every plan for memory no region sees.

NOTE: [Memory between the regions]
The chunk regions see the chunks; the plain evaluation's region sees the forward
pass. Between them, the process grows by what no region is asked about: the
safety net's reference VJP, the kernels' first-use buffers in the check, heap
fragments a chunk leaves. With wide_mlp (large) in a fresh process this was
1.5-2.5 MiB: nothing next to a default budget, 5-15% of one fifteen times
below the unchunked need (benchmarks/budget_sweep.py). Much of what a fresh
process adds is not data: RSS counts kernel code the first time it runs (a
process's first `w @ J` maps 3.0 MiB, its first elementwise comparison 2.3 MiB),
and the first chunk's backward kernels another ~2.8 MiB. A floor of 2 MiB on
this margin was tried and did not bring the 8.7 MiB case within budget (those
pages plus the result and the smallest plan exceed it), so the margin stays a
share of the budget.
"""


def untracked_margin(device: torch.device, budget_bytes: int) -> int:
    return min(CPU_WORKSPACE_RESERVE, budget_bytes // UNTRACKED_SHARE) if device.type == "cpu" else 0


def allocated_bytes(device: torch.device) -> int | None:
    """CUDA: the bytes PyTorch's allocator holds for tensors (and libraries' workspaces) now; None elsewhere."""
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None


def kept_by_libraries(device: torch.device, before: int | None, made: Sequence[object]) -> int:
    """CUDA: what stayed allocated since `before` beyond the tensors in `made` (which the caller holds).

    NOTE: [Workspaces a first backward keeps]
    On CUDA the backward pass runs in autograd's own device thread, whose cuBLAS handle allocates its workspace
    (32 MiB on Hopper) at its first matrix product, through PyTorch's allocator, and keeps it for the process's
    life. A fresh process's forward pass allocates the calling thread's workspace only: the first call's reference
    VJP is where the backward's appears, outside every measured region, and every chunk runs above it. Unnoticed,
    it put first calls 32 MiB over budgets of 139 and 208 MiB on an H200 (budget sweep, wide_mlp, the estimates
    low by exactly that); counted here, it is part of the plan's fixed memory. Allocator blocks are 512-byte
    multiples. Zero on the CPU, whose untracked margin covers the like (`untracked_margin`)."""
    if before is None:
        return 0
    torch.cuda.synchronize(device)
    own = 0
    for t in made:
        if isinstance(t, torch.Tensor):
            own += -(-t.untyped_storage().nbytes() // 512) * 512
    return max(0, int(torch.cuda.memory_allocated(device)) - before - own)


FREE_MEMORY_FRESH_SECONDS = 0.5
"""A reading of free memory is reused for this long: a first call should not pay 50-150 us for psutil or
NVML each time, and free memory read half a second ago is as good a basis for a default budget."""
_readings: dict[str, tuple[float, MemoryFacts]] = {}


def free_memory(device: torch.device) -> MemoryFacts:
    key = str(device)
    now = time.monotonic()
    cached = _readings.get(key)
    if cached is not None and now - cached[0] < FREE_MEMORY_FRESH_SECONDS:
        return cached[1]
    if device.type == "cuda":
        facts = cuda_free_bytes(device)
    else:
        if device.type != "cpu":
            logger.debug("no free-memory probe for device type %s; using host memory", device.type)
        facts = cpu_free_bytes()
    _readings[key] = (now, facts)
    return facts


@functools.lru_cache(maxsize=16)
def total_bytes(device: torch.device) -> int:
    """All the memory of the inputs' device (host memory for the CPU); it does not change, so it is read once."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory)
    return int(psutil.virtual_memory().total)


