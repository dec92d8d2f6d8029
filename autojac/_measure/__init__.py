"""Measuring: device memory facts, peak memory of a piece of work, and time."""
