"""Plans kept in memory, keyed by what determines their cost (see NOTE: [Plans keyed by code])."""

from __future__ import annotations

import collections
import threading
from collections.abc import Hashable

from .entry import PlanEntry

CAPACITY = 512
"""Plans kept at most; the least recently used goes first (closures keyed by identity can make many)."""


class PlanCache:
    """A bounded, thread-safe map from plan keys to plan entries."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._entries: collections.OrderedDict[Hashable, PlanEntry] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> PlanEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: Hashable, entry: PlanEntry) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def items(self) -> list[tuple[Hashable, PlanEntry]]:
        with self._lock:
            return list(self._entries.items())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
