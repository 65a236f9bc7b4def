"""Micro-benchmarks of the engine: a pytest-benchmark suite and an interleaved ratio report."""
