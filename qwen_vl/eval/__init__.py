"""Evaluation of Qwen-VL models on public benchmarks."""
