"""Helpers shared by the model tests: golden cases, loading, working directory."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from conftest import GOLDEN_DIR


@lru_cache(maxsize=1)
def model_cases() -> dict:
    return json.loads((GOLDEN_DIR / "model_cases.json").read_text(encoding="utf-8"))


def case_by_id(case_id: str) -> dict:
    return next(c for c in model_cases()["cases"] if c["id"] == case_id)


def golden_array(relative: str) -> np.ndarray:
    return np.load(GOLDEN_DIR / relative)


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run with ``path`` as the working directory (image paths in prompts are relative to it)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def max_abs(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a = torch.as_tensor(np.asarray(a, dtype=np.float64))
    b = torch.as_tensor(np.asarray(b, dtype=np.float64))
    return float((a - b).abs().max())
