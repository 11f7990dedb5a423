"""Reading benchmark files: JSON documents and JSONL with every record's line, typed field
access and image checks that fail with ``DataError`` (file, line, record id, field).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...finetune.records import DataError, json_type
from .base import EvalItem, ReadResult

_SPACE = " \t\n\r"


@dataclass(frozen=True)
class Entry:
    """One record of a data file: its value, where it starts, and its key when the records
    are the values of a JSON object (``{"id": {...}, ...}``)."""

    value: Any
    file: str
    line: int
    index: int
    key: str | None = None

    def error(self, field: str, message: str, record_id: str | int | None = None) -> DataError:
        """A ``DataError`` located at this record."""
        return DataError(self.file, self.line, record_id, field, message, index=self.index)


def read_text(path: Path) -> str:
    """The UTF-8 text of a data file, or ``DataError`` naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(str(path), None, None, "", "file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(str(path), None, None, "", f"not UTF-8 text (offset {exc.start})") from None
    except OSError as exc:
        raise DataError(str(path), None, None, "", f"cannot read ({exc.strerror or exc})") from None


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _SPACE:
        pos += 1
    return pos


def _members(text: str, pos: int) -> Iterator[tuple[str | None, int, Any]]:
    """``(key or None, start, value)`` of the members of the (valid) array or object at ``pos``."""
    decoder = json.JSONDecoder()
    closing = "]" if text[pos] == "[" else "}"
    pos = _skip(text, pos + 1)
    while text[pos] != closing:
        key = None
        if closing == "}":
            key, pos = decoder.raw_decode(text, pos)
            pos = _skip(text, _skip(text, pos) + 1)  # past ':'
        value, end = decoder.raw_decode(text, pos)
        yield key, pos, value
        pos = _skip(text, end)
        if text[pos] == ",":
            pos = _skip(text, pos + 1)


def json_document(path: Path) -> tuple[Any, str]:
    """The decoded JSON document at ``path`` and its text; a syntax error names line and column."""
    text = read_text(path)
    try:
        return json.loads(text), text
    except json.JSONDecodeError as exc:
        raise DataError(str(path), exc.lineno, None, "", f"invalid JSON: {exc.msg}", column=exc.colno) from None


def json_entries(path: Path, key: str | None = None) -> list[Entry]:
    """The records of a JSON document: the members of its top-level array or object, or of
    the array or object under the top-level ``key``; each with the line it starts on."""
    value, text = json_document(path)
    file = str(path)
    start = _skip(text, 0)
    container = value
    if key is not None:
        if not isinstance(value, dict):
            raise DataError(file, 1, None, key, f"expected a JSON object with {key!r}, got {json_type(value)}")
        if key not in value:
            raise DataError(file, 1, None, key, "missing field")
        container = value[key]
        start = next(pos for k, pos, _ in _members(text, start) if k == key)
    if not isinstance(container, (list, dict)):
        raise DataError(file, 1, None, key or "", f"expected an array or object of records, got {json_type(container)}")
    entries, line, counted = [], 1, 0
    for index, (k, pos, member) in enumerate(_members(text, start)):
        line += text.count("\n", counted, pos)
        counted = pos
        entries.append(Entry(member, file, line, index, k))
    return entries


def jsonl_entries(path: Path) -> Iterator[Entry | DataError]:
    """One record per non-blank line; a line that is not JSON gives a ``DataError`` in its place."""
    file = str(path)
    index = 0
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield Entry(json.loads(line), file, number, index)
        except json.JSONDecodeError as exc:
            yield DataError(file, number, None, "", f"invalid JSON: {exc.msg}", index=index, column=exc.colno)
        index += 1


def field(entry: Entry, name: str, kind: type | tuple[type, ...], record_id: str | int | None = None) -> Any:
    """``entry.value[name]``, checked to be a ``kind`` (an int is never a bool); else ``DataError``."""
    if not isinstance(entry.value, dict):
        raise entry.error("", f"expected a record object, got {json_type(entry.value)}", record_id)
    if name not in entry.value:
        raise entry.error(name, "missing field", record_id)
    value = entry.value[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(dict.fromkeys(json_type(k()) for k in kinds))
        raise entry.error(name, f"expected {names}, got {json_type(value)}", record_id)
    return value


def record_id(entry: Entry, name: str) -> str:
    """The record's id from field ``name`` (a string or an integer), as a string."""
    return str(field(entry, name, (str, int)))


def strings(entry: Entry, name: str, rid: str | int | None, *, non_empty: bool = True) -> list[str]:
    """A field holding a list of strings (or one string, as a list of one)."""
    value = field(entry, name, (list, str), rid)
    values = [value] if isinstance(value, str) else value
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise entry.error(f"{name}[{i}]", f"expected a string, got {json_type(v)}", rid)
    if non_empty and not values:
        raise entry.error(name, "empty list", rid)
    return values


def image_file(entry: Entry, name: str, root: Path, rid: str | int | None, what: str | None = None) -> str:
    """Absolute path of an image named by ``what`` (default: field ``name``) under ``root``; it must exist."""
    relative = field(entry, name, str, rid) if what is None else what
    path = (root / relative).resolve()
    if not path.is_file():
        raise entry.error(name, f"image not found: {path}", rid)
    return str(path)


def collect(
    entries: Iterable[Entry | DataError], build: Callable[[Entry], EvalItem | None], skip_bad: bool
) -> ReadResult:
    """Items built from the entries (``None`` leaves one out); a ``DataError`` is raised, or
    kept in ``errors`` and the record skipped with ``skip_bad``."""
    result = ReadResult(items=[])
    for entry in entries:
        try:
            if isinstance(entry, DataError):
                raise entry
            item = build(entry)
        except DataError as error:
            if not skip_bad:
                raise
            result.errors.append(error)
            continue
        if item is not None:
            result.items.append(item)
    return result


def percent(value: float) -> float:
    """A 0..1 score as a percentage."""
    return 100.0 * value
