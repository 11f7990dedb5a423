"""The synthetic "shapes world" data set: scenes, pictures and conversations with exact truth.

``generate(out_dir, n, seed)`` writes ``n`` records:

* ``images/NNNNNN.png`` (and ``NNNNNN_b.png``, the second picture of a ``difference`` record);
* ``data.json``: the conversations in the official fine-tuning format, answers with their
  ``regions`` (where in the pictures their facts are);
* ``truth.jsonl``: per record its kind, language, pictures, scenes, turns (question, answer,
  structured target);
* ``manifest.json``: seed, n, kinds, languages, generator version, counts per kind and language.

Record ``i`` depends only on the seed, ``i``, the kinds and the languages (its own random
generator is seeded from ``seed`` and ``i``), so it is the same whatever ``n`` is, and the
same files come out byte for byte on every run. Kinds and languages take turns: record
``i`` is of kind ``kinds[i % len(kinds)]`` in language ``langs[(i // len(kinds)) % len(langs)]``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import random
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..model.saving import atomic_write
from .conversations import KINDS, LANGS, SINGLE_IMAGE_KINDS, Turn, difference_turn, make_turn, multiturn
from .regions import answer_regions
from .scenes import Scene, change_scene, render_scene, sample_scene

GENERATOR = "qwen-vl shapes world"
GENERATOR_VERSION = 3  # 2: answers carry their regions; 3: pictures at most 1.25:1, longer rectangles
DEFAULT_TURNS = (2, 3)  # questions in a multiturn record
IMAGE_DIR = "images"
#: zlib level of the PNG files (fast; the "Up" filter keeps flat scenes small anyway).
PNG_COMPRESS_LEVEL = 1
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHUNK = 64


def record_seed(seed: int, index: int) -> int:
    """The seed of record ``index`` of a run with ``seed`` (a 64-bit hash of both)."""
    digest = hashlib.sha256(f"qwen-vl-synthetic/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def kind_and_lang(index: int, kinds: Sequence[str], langs: Sequence[str]) -> tuple[str, str]:
    """The kind and the language of record ``index`` (they take turns)."""
    return kinds[index % len(kinds)], langs[(index // len(kinds)) % len(langs)]


@dataclass(frozen=True)
class Sample:
    """One record: its scenes (two for ``difference``), its turns and, for ``difference``, the change."""

    id: str
    index: int
    kind: str
    lang: str
    scenes: tuple[Scene, ...]
    turns: tuple[Turn, ...]
    change: dict[str, Any] | None = None

    @property
    def images(self) -> list[str]:
        """Picture paths relative to the output folder, in prompt order."""
        names = [f"{self.index:06d}.png", f"{self.index:06d}_b.png"][: len(self.scenes)]
        return [f"{IMAGE_DIR}/{name}" for name in names]

    def record(self) -> dict[str, Any]:
        """The record in the official fine-tuning format; answers carry their ``regions``
        (``qwen_vl.data.regions``), which ``finetune --look-loss-weight`` trains on."""
        pictures = "".join(f"Picture {k}: <img>{path}</img>\n" for k, path in enumerate(self.images, start=1))
        conversations = []
        for t, turn in enumerate(self.turns):
            conversations.append({"from": "user", "value": (pictures if t == 0 else "") + turn.question})
            answer: dict[str, Any] = {"from": "assistant", "value": turn.answer}
            regions = answer_regions(turn, self.scenes, self.lang)
            if regions:
                answer["regions"] = regions
            conversations.append(answer)
        return {"id": self.id, "conversations": conversations}

    def truth(self) -> dict[str, Any]:
        """The ground truth of the record (one line of ``truth.jsonl``)."""
        out = {
            "id": self.id,
            "kind": self.kind,
            "lang": self.lang,
            "images": self.images,
            "scenes": [s.to_json() for s in self.scenes],
            "turns": [t.to_json() for t in self.turns],
        }
        if self.change is not None:
            out["difference"] = self.change
        return out


def make_sample(
    seed: int,
    index: int,
    kinds: Sequence[str] = KINDS,
    langs: Sequence[str] = LANGS,
    turns: tuple[int, int] = DEFAULT_TURNS,
) -> Sample:
    """Record ``index`` of a run with ``seed`` (scenes are drawn again until the kind fits);
    ``turns`` bounds the number of questions of a ``multiturn`` record."""
    _check(kinds, langs, turns)
    kind, lang = kind_and_lang(index, kinds, langs)
    rng = random.Random(record_seed(seed, index))
    record_id = f"synth-{seed}-{index:06d}"
    while True:
        scene = sample_scene(rng, words=True if kind == "ocr" else None)
        if kind == "difference":
            changed = change_scene(scene, rng)
            if changed is not None:
                second, change = changed
                turn = difference_turn(change, lang)
                return Sample(record_id, index, kind, lang, (scene, second), (turn,), change)
            continue
        asked = multiturn(scene, lang, rng, turns) if kind == "multiturn" else [make_turn(kind, scene, lang, rng)]
        if asked and all(t is not None for t in asked):
            return Sample(record_id, index, kind, lang, (scene,), tuple(asked))  # type: ignore[arg-type]


def _check(kinds: Sequence[str], langs: Sequence[str], turns: tuple[int, int] = DEFAULT_TURNS) -> None:
    low, high = turns
    if not 1 <= low <= high <= len(SINGLE_IMAGE_KINDS):
        raise ValueError(f"turns must satisfy 1 <= min <= max <= {len(SINGLE_IMAGE_KINDS)}, got {low}-{high}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown kind(s) {', '.join(unknown) or '(none given)'}; kinds: {', '.join(KINDS)}")
    unknown = [lang for lang in langs if lang not in LANGS]
    if unknown or not langs:
        raise ValueError(f"unknown language(s) {', '.join(unknown) or '(none given)'}; languages: {', '.join(LANGS)}")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(image: Image.Image) -> bytes:
    """An RGB image as a PNG file: every row "Up"-filtered, one zlib stream. Three times
    faster than Pillow's encoder, which tries five filters per row; same pixels."""
    pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    height, width, _ = pixels.shape
    rows = pixels.reshape(height, width * 3)  # (H, 3W)
    filtered = np.empty((height, width * 3 + 1), dtype=np.uint8)  # (H, 1 + 3W): filter byte + row
    filtered[:, 0] = 2  # "Up": each byte minus the one above it (mod 256)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    data = zlib.compress(filtered.tobytes(), PNG_COMPRESS_LEVEL)
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def save_png(image: Image.Image, path: Path) -> None:
    """Write ``image`` as a PNG file, atomically."""
    write_atomic(path, png_bytes(image))


