"""Does a shapes-world model read the picture? Teacher-forced answer choice on held-out scenes.

For every single-question held-out record of a kind with a closed set of answers (colour,
shape, position, count, yes/no, identify), the model picks, among the distinct answers of
that kind and language in the folder (the most common 12), the one it gives the lowest
loss, once with the record's own picture and once with another record's. A model that
reads the picture is right far more often with its own; one that answers from the
question alone scores the same with either. Faster and finer than generation: it shows
whether the picture is used before the answers come out right.

    python recipes/demo_model/picture_check.py MODEL HELDOUT_DIR [--per-kind N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import torch

import qwen_vl
from qwen_vl.chat_format import make_context
from qwen_vl.eval.likelihood import option_losses
from qwen_vl.images import ImagePolicy
from qwen_vl.model.saving import atomic_write

KINDS = ("colour", "shape", "position", "count", "yesno", "identify")
MAX_OPTIONS = 12
SYSTEM = "You are a helpful assistant."


def closed_questions(folder: Path) -> dict[tuple[str, str], list[dict]]:
    """Single-question records of ``folder/truth.jsonl`` by (kind, language), in file order."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    with (folder / "truth.jsonl").open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                kind, lang, turns = record["kind"], record["lang"], record["turns"]
            except (ValueError, KeyError) as exc:
                raise SystemExit(f"{folder / 'truth.jsonl'}:{number}: not a shapes-world record ({exc})") from None
            if kind in KINDS and len(turns) == 1 and len(record["images"]) == 1:
                groups[(kind, lang)].append(record)
    return groups


def check(model, tokenizer, folder: Path, per_kind: int = 30) -> list[dict]:
    """One row per (kind, language): questions scored, % right with their own picture and with another's."""
    rows = []
    for (kind, lang), records in sorted(closed_questions(folder).items()):
        counts = Counter(r["turns"][0]["answer"] for r in records)
        answers = [a for a, _ in counts.most_common(MAX_OPTIONS)]
        options = [tokenizer.encode(a) + [tokenizer.im_end_id] for a in answers]
        right = {"own": 0, "other": 0}
        asked = [(k, r) for k, r in enumerate(records) if r["turns"][0]["answer"] in answers][:per_kind]
        for k, record in asked:
            other = records[(k + len(records) // 2) % len(records)]
            for which, shown in (("own", record), ("other", other)):
                query = f"Picture 1: <img>{folder / shown['images'][0]}</img>\n{record['turns'][0]['question']}"
                _, context = make_context(tokenizer, query, system=SYSTEM)
                losses = option_losses(model, context, options)
                right[which] += answers[losses.index(min(losses))] == record["turns"][0]["answer"]
        n = len(asked)
        rows.append(
            {
                "kind": kind,
                "lang": lang,
                "questions": n,
                "options": len(answers),
                "own_picture": round(100 * right["own"] / n, 1) if n else None,
                "other_picture": round(100 * right["other"] / n, 1) if n else None,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="checkpoint folder")
    parser.add_argument("heldout", type=Path, help="a `qwen-vl synth` folder of scenes not trained on")
    parser.add_argument("--per-kind", type=int, default=30, help="questions per kind and language (default 30)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if not (args.heldout / "truth.jsonl").is_file():
        raise SystemExit(f"{args.heldout}: no truth.jsonl (make the folder with `qwen-vl synth`)")
    model = qwen_vl.QWenLMHeadModel.from_pretrained(args.model, dtype=torch.float32).eval()
    model.image_policy = ImagePolicy(allowed_roots=(str(args.heldout.resolve()),))
    tokenizer = qwen_vl.QWenTokenizer.from_pretrained(args.model)
    rows = check(model, tokenizer, args.heldout, args.per_kind)
    print(f"{'kind':<9} {'lang':<4} {'n':>4} {'options':>7} {'own picture':>11} {'other picture':>13}")
    for r in rows:
        print(
            f"{r['kind']:<9} {r['lang']:<4} {r['questions']:>4} {r['options']:>7} "
            f"{r['own_picture']!s:>10}% {r['other_picture']!s:>12}%"
        )
    if args.out:
        atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
