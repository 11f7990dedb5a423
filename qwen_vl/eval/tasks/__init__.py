"""Benchmark tasks: one module per family."""
