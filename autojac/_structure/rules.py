"""Imports every rule module so that their `@rule` registrations fill the table in `registry`."""

from . import fallback, linear, movement, normalization, pointwise, reductions, scatter, windows  # noqa: F401
