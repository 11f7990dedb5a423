"""Synthetic training and evaluation data: the "shapes world" (``qwen_vl.data.synthetic``)."""

from .synthetic import GENERATOR_VERSION, KINDS, LANGS, Sample, generate, make_sample

__all__ = ["GENERATOR_VERSION", "KINDS", "LANGS", "Sample", "generate", "make_sample"]
