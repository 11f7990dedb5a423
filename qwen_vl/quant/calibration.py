"""Calibration samples for GPTQ: conversations in the official fine-tuning format.

``DATA`` is a JSON / JSONL data file (``qwen-vl finetune``'s format) or a folder
written by ``qwen-vl synth`` (its ``data.json``). Each sample is one conversation
laid out exactly as in training (``finetune.supervised``: ChatML with the system
prompt, every turn), cut after the last whole user/assistant pair that fits in
``max_length`` tokens, with its pictures preprocessed for the vision tower, so the
decoder is calibrated on the activations it sees in use, image features included.

Samples are drawn with a seeded shuffle, so a large data set costs only the
records taken; a record that cannot be used (a turn the tokenizer refuses, a
picture that cannot be opened, a first pair longer than ``max_length``) is
skipped and the next one taken.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..chat import DEFAULT_SYSTEM
from ..finetune.records import Record, read_records
from ..finetune.supervised import TurnEncodingError, encode_conversation, fit_length
from ..finetune.validation import scan_tags
from ..images import ImageLoadError, ImagePolicy, image_transform, load_image
from ..tokenizer import QWenTokenizer

SYNTH_DATA = "data.json"


class CalibrationError(ValueError):
    """The calibration data cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class CalibrationSample:
    input_ids: torch.Tensor  # (1, T) long
    images: list[torch.Tensor] | None  # (3, S, S) each, in <img> span order
    source: str  # "file:line (record id)"

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def calibration_file(data: str | Path) -> Path:
    """The data file of ``data``: the file itself, or a synth folder's ``data.json``."""
    path = Path(data)
    if path.is_dir():
        inner = path / SYNTH_DATA
        if not inner.is_file():
            raise CalibrationError(f"calibration folder {path} has no {SYNTH_DATA} (expected a 'qwen-vl synth' folder)")
        return inner
    if not path.is_file():
        raise FileNotFoundError(f"calibration data {path}: no such file or folder")
    return path


def _sample(
    record: Record,
    tokenizer: QWenTokenizer,
    system: str,
    max_length: int,
    root: Path,
    policy: ImagePolicy,
    image_size: int,
) -> CalibrationSample:
    """``record`` as a sample; raises ``ValueError`` naming its problem."""
    system = record.system if record.system is not None else system
    pairs = record.pairs()
    try:
        full = encode_conversation(tokenizer, pairs, system)
    except TurnEncodingError as e:
        raise ValueError(f"turn {e.turn}: {e}") from None
    encoded = fit_length(full, max_length, "truncate")
    if encoded is None:
        raise ValueError(f"its first user/assistant pair is {full.turn_ends[0]} tokens, over --max-length {max_length}")
    kept = len(encoded.turn_ends)
    texts = [system] + [text for pair in pairs[:kept] for text in pair]
    images: list[torch.Tensor] = []
    for text in texts:
        paths, problems = scan_tags(text, tokenizer)
        if problems:
            raise ValueError(problems[0])
        for written in paths:
            full_path = Path(written) if Path(written).is_absolute() else root / written
            try:
                images.append(image_transform(load_image(full_path, policy), image_size))
            except ImageLoadError as e:
                raise ValueError(f"image {written!r}: {e.reason}") from None
    ids = torch.tensor([encoded.input_ids], dtype=torch.long)  # (1, T)
    return CalibrationSample(ids, images or None, f"{record.file}:{record.line} (record {record.id!r})")


def load_calibration(
    data: str | Path,
    tokenizer: QWenTokenizer,
    image_size: int,
    *,
    samples: int = 128,
    max_length: int = 2048,
    image_root: str | Path | None = None,
    system: str = DEFAULT_SYSTEM,
    seed: int = 0,
) -> list[CalibrationSample]:
    """Up to ``samples`` calibration samples from ``data`` (fewer when it holds fewer usable
    records). Pictures resolve against ``image_root`` (default: the data file's folder),
    the only folder they may be read from."""
    if samples < 1:
        raise CalibrationError(f"--calib-samples must be at least 1, got {samples}")
    if max_length < 1:
        raise CalibrationError(f"--max-length must be at least 1, got {max_length}")
    path = calibration_file(data)
    records, errors = read_records(path)
    if not records:
        first = f": {errors[0]}" if errors else ""
        raise CalibrationError(f"calibration data {path} holds no usable conversation record{first}")
    root = Path(image_root if image_root is not None else path.parent).resolve()
    policy = ImagePolicy(allowed_roots=(root,))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    taken: list[CalibrationSample] = []
    skipped: list[str] = []
    for i in order:
        if len(taken) == samples:
            break
        try:
            taken.append(_sample(records[i], tokenizer, system, max_length, root, policy, image_size))
        except ValueError as e:
            skipped.append(f"{records[i].file}:{records[i].line} (record {records[i].id!r}): {e}")
    if not taken:
        raise CalibrationError(f"no record of {path} can be used for calibration; first problem: {skipped[0]}")
    return taken
