"""Benchmark scripts (run as ``python -m benchmarks.NAME``); not imported by flowrl."""
