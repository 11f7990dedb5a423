"""Print the largest absolute logits difference against the reference goldens for
every model case (float32, CPU), and whether greedy generation matches.

    python scripts/parity_report.py [GOLDEN_DIR]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

import qwen_vl


def main() -> None:
    golden = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "golden")
    golden = golden.resolve()
    model = qwen_vl.QWenLMHeadModel.from_pretrained(golden / "checkpoint", torch_dtype=torch.float32)
    cases = json.loads((golden / "model_cases.json").read_text(encoding="utf-8"))["cases"]
    os.chdir(golden)  # prompts name images relative to the golden folder
    print(f"{'case':24} {'tokens':>6} {'last-pos max|diff|':>19} {'all-pos max|diff| of max/lse':>29} greedy")
    for case in cases:
        ids = torch.tensor([case["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0].double()
        last = float((logits[-1] - torch.from_numpy(np.load(case["last_logits"]["file"])).double()).abs().max())
        pp = case["per_position"]
        per_pos = max(
            float((logits.max(-1).values - torch.tensor(pp["max"])).abs().max()),
            float((torch.logsumexp(logits, -1) - torch.tensor(pp["logsumexp"])).abs().max()),
        )
        expected = case.get("generate", {}).get("new_ids") or case.get("chat", {}).get("generated_ids")
        kwargs = {"stop_words_ids": case["chat"]["stop_words_ids_used"]} if "chat" in case else {}
        out = model.generate(ids, do_sample=False, max_new_tokens=16, **kwargs)[0, ids.shape[1] :].tolist()
        print(
            f"{case['id']:24} {case['seq_len']:6d} {last:19.2e} {per_pos:29.2e} {'equal' if out == expected else 'DIFFERENT'}"
        )


if __name__ == "__main__":
    main()
