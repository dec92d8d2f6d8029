"""The exceptions autojac raises; each also subclasses the matching builtin."""

from __future__ import annotations


class AutojacError(Exception):
    """Base class of every error autojac raises on purpose."""


class InputError(AutojacError, ValueError):
    """An argument has the right type but a value autojac cannot use."""


class InputTypeError(AutojacError, TypeError):
    """An argument, or what `f` returned, has a type autojac cannot use."""


class UnsupportedFunctionError(AutojacError, TypeError):
    """The function cannot be differentiated by the requested method.

    The original exception is chained as ``__cause__``; the message names the
    method that failed and the methods to try instead.
    """


class NotBatchAwareError(UnsupportedFunctionError):
    """`vectorize="repeat"` needs `f` to treat a leading dimension as a batch."""


class StrictError(AutojacError, RuntimeError):
    """`strict=True` and an output does not depend on an input."""


class MemoryBudgetError(AutojacError, MemoryError):
    """Not even the smallest plan fits in the memory budget."""


class PlanMismatchError(AutojacError, ValueError):
    """A plan was reused for a call whose inputs differ from the planned ones."""
