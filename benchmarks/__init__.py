"""Benchmark scripts, run as ``python -m benchmarks.NAME``; their shared code is ``benchmarks.harness``."""
