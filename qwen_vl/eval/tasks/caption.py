"""Captioning: NoCaps val and Flickr30K Karpathy test, scored by CIDEr-D (x100).

Files expected (as the benchmarks distribute them):

* NoCaps val: ``nocaps_val_4500_captions.json`` (COCO captions format: ``images`` with ``id``,
  ``file_name``, ``domain``; ``annotations`` with ``image_id``, ``caption``); images
  ``<image_root>/<file_name>``, ``image_root`` defaulting to the file's folder. Scores are given
  overall and per domain (in-, near-, out-domain), each over its own images.
* Flickr30K Karpathy test: Karpathy's ``dataset_flickr30k.json`` (``images`` with ``filename``,
  ``imgid``, ``split``, ``sentences[].raw``; the 1000 ``"test"`` images); images
  ``<image_root>/<filename>``, ``image_root`` defaulting to ``flickr30k-images/`` beside the file.

Qwen-VL's converted files (``nocaps_val.json``, ``flickr30k_karpathy_test.json``: COCO format
whose images name their file in ``image``) are read too, by either task: a document with an
``annotations`` list is read as COCO captions.

Prompts: base ``<img>{image}</img>Describe the image in English:`` (Qwen-VL's
``evaluate_caption.py``); chat ``Picture 1: <img>{image}</img>\\nDescribe the image in one sentence.``
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...finetune.records import DataError
from ..metrics.cider import cider_d
from .base import EvalItem, PromptStyle, ReadResult, Task
from .general_vqa import check_predictions
from .reading import Entry, collect, field, image_file, json_document, json_entries, percent, record_id

CHAT_REQUEST = "Describe the image in one sentence."


def read_coco_captions(data: Path, root: Path, skip_bad: bool) -> ReadResult:
    """Items of a COCO-format captions file: one per entry of ``images`` (its file in
    ``file_name`` or ``image``), the target its captions from ``annotations``."""
    captions: dict[str, list[str]] = {}
    errors: list[DataError] = []
    for entry in json_entries(data, "annotations"):
        try:
            rid = record_id(entry, "image_id")
            captions.setdefault(rid, []).append(field(entry, "caption", str, rid))
        except DataError as error:
            if not skip_bad:
                raise
            errors.append(error)

    def build(entry: Entry) -> EvalItem:
        rid = record_id(entry, "id")
        name = "file_name" if isinstance(entry.value, dict) and "file_name" in entry.value else "image"
        path = image_file(entry, name, root, rid)
        if rid not in captions:
            raise entry.error("id", f"no caption in 'annotations' for this image in {data}", rid)
        meta = {"domain": entry.value["domain"]} if "domain" in entry.value else {}
        return EvalItem(rid, [path], "", captions[rid], meta=meta, source=f"{entry.file}:{entry.line}")

    result = collect(json_entries(data, "images"), build, skip_bad)
    result.errors[:0] = errors
    return result


class NoCapsVal(Task):
    """NoCaps val (see the module docstring for the files); CIDEr overall and per domain."""

    name = "nocaps-val"
    family = "caption"
    metric = "cider"
    max_new_tokens = 30

    def read(self, data: Path, image_root: Path | None = None, skip_bad: bool = False) -> ReadResult:
        data = Path(data)
        return read_coco_captions(data, Path(image_root) if image_root is not None else data.parent, skip_bad)

    def prompt(self, item: EvalItem, style: PromptStyle) -> str:
        if style == "base":
            return f"<img>{item.images[0]}</img>Describe the image in English:"
        if style == "chat":
            return f"Picture 1: <img>{item.images[0]}</img>\n{CHAT_REQUEST}"
        raise ValueError(f"prompt style must be 'base' or 'chat', got {style!r}")

    def score(self, items: Sequence[EvalItem], predictions: Sequence[Any], mode: str = "canonical") -> dict[str, Any]:
        """CIDEr-D x 100 (both modes: Qwen-VL also uses pycocoevalcap), and per ``meta["domain"]``."""
        preds = check_predictions(items, predictions, mode)
        out: dict[str, Any] = {self.metric: _cider(items, preds), "count": len(items)}
        domains = sorted({str(item.meta["domain"]) for item in items if "domain" in item.meta})
        for domain in domains:
            chosen = [(i, p) for i, p in zip(items, preds) if str(i.meta.get("domain")) == domain]
            out[f"{self.metric}[{domain}]"] = _cider([i for i, _ in chosen], [p for _, p in chosen])
        return out


def _cider(items: Sequence[EvalItem], predictions: Sequence[str]) -> float:
    if not items:
        return 0.0
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError("caption items must have distinct ids")
    scores = cider_d(dict(zip(ids, predictions)), {item.id: item.target for item in items})
    return percent(scores.mean)


class Flickr30KTest(NoCapsVal):
    """Flickr30K Karpathy test (see the module docstring for the files); CIDEr."""

    name = "flickr30k-test"

    def read(self, data: Path, image_root: Path | None = None, skip_bad: bool = False) -> ReadResult:
        data = Path(data)
        document, _ = json_document(data)
        if isinstance(document, dict) and "annotations" in document:
            return read_coco_captions(data, Path(image_root) if image_root is not None else data.parent, skip_bad)
        root = Path(image_root) if image_root is not None else data.parent / "flickr30k-images"

        def build(entry: Entry) -> EvalItem | None:
            rid = record_id(entry, "imgid")
            if field(entry, "split", str, rid) != "test":
                return None
            sentences = field(entry, "sentences", list, rid)
            refs = []
            for i, sentence in enumerate(sentences):
                if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
                    raise entry.error(f"sentences[{i}].raw", "expected an object with a string 'raw'", rid)
                refs.append(sentence["raw"])
            if not refs:
                raise entry.error("sentences", "empty list", rid)
            path = image_file(entry, "filename", root, rid)
            return EvalItem(rid, [path], "", refs, source=f"{entry.file}:{entry.line}")

        return collect(json_entries(data, "images"), build, skip_bad)


TASKS: dict[str, type[Task]] = {task.name: task for task in (NoCapsVal, Flickr30KTest)}
