"""Benchmarks are opt-in: they run with `pytest benchmarks/` (pytest-benchmark), never in the test suite."""
