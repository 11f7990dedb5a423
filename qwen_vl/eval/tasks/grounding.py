"""Referring-expression grounding: RefCOCO, RefCOCO+ and RefCOCOg -> Acc@0.5.

Files expected (``data``), either:

* the REFER folder of one dataset as its authors distribute it: ``refcoco/``,
  ``refcoco+/`` (both ``refs(unc).p``) or ``refcocog/`` (``refs(umd).p``, the umd split),
  each with its ``instances.json``; images are COCO train2014 files
  (``COCO_train2014_000000581857.jpg``) under ``image_root``, by default REFER's
  ``<data>/../images/mscoco/images/train2014``. One item per referring sentence of the
  task's split; the target is the annotation's box (``[x, y, w, h]`` -> ``(x1, y1, x2, y2)``).
  The ``refs(...).p`` pickle is read with an unpickler that resolves only plain
  builtin types (``dict``, ``list``, ``set``, ...); any other class or function in
  the file is refused, so a crafted pickle cannot run code.
* a ``.jsonl`` file of Qwen-VL's evaluation (``refcoco_val.jsonl`` ...): one object per
  line with ``image``, ``sent``, ``bbox`` (pixels, ``[x1, y1, x2, y2]``), ``width``,
  ``height``; relative image paths resolve against ``image_root`` (default: the
  file's folder).

Prompts: base ``<img>{image}</img><ref>{expression}</ref><box>`` (Qwen-VL's evaluation,
28 new tokens); chat ``Picture 1: <img>{image}</img>`` followed by a request for the
box of the expression. The reply's first box (0-1000 units) is mapped to pixels by
``qwen_vl.eval.metrics.boxes`` (``/1000`` canonical, ``/999`` in ``"qwen"`` mode).
"""

from __future__ import annotations

import builtins
import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...finetune.records import DataError
from ..metrics.boxes import grounding_accuracy
from .base import EvalItem, PromptStyle, ReadResult, Task
from .reading import Entry, collect, field, image_file, json_entries, jsonl_entries, percent

