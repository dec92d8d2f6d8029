"""Memory facts: free bytes on the inputs' device, and parsing of `memory_budget`."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import psutil
import torch

from ._errors import InputError, InputTypeError

logger = logging.getLogger("autojac")

DEFAULT_BUDGET_SHARE = 0.5
"""With `memory_budget=None`, a call may use this share of the device's free memory."""

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

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}


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


def free_memory(device: torch.device) -> MemoryFacts:
    if device.type == "cuda":
        return cuda_free_bytes(device)
    if device.type != "cpu":
        logger.debug("no free-memory probe for device type %s; using host memory", device.type)
    return cpu_free_bytes()


_BUDGET_FORMS = "None, bytes (an int such as 2**30), a size string such as '512MiB' or '2GB', or a share of free memory as a float in (0, 1]"


def normalize_budget(budget: object, who: str = "jacobian") -> int | float | None:
    """Check `memory_budget` and turn it into bytes (int), a share of free memory (float), or None.

    Done once per call, before any work: every spelling of the same size gives
    the same int ("1 GiB", "1gib", 2**30), so it is also the plan cache's key.
    """
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise InputTypeError(f"{who}: `memory_budget` must be {_BUDGET_FORMS}, but got {budget!r}.")
    if isinstance(budget, int):
        if budget <= 0:
            raise InputError(f"{who}: `memory_budget` in bytes must be positive, but got {budget}. Pass e.g. 2**30 or '1GiB'.")
        return budget
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise InputError(f"{who}: a float `memory_budget` is a share of free memory and must be in (0, 1], but got {budget}. For bytes pass an int or a string such as '2GB'.")
        return budget
    if isinstance(budget, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", budget)
        unit = match and _UNITS.get(match.group(2).lower())
        if not match or unit is None:
            raise InputError(f"{who}: `memory_budget` string must be a number and a unit such as '512MiB', '2GB' or '1.5GiB', but got {budget!r}.")
        number = match.group(1)
        if not match.group(2) and "." in number:
            raise InputError(f"{who}: `memory_budget` string {budget!r} has no unit, and a fraction of a byte makes no sense. Add a unit ('{number}GiB'), or pass the float {number} for that share of free memory.")
        value = int(float(number) * unit)
        if value <= 0:
            raise InputError(f"{who}: `memory_budget` must be at least 1 byte, but {budget!r} is {float(number) * unit:g} bytes.")
        return value
    raise InputTypeError(f"{who}: `memory_budget` must be {_BUDGET_FORMS}, but got {type(budget).__name__}.")


def total_bytes(device: torch.device) -> int:
    """All the memory of the inputs' device (host memory for the CPU)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory)
    return int(psutil.virtual_memory().total)


def parse_budget(budget: object, free_bytes: int, who: str = "jacobian", total: int | None = None) -> int:
    """Bytes the call may use: None (half of free), bytes, a size string, or a share of free memory.

    With `total` (the device's whole memory), a budget above it is refused: it
    cannot be what the caller meant.
    """
    budget = normalize_budget(budget, who)
    if budget is None:
        return int(free_bytes * DEFAULT_BUDGET_SHARE)
    if isinstance(budget, float):
        return int(free_bytes * budget)
    if total is not None and budget > total:
        raise InputError(f"{who}: `memory_budget` is {format_bytes(budget)}, but the device has only {format_bytes(total)} in all. Pass a smaller budget, or None for half of the free memory.")
    return budget


def format_bytes(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"
