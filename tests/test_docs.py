"""Every ``python`` example in README.md, docs/model.md, docs/engine.md, docs/finetune.md and docs/eval.md runs (from the repository root)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

DOCS = [
    REPO_ROOT / "README.md",
    *(REPO_ROOT / "docs" / name for name in ("model.md", "engine.md", "finetune.md", "eval.md", "synthetic.md")),
]
EXAMPLES = [
    (doc, i, block)
    for doc in DOCS
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), re.S))
]


@pytest.mark.parametrize("doc, index, code", EXAMPLES, ids=[f"{d.name}-{i}" for d, i, _ in EXAMPLES])
def test_example_runs(doc: Path, index: int, code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{doc.name} example {index} failed:\n{result.stderr[-3000:]}"
