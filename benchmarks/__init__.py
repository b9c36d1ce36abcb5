"""Benchmarks: timing scripts runnable as `python -m benchmarks.NAME`."""
