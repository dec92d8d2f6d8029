"""Sizes in bytes: parsing `memory_budget` once into bytes, and printing byte counts."""

from __future__ import annotations

import re

from .errors import InputError, InputTypeError

DEFAULT_BUDGET_SHARE = 0.5
"""With `memory_budget=None`, a call may use this share of the device's free memory."""

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}


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
