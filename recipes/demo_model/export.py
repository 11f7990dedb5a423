"""Put a trained demo model into the package: its weights in bfloat16 as
``model.safetensors`` (under 50 MB) and its held-out scores as ``quality.json``.

    python recipes/demo_model/export.py RUN_FINAL_DIR PACKAGE_DEMO_DIR EVAL_DIR
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import qwen_vl
from qwen_vl.model.saving import atomic_write, save_checkpoint

#: The quality bars the demo model must meet on held-out scenes (percent).
BARS = {
    "grounding_acc@0.5": 90.0,
    "colour_acc": 95.0,
    "shape_acc": 95.0,
    "count_acc": 90.0,
    "ocr_exact": 90.0,
    "caption_exact_set": 80.0,
    "difference_acc": 80.0,
}
MAX_EN_ZH_GAP = 5.0


def main(final: Path, package_dir: Path, eval_dir: Path) -> int:
    model = qwen_vl.QWenLMHeadModel.from_pretrained(final, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory(dir=package_dir) as tmp:
        (written,) = save_checkpoint(model, Path(tmp), safe_serialization=True, max_shard_bytes=2**40)
        shutil.move(str(written), package_dir / "model.safetensors")  # same file system: a rename
    scores = eval_dir / "synthetic" / "metrics.json"
    metrics = json.loads(scores.read_text(encoding="utf-8")).get("metrics")
    if not isinstance(metrics, dict):
        raise SystemExit(f"{scores}: no 'metrics' object (write it with qwen-vl eval --task synthetic)")
    checks = {k: {"value": metrics.get(k), "bar": bar, "met": (metrics.get(k) or 0) >= bar} for k, bar in BARS.items()}
    gap = metrics.get("en_zh_gap")
    checks["en_zh_gap"] = {"value": gap, "bar": MAX_EN_ZH_GAP, "met": gap is not None and abs(gap) <= MAX_EN_ZH_GAP}
    quality = {"metrics": metrics, "bars": checks, "all_met": all(c["met"] for c in checks.values())}
    text = json.dumps(quality, indent=2, ensure_ascii=False) + "\n"
    atomic_write(package_dir / "quality.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    size = (package_dir / "model.safetensors").stat().st_size
    print(f"model.safetensors: {size / 1e6:.1f} MB; bars met: {quality['all_met']}")
    for name, check in checks.items():
        print(f"  {name}: {check['value']} (bar {check['bar']}) {'ok' if check['met'] else 'MISSED'}")
    return 0 if size <= 50_000_000 else 1


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    raise SystemExit(main(*(Path(a) for a in sys.argv[1:])))
