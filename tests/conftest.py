"""Shared fixtures: where the golden reference data lives."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_bench_script(name: str) -> ModuleType:
    """``bench/<name>.py`` imported as a module (the bench folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GOLDEN_DIR = Path(os.environ.get("QWEN_VL_GOLDEN", REPO_ROOT.parent / "shared" / "golden")).resolve()
CHECKPOINT_DIR = GOLDEN_DIR / "checkpoint"


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.fail(f"golden data not found at {GOLDEN_DIR} (set QWEN_VL_GOLDEN)")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def checkpoint_dir(golden_dir: Path) -> Path:
    return golden_dir / "checkpoint"


@pytest.fixture(scope="session")
def tokenizer(checkpoint_dir: Path):
    import qwen_vl

    return qwen_vl.QWenTokenizer.from_pretrained(checkpoint_dir)


@pytest.fixture(scope="session")
def fp32_model(checkpoint_dir: Path):
    import torch

    import qwen_vl

    return qwen_vl.QWenLMHeadModel.from_pretrained(checkpoint_dir, torch_dtype=torch.float32, device="cpu")
