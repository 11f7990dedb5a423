"""Benchmark scoring functions, each in a canonical mode and a mode that reproduces Qwen-VL's scripts."""
