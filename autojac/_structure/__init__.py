"""Structured Jacobians: sparsity detection, colouring, and compressed evaluation seeds with one-gather decompression."""

from .coloring import Coloring, color_columns, color_rows, color_symmetric
from .compress import Decompressor, seeds
from .detect import detect
from .pattern import Pattern

__all__ = ["Coloring", "Decompressor", "Pattern", "color_columns", "color_rows", "color_symmetric", "detect", "seeds"]