def _write_sample(
    out_dir: Path, seed: int, index: int, kinds: Sequence[str], langs: Sequence[str], turns: tuple[int, int]
) -> Sample:
    sample = make_sample(seed, index, kinds, langs, turns)
    for scene, path in zip(sample.scenes, sample.images):
        save_png(render_scene(scene), out_dir / path)
    return sample


def _write_chunk(
    job: tuple[str, int, int, int, tuple[str, ...], tuple[str, ...], tuple[int, int]],
) -> list[tuple[str, str, str, str]]:
    """Records ``start..stop-1`` written; ``(kind, lang, record json, truth json)`` of each."""
    out_dir, seed, start, stop, kinds, langs, turns = job
    rows = []
    for index in range(start, stop):
        sample = _write_sample(Path(out_dir), seed, index, kinds, langs, turns)
        record = json.dumps(sample.record(), ensure_ascii=False)
        truth = json.dumps(sample.truth(), ensure_ascii=False)
        rows.append((sample.kind, sample.lang, record, truth))
    return rows


def _chunks(
    out_dir: Path,
    seed: int,
    n: int,
    kinds: tuple[str, ...],
    langs: tuple[str, ...],
    turns: tuple[int, int],
    workers: int,
) -> Iterator[list[tuple[str, str, str, str]]]:
    jobs = [(str(out_dir), seed, s, min(s + _CHUNK, n), kinds, langs, turns) for s in range(0, n, _CHUNK)]
    if workers <= 1 or len(jobs) == 1:
        yield from map(_write_chunk, jobs)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with context.Pool(workers) as pool:
        yield from pool.imap(_write_chunk, jobs)


def generate(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    *,
    kinds: Sequence[str] = KINDS,
    langs: Sequence[str] = LANGS,
    turns: tuple[int, int] = DEFAULT_TURNS,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write ``n`` records of the shapes world into ``out_dir`` (see the module docstring) and
    return the manifest. ``workers`` processes draw and encode the pictures (same files for
    any number); ``progress(done)`` is called as records are written."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    kinds, langs = tuple(dict.fromkeys(kinds)), tuple(dict.fromkeys(langs))
    turns = (int(turns[0]), int(turns[1]))
    _check(kinds, langs, turns)
    out = Path(out_dir)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    records: list[str] = []
    truths: list[str] = []
    counts: dict[str, dict[str, int]] = {k: dict.fromkeys(langs, 0) for k in kinds}
    for rows in _chunks(out, seed, n, kinds, langs, turns, workers):
        for kind, lang, record, truth in rows:
            counts[kind][lang] += 1
            records.append(record)
            truths.append(truth)
        if progress is not None:
            progress(len(records))
    write_atomic(out / "data.json", ("[\n" + ",\n".join(records) + "\n]\n").encode())
    write_atomic(out / "truth.jsonl", ("\n".join(truths) + "\n").encode())
    manifest = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n": n,
        "kinds": list(kinds),
        "langs": list(langs),
        "multiturn_turns": list(turns),
        "images": n + sum(counts.get("difference", {}).values()),
        "counts": counts,
    }
    write_atomic(out / "manifest.json", (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
    return manifest


__all__ = [
    "GENERATOR_VERSION",
    "KINDS",
    "LANGS",
    "SINGLE_IMAGE_KINDS",
    "Sample",
    "generate",
    "kind_and_lang",
    "make_sample",
    "record_seed",
]