#: Dataset -> the REFER split file read for it.
SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
#: REFER's image folder relative to a dataset folder.
DEFAULT_IMAGE_DIR = Path("..") / "images" / "mscoco" / "images" / "train2014"
_SAFE_BUILTINS = frozenset(
    {"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "bool", "complex"}
)


class _BuiltinsOnly(pickle.Unpickler):
    """Resolves only plain builtin container and scalar types."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain builtin types are allowed")


def load_refs(path: Path) -> list[dict[str, Any]]:
    """The list of refs of a REFER ``refs(...).p`` file, read without resolving any non-builtin class."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(str(path), None, None, "", "file not found") from None
    try:
        refs = _BuiltinsOnly(io.BytesIO(data), encoding="utf-8").load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a data error
        raise DataError(str(path), None, None, "", f"cannot read pickle: {e}") from None
    if not isinstance(refs, list):
        raise DataError(str(path), None, None, "", f"expected a list of refs, got {type(refs).__name__}")
    return refs


def _field(record: dict[str, Any], name: str, file: str, rid: Any, index: int) -> Any:
    if name not in record:
        raise DataError(file, None, rid, name, "missing field", index=index)
    return record[name]


class GroundingTask(Task):
    """One split of RefCOCO, RefCOCO+ or RefCOCOg (see the module docstring for the files)."""

    family = "grounding"
    metric = "acc@0.5"
    max_new_tokens = 28
    dataset: str = ""
    split: str = ""

    def read(self, data: Path, image_root: Path | None = None, skip_bad: bool = False) -> ReadResult:
        data = Path(data)
        if data.suffix == ".jsonl":
            return self._read_jsonl(data, image_root, skip_bad)
        return self._read_refer(data, image_root, skip_bad)

    def _read_jsonl(self, path: Path, image_root: Path | None, skip_bad: bool) -> ReadResult:
        root = Path(image_root) if image_root is not None else path.parent
        return collect(jsonl_entries(path), lambda entry: self._jsonl_item(entry, root), skip_bad)

    def _jsonl_item(self, entry: Entry, root: Path) -> EvalItem:
        raw = entry.value if isinstance(entry.value, dict) else {}
        rid = next((raw[k] for k in ("sent_id", "id", "question_id") if isinstance(raw.get(k), (str, int))), None)
        sentence = field(entry, "sent", str, rid)
        bbox = field(entry, "bbox", list, rid)
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
            raise entry.error("bbox", f"expected 4 numbers [x1, y1, x2, y2], got {bbox!r}", rid)
        size = [field(entry, name, (int, float), rid) for name in ("width", "height")]
        for name, value in zip(("width", "height"), size):
            if value <= 0:
                raise entry.error(name, f"expected a positive number, got {value!r}", rid)
        image = image_file(entry, "image", root, rid)
        return EvalItem(
            id=str(rid) if rid is not None else f"{Path(entry.file).stem}:{entry.line}",
            images=[image],
            question=sentence,
            target=tuple(float(v) for v in bbox),
            meta={"width": float(size[0]), "height": float(size[1])},
            source=f"{entry.file}:{entry.line}",
        )

    def _read_refer(self, folder: Path, image_root: Path | None, skip_bad: bool) -> ReadResult:
        refs_path = folder / f"refs({SPLIT_BY[self.dataset]}).p"
        instances_path = folder / "instances.json"
        refs = load_refs(refs_path)
        root = Path(image_root) if image_root is not None else folder / DEFAULT_IMAGE_DIR
        images, boxes = _index_instances(instances_path)
        result = ReadResult(items=[])
        for index, ref in enumerate(refs):
            try:
                result.items.extend(self._refer_items(ref, index, str(refs_path), images, boxes, root))
            except DataError as error:
                if not skip_bad:
                    raise
                result.errors.append(error)
        return result

    def _refer_items(
        self,
        ref: Any,
        index: int,
        file: str,
        images: dict[Any, dict[str, Any]],
        boxes: dict[Any, list[float]],
        root: Path,
    ) -> list[EvalItem]:
        if not isinstance(ref, dict):
            raise DataError(file, None, None, "", f"expected a dict, got {type(ref).__name__}", index=index)
        rid = ref.get("ref_id")
        if _field(ref, "split", file, rid, index) != self.split:
            return []
        ann_id = _field(ref, "ann_id", file, rid, index)
        image_id = _field(ref, "image_id", file, rid, index)
        sentences = _field(ref, "sentences", file, rid, index)
        if ann_id not in boxes:
            raise DataError(file, None, rid, "ann_id", f"annotation {ann_id!r} not in instances.json", index=index)
        if image_id not in images:
            raise DataError(file, None, rid, "image_id", f"image {image_id!r} not in instances.json", index=index)
        image = images[image_id]
        path = (root / image["file_name"]).resolve()
        if not path.is_file():
            raise DataError(file, None, rid, "image_id", f"image not found: {path}", index=index)
        x, y, w, h = boxes[ann_id]
        items = []
        for k, sentence in enumerate(sentences if isinstance(sentences, list) else [None]):
            if not isinstance(sentence, dict) or "sent" not in sentence:
                raise DataError(file, None, rid, f"sentences[{k}].sent", "missing field", index=index)
            items.append(
                EvalItem(
                    id=str(sentence.get("sent_id", f"{rid}-{k}")),
                    images=[str(path)],
                    question=str(sentence["sent"]),
                    target=(float(x), float(y), float(x + w), float(y + h)),
                    meta={"width": image["width"], "height": image["height"], "ref_id": rid},
                    source=f"{file}#{index}",
                )
            )
        return items

    def prompt(self, item: EvalItem, style: PromptStyle) -> str:
        if style == "base":
            return f"<img>{item.images[0]}</img><ref>{item.question}</ref><box>"
        return f'Picture 1: <img>{item.images[0]}</img>\nOutput the bounding box of "{item.question}".'

    def postprocess(self, response: str, item: EvalItem) -> str:
        """The reply as is: the metric reads the box (and ``"qwen"`` mode is sensitive to spaces)."""
        return response

    def score(self, items: Sequence[EvalItem], predictions: Sequence[Any], mode: str = "canonical") -> dict[str, Any]:
        result = grounding_accuracy(
            [str(p) for p in predictions],
            [item.target for item in items],
            [(item.meta["width"], item.meta["height"]) for item in items],
            mode,  # type: ignore[arg-type]
        )
        return {self.metric: percent(result.mean), "count": len(items)}


def _index_instances(path: Path) -> tuple[dict[Any, dict[str, Any]], dict[Any, list[float]]]:
    """``image id -> image record`` and ``annotation id -> [x, y, w, h]`` of a COCO-style instances file."""
    images: dict[Any, dict[str, Any]] = {}
    for entry in json_entries(path, "images"):
        rid = field(entry, "id", int)
        field(entry, "file_name", str, rid)
        for name in ("width", "height"):
            if field(entry, name, (int, float), rid) <= 0:
                raise entry.error(name, "expected a positive number", rid)
        images[rid] = entry.value
    boxes: dict[Any, list[float]] = {}
    for entry in json_entries(path, "annotations"):
        rid = field(entry, "id", int)
        bbox = field(entry, "bbox", list, rid)
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise entry.error("bbox", f"expected [x, y, w, h], got {bbox!r}", rid)
        boxes[rid] = bbox
    return images, boxes


def _split_task(dataset: str, split: str, task_name: str) -> type[GroundingTask]:
    return type(
        f"{task_name.replace('-', '_').title().replace('_', '')}Task",
        (GroundingTask,),
        {"name": task_name, "dataset": dataset, "split": split, "__doc__": f"{dataset} {split} (Acc@0.5)."},
    )


_SPLITS = {"refcoco": ("val", "testA", "testB"), "refcoco+": ("val", "testA", "testB"), "refcocog": ("val", "test")}
_TASK_PREFIX = {"refcoco": "refcoco", "refcoco+": "refcocoplus", "refcocog": "refcocog"}

TASKS: dict[str, type[Task]] = {
    f"{_TASK_PREFIX[d]}-{s}": _split_task(d, s, f"{_TASK_PREFIX[d]}-{s}")
    for d, splits in _SPLITS.items()
    for s in splits
}
