"""Conversation records of the official fine-tuning format, read from JSON or JSONL.

A data file holds records ``{"id": ..., "conversations": [{"from": "user", "value": ...},
{"from": "assistant", "value": ...}, ...], "system": ...}`` ("system" optional), either as one
JSON list or one record per line (JSONL). The layout is told by the content: a file whose first
non-blank character is ``[`` is a JSON list, anything else is JSONL. ``human``/``gpt`` are
accepted for ``user``/``assistant``.

Every problem becomes a ``DataError`` naming the file, the line, the record id and the field;
reading goes on past bad records so that all problems of a file are known at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .regions import Region, parse_regions

#: Role names accepted in ``from`` and the role each one means.
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
RECORD_FIELDS = ("id", "conversations", "system")
TURN_FIELDS = ("from", "value", "regions")
_JSON_SPACE = " \t\n\r"


class DataError(ValueError):
    """One problem in a data file: where it is (file, line, record, field) and what it is."""

    def __init__(
        self,
        file: str,
        line: int | None,
        record_id: str | int | None,
        field: str,
        message: str,
        *,
        index: int | None = None,
        column: int | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.record_id = record_id
        self.field = field
        self.message = message
        self.index = index  # position of the record in its file, from 0
        self.column = column
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}" + (f":{self.column}" if self.column is not None else "")
        parts = [where]
        if self.record_id is not None:
            parts.append(f"record {self.record_id!r}")
        elif self.index is not None:
            parts.append(f"record #{self.index}")
        if self.field:
            parts.append(self.field)
        return ": ".join(parts + [self.message])

    def to_dict(self) -> dict[str, Any]:
        """The error as JSON-ready fields (file, line, id, field, message)."""
        return {
            "file": self.file,
            "line": self.line,
            "id": self.record_id,
            "field": self.field,
            "message": self.message,
        }


@dataclass(frozen=True)
class Turn:
    """One message: ``role`` is ``"user"`` or ``"assistant"`` (aliases already mapped)."""

    role: str
    value: str
    regions: tuple[Region, ...] = ()  # assistant turns only: where the answer's facts are


@dataclass(frozen=True)
class Record:
    """A structurally valid conversation: user/assistant turns alternating, user first, assistant last."""

    id: str | int
    turns: tuple[Turn, ...]
    system: str | None  # None = use the global default system prompt
    file: str
    line: int | None
    index: int

    def pairs(self) -> list[tuple[str, str]]:
        """The conversation as ``(user, assistant)`` pairs."""
        return [(self.turns[i].value, self.turns[i + 1].value) for i in range(0, len(self.turns), 2)]

    def regions(self) -> list[tuple[Region, ...]]:
        """The regions of each assistant turn, in order (empty where a turn gives none)."""
        return [self.turns[i + 1].regions for i in range(0, len(self.turns), 2)]

    def texts(self) -> list[tuple[str, str, str]]:
        """``(field, role, text)`` of every turn."""
        return [(f"conversations[{i}].value", t.role, t.value) for i, t in enumerate(self.turns)]

    def error(self, field: str, message: str) -> DataError:
        """A ``DataError`` located at this record."""
        return DataError(self.file, self.line, self.id, field, message, index=self.index)


@dataclass(frozen=True)
class RawRecord:
    """One decoded JSON value of a data file and where it starts."""

    value: Any
    file: str
    line: int
    index: int

    @property
    def record_id(self) -> str | int | None:
        """The record's id when it is a usable one (a non-empty string or an integer)."""
        rid = self.value.get("id") if isinstance(self.value, dict) else None
        return rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) and rid != "" else None

    def error(self, field: str, message: str) -> DataError:
        """A ``DataError`` located at this value."""
        return DataError(self.file, self.line, self.record_id, field, message, index=self.index)

    def texts(self) -> list[tuple[str, str | None, str]]:
        """``(field, role, text)`` of every turn whose value is a string, even in an invalid record
        (role ``None`` when ``from`` names no known role), so its texts can still be checked."""
        turns = self.value.get("conversations") if isinstance(self.value, dict) else None
        out: list[tuple[str, str | None, str]] = []
        for i, turn in enumerate(turns if isinstance(turns, list) else []):
            if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                role = turn.get("from")
                out.append(
                    (
                        f"conversations[{i}].value",
                        ROLE_ALIASES.get(role) if isinstance(role, str) else None,
                        turn["value"],
                    )
                )
        return out


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type ("object", "array", "string", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _JSON_SPACE:
        pos += 1
    return pos


def _syntax_error(file: str, text: str, pos: int, message: str) -> DataError:
    line, col = _line_col(text, pos)
    return DataError(file, line, None, "", f"invalid JSON: {message}", column=col)


def _json_list(text: str, file: str) -> Iterator[RawRecord | DataError]:
    """Elements of the JSON list in ``text`` with their starting lines; a syntax error ends it."""
    decoder = json.JSONDecoder()
    pos = _skip_space(text, text.index("[") + 1)
    if pos < len(text) and text[pos] == "]":
        yield DataError(file, _line_col(text, pos)[0], None, "", "the list holds no records")
        return
    index, line, counted = 0, 1, 0
    while True:
        if pos >= len(text):
            yield _syntax_error(file, text, len(text), "the list is not closed with ']'")
            return
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield _syntax_error(file, text, exc.pos, exc.msg)
            return
        yield RawRecord(value, file, line, index)
        index += 1
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == "]":
            break
        if pos < len(text) and text[pos] != ",":
            yield _syntax_error(file, text, pos, "expected ',' or ']' after a record")
            return
        pos = _skip_space(text, pos + 1)
        if pos < len(text) and text[pos] == "]":
            yield _syntax_error(file, text, pos, "trailing comma before ']'")
            return
    rest = _skip_space(text, pos + 1)
    if rest < len(text):
        yield _syntax_error(file, text, rest, "extra data after the list")


def _json_lines(text: str, file: str) -> Iterator[RawRecord | DataError]:
    """One value per non-blank line; a bad line is an error and reading goes on."""
    index = 0
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            if index == 0 and line.lstrip().startswith("{") and _is_one_object(text):
                yield DataError(
                    file, 1, None, "", "the file holds one JSON object: expected a JSON list of records or one per line"
                )
                return
            yield DataError(file, number, None, "", f"invalid JSON: {exc.msg}", index=index, column=exc.colno)
        else:
            yield RawRecord(value, file, number, index)
        index += 1


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def read_raw(path: str | Path) -> Iterator[RawRecord | DataError]:
    """The JSON values of a data file (JSON list or JSONL, told by content), or errors in their place."""
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        yield DataError(file, None, None, "", f"cannot read data file ({exc.strerror or exc})")
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        yield DataError(file, line, None, "", f"not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})")
        return
    if not text.strip():
        yield DataError(file, None, None, "", "empty data file: no records")
        return
    yield from (_json_list if text.lstrip(_JSON_SPACE).startswith("[") else _json_lines)(text, file)


def _turn(raw: RawRecord, i: int, turn: Any, errors: list[DataError]) -> Turn | None:
    def fail(field: str, message: str) -> None:
        errors.append(raw.error(field, message))

    where = f"conversations[{i}]"
    if not isinstance(turn, dict):
        fail(where, f"expected an object with 'from' and 'value', got {json_type(turn)}")
        return None
    for key in turn:
        if key not in TURN_FIELDS:
            fail(f"{where}.{key}", "unknown field (a turn has 'from', 'value' and, for answers, 'regions')")
    role, value = turn.get("from"), turn.get("value")
    for key, got in (("from", role), ("value", value)):
        if key not in turn:
            fail(f"{where}.{key}", "missing field")
        elif not isinstance(got, str):
            fail(f"{where}.{key}", f"expected a string, got {json_type(got)}")
    if isinstance(role, str) and role not in ROLE_ALIASES:
        fail(f"{where}.from", f"unknown role {role!r} (use 'user' or 'assistant'; 'human' and 'gpt' are accepted)")
    if isinstance(value, str) and not value.strip():
        fail(f"{where}.value", "empty value")
    regions: tuple[Region, ...] = ()
    if "regions" in turn:
        if ROLE_ALIASES.get(role) == "user":
            fail(f"{where}.regions", "regions belong to assistant turns")
        elif isinstance(value, str):
            regions = parse_regions(turn["regions"], f"{where}.regions", value, fail)
    if isinstance(role, str) and role in ROLE_ALIASES and isinstance(value, str):
        return Turn(ROLE_ALIASES[role], value, regions)
    return None


def _role_order(raw: RawRecord, turns: Sequence[Turn | None], errors: list[DataError]) -> None:
    def fail(field: str, message: str) -> None:
        errors.append(raw.error(field, message))

    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn is None or turn.role == expected:
            continue
        if i == 0:
            fail("conversations[0].from", f"expected 'user' first, got {turn.role!r}")
        else:
            previous = "assistant" if expected == "user" else "user"
            fail(f"conversations[{i}].from", f"expected {expected!r} after {previous!r}, got {turn.role!r}")
    last = turns[-1]
    if len(turns) % 2 == 1 and last is not None and last.role == "user":
        fail(
            f"conversations[{len(turns) - 1}]", "ends the conversation with a 'user' turn: the last must be 'assistant'"
        )


def parse_record(raw: RawRecord, errors: list[DataError]) -> Record | None:
    """Check one decoded value's structure; append every problem to ``errors``; the record if none."""
    before = len(errors)
    value = raw.value
    if not isinstance(value, dict):
        errors.append(raw.error("", f"expected a record object, got {json_type(value)}"))
        return None
    record_id = value.get("id")

    def fail(field: str, message: str) -> None:
        errors.append(raw.error(field, message))

    if "id" not in value:
        fail("id", "missing field")
    elif raw.record_id is None:
        fail("id", "empty id" if record_id == "" else f"expected a string or an integer, got {json_type(record_id)}")
    for key in value:
        if key not in RECORD_FIELDS:
            fail(key, f"unknown field (allowed: {', '.join(RECORD_FIELDS)})")
    system = value.get("system")
    if "system" in value and not isinstance(system, str):
        fail("system", f"expected a string, got {json_type(system)}")
    conversations = value.get("conversations")
    turns: list[Turn | None] = []
    if "conversations" not in value:
        fail("conversations", "missing field")
    elif not isinstance(conversations, list):
        fail("conversations", f"expected an array of turns, got {json_type(conversations)}")
    elif not conversations:
        fail("conversations", "no turns")
    else:
        turns = [_turn(raw, i, t, errors) for i, t in enumerate(conversations)]
        _role_order(raw, turns, errors)
    if len(errors) > before:
        return None
    return Record(record_id, tuple(turns), system, raw.file, raw.line, raw.index)  # type: ignore[arg-type]


def read_records(path: str | Path) -> tuple[list[Record], list[DataError]]:
    """All structurally valid records of a data file, and every problem found in it."""
    records: list[Record] = []
    errors: list[DataError] = []
    for item in read_raw(path):
        if isinstance(item, DataError):
            errors.append(item)
            continue
        record = parse_record(item, errors)
        if record is not None:
            records.append(record)
    return records, errors
