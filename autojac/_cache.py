"""Plans (and what the safety net learnt) remembered per function, so that probing is paid once per input signature."""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Hashable
from typing import Any


class PlanCache:
    """Plans keyed weakly by the function's owner, then by signature and options.

    The owner is the function itself, or for a bound method the object it is
    bound to (a bound method is a new object at every attribute access). Owners
    that cannot be weakly referenced (builtins) are kept by a plain dict.
    """

    def __init__(self) -> None:
        self._weak: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._strong: dict = {}

    @staticmethod
    def _split(f: Callable) -> tuple[object, Hashable]:
        if isinstance(f, types.MethodType):  # not getattr: an nn.Module's __getattr__ is slow to fail
            return f.__self__, f.__func__
        return f, None

    def _table(self, owner: object, create: bool) -> dict | None:
        try:
            table = self._weak.get(owner)
            if table is None and create:
                table = self._weak[owner] = {}
        except TypeError:  # not weakly referenceable, or unhashable
            key = id(owner)
            entry = self._strong.get(key)
            if entry is None or entry[0] is not owner:
                if not create:
                    return None
                entry = self._strong[key] = (owner, {})
            table = entry[1]
        return table

    def get(self, f: Callable, key: Hashable) -> Any:
        owner, func = self._split(f)
        table = self._table(owner, create=False)
        return None if table is None else table.get((func, key))

    def put(self, f: Callable, key: Hashable, plan: Any) -> None:
        owner, func = self._split(f)
        table = self._table(owner, create=True)
        table[(func, key)] = plan

    def clear(self) -> None:
        self._weak = weakref.WeakKeyDictionary()
        self._strong.clear()
