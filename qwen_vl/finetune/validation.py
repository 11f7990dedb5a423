"""Check every record of the training data before training, and turn the good ones into ``Example``s.

``validate_data`` reads the data files, checks each record's structure, tags, images and
length, and collects every problem of every record into a ``ValidationReport``. By default any
problem raises one ``DataValidationError`` listing them; ``skip_bad=True`` trains on the good
records and leaves the bad ones to the report (written as JSON when a path is given). Problems
of a whole file (unreadable, broken JSON list, no records) always raise.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..chat import DEFAULT_SYSTEM
from ..images import ImageLoadError, ImagePolicy, load_image
from ..model.saving import atomic_write
from ..tokenizer import IMG_TOKEN_SPAN, QWenTokenizer
from .records import DataError, Record, parse_record, read_raw
from .regions import RegionError, look_targets
from .supervised import TRUNCATION_POLICIES, Example, TurnEncodingError, encode_conversation, fit_length

#: How many problems a ``DataValidationError`` message lists before counting the rest.
SHOWN_ERRORS = 20
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class ReportEntry:
    """A problem and what became of its record: ``"skipped"`` (invalid), ``"dropped"`` (too long)
    or ``"truncated"`` (kept, shortened)."""

    error: DataError
    action: str


@dataclass
class ValidationReport:
    """Outcome of validating the training data: counts and one entry per problem."""

    files: list[str]
    model_max_length: int
    truncation: str
    kept: int = 0
    entries: list[ReportEntry] = field(default_factory=list)

    @property
    def errors(self) -> list[DataError]:
        """The problems that make a record (or a file) invalid."""
        return [e.error for e in self.entries if e.action == "skipped"]

    @property
    def file_errors(self) -> list[DataError]:
        """Problems of a whole file rather than of one record."""
        return [e for e in self.errors if e.index is None]

    def _records(self, action: str) -> int:
        return len(
            {(e.error.file, e.error.index) for e in self.entries if e.action == action and e.error.index is not None}
        )

    def counts(self) -> dict[str, int]:
        invalid, dropped = self._records("skipped"), self._records("dropped")
        return {
            "records": self.kept + invalid + dropped,
            "kept": self.kept,
            "invalid": invalid,
            "dropped_too_long": dropped,
            "truncated": self._records("truncated"),
            "errors": len(self.errors),
        }

    def to_dict(self) -> dict[str, Any]:
        """The report as written to disk."""
        return {
            "files": self.files,
            "model_max_length": self.model_max_length,
            "truncation": self.truncation,
            "counts": self.counts(),
            "entries": [{**e.error.to_dict(), "action": e.action} for e in self.entries],
        }

    def write(self, path: str | Path) -> None:
        """Write the report as JSON, atomically."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        atomic_write(Path(path), lambda p: p.write_text(text, encoding="utf-8"))


class DataValidationError(ValueError):
    """The training data has problems; ``report`` holds all of them."""

    def __init__(self, report: ValidationReport, report_path: str | Path | None = None) -> None:
        self.report = report
        errors = report.errors
        counts = report.counts()
        if errors:
            head = f"{len(errors)} problem(s) in the training data ({counts['invalid']} of {counts['records']} records)"
        else:
            head = f"no record left to train on ({counts['dropped_too_long']} dropped as too long)"
        lines = [head + ":" if errors else head]
        lines += [f"  {e}" for e in errors[:SHOWN_ERRORS]]
        if len(errors) > SHOWN_ERRORS:
            lines.append(f"  ... and {len(errors) - SHOWN_ERRORS} more")
        if report_path is not None:
            lines.append(f"full report: {report_path}")
        super().__init__("\n".join(lines))


def _balance(value: str, start: str, end: str) -> list[str]:
    """Problems of ``start``/``end`` tag pairs in ``value``: unclosed, nested or stray tags."""
    opens = [(m.start(), start) for m in re.finditer(re.escape(start), value)]
    tags = sorted(opens + [(m.start(), end) for m in re.finditer(re.escape(end), value)])
    problems, open_ = [], False
    for _, tag in tags:
        if tag == start and open_:
            problems.append(f"unclosed '{start}' tag")
        elif tag == end and not open_:
            problems.append(f"'{end}' without a matching '{start}'")
        open_ = tag == start
    if open_:
        problems.append(f"unclosed '{start}' tag")
    return problems


def scan_tags(value: str, tokenizer: QWenTokenizer) -> tuple[list[str], list[str]]:
    """The image paths of ``value`` as written, in span order, and the problems of its tags."""
    tags = tokenizer.IMAGE_ST
    start, end = tokenizer.image_start_tag, tokenizer.image_end_tag
    problems: list[str] = []
    for i in range(0, 6, 2):  # <ref>, <box>, <quad> pairs
        problems += _balance(value, tags[i], tags[i + 1])
    image_problems = _balance(value, start, end)
    if image_problems:
        return [], problems + image_problems
    paths = re.findall(re.escape(start) + "(.*?)" + re.escape(end), value, flags=re.S)
    for path in paths:
        size = len(unicodedata.normalize("NFC", path).encode("utf-8"))
        inner = [t for t in tags if t in path]
        if not path.strip():
            problems.append(f"empty image path in '{start}{end}'")
        elif inner:
            problems.append(f"image path {path!r} contains the tag {inner[0]!r}")
        elif size > IMG_TOKEN_SPAN:
            problems.append(
                f"image path is {size} bytes in UTF-8, over the {IMG_TOKEN_SPAN}-byte limit of an image span"
            )
        elif _URL.match(path.strip()):
            problems.append(f"image {path!r}: URLs are not read during training; store the image under the image root")
    return paths, problems


class _ImageChecker:
    """Opens each image once through an ``ImagePolicy`` confined to the image root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.policy = ImagePolicy(allowed_roots=(root,))
        self.seen: dict[str, str | None] = {}

    def resolve(self, path: str) -> str:
        written = Path(path)
        return str(written if written.is_absolute() else self.root / written)

    def problem(self, path: str) -> str | None:
        full = self.resolve(path)
        if full not in self.seen:
            try:
                load_image(Path(full), self.policy)
                self.seen[full] = None
            except ImageLoadError as exc:
                self.seen[full] = f"image {path!r}: {exc.reason}"
        return self.seen[full]


def _check_texts(
    texts: Sequence[tuple[str, str | None, str]],
    error: Callable[[str, str], DataError],
    tokenizer: QWenTokenizer,
    images: _ImageChecker,
) -> tuple[list[DataError], dict[str, list[str]]]:
    """Problems of a record's ``(field, role, text)`` texts and their images; each field's resolved
    image paths. A role of ``None`` (unknown) still has its images checked."""
    errors: list[DataError] = []
    paths_of: dict[str, list[str]] = {}
    for where, role, value in texts:
        paths, problems = scan_tags(value, tokenizer)
        errors += [error(where, p) for p in problems]
        if paths and role in ("assistant", "system"):
            errors.append(error(where, f"images are allowed in user turns only, found one in the {role} text"))
        elif not problems:
            errors += [error(where, p) for p in map(images.problem, paths) if p is not None]
        paths_of[where] = [images.resolve(p) for p in paths]
    return errors, paths_of


def _example(
    record: Record,
    system: str,
    paths_of: dict[str, list[str]],
    tokenizer: QWenTokenizer,
    images: _ImageChecker,
    report: ValidationReport,
    image_cells: int,
) -> Example | None:
    """The valid record as an ``Example`` fitted to the length limit, or ``None`` with its
    problem added to ``report``."""
    pairs = record.pairs()
    try:
        full = encode_conversation(tokenizer, pairs, system)
    except TurnEncodingError as exc:
        where = "system" if exc.turn < 0 else f"conversations[{exc.turn}].value"
        report.entries.append(ReportEntry(record.error(where, str(exc)), "skipped"))
        return None
    limit, policy = report.model_max_length, report.truncation
    encoded = fit_length(full, limit, policy)
    if encoded is None:
        if policy == "truncate":
            message = (
                f"the first user/assistant pair alone is {full.turn_ends[0]} tokens, over model_max_length {limit}"
            )
        else:
            message = f"{len(full)} tokens, over model_max_length {limit}"
        action = "skipped" if policy == "fail" else "dropped"
        report.entries.append(ReportEntry(record.error("conversations", message), action))
        return None
    kept = len(encoded.turn_ends)
    if kept < len(pairs):
        message = (
            f"truncated after {kept} of {len(pairs)} user/assistant pairs "
            f"({len(encoded)} of {len(full)} tokens) to fit model_max_length {limit}"
        )
        report.entries.append(ReportEntry(record.error(f"conversations[{2 * kept}]", message), "truncated"))
    paths = tuple(p for i in range(2 * kept) for p in paths_of[f"conversations[{i}].value"])
    regions = record.regions()[:kept]
    look = ()
    if any(regions):
        answers = [answer for _, answer in pairs[:kept]]
        try:
            look = tuple(look_targets(tokenizer, encoded, answers, regions, tokenizer.img_start_id, image_cells))
        except RegionError as exc:
            report.entries.append(ReportEntry(record.error(f"conversations[{exc.turn}].regions", str(exc)), "skipped"))
            return None
    return Example(
        record.id, record.file, record.line, encoded.input_ids, encoded.labels, paths, str(images.root), look
    )


def _read_file(
    file: str | Path,
    tokenizer: QWenTokenizer,
    images: _ImageChecker,
    system: str,
    report: ValidationReport,
    image_cells: int,
) -> list[Example]:
    """The examples of one data file; every problem goes to ``report``."""
    examples: list[Example] = []
    for raw in read_raw(file):
        if isinstance(raw, DataError):
            report.entries.append(ReportEntry(raw, "skipped"))
            continue
        errors: list[DataError] = []
        record = parse_record(raw, errors)
        own_system = raw.value.get("system") if isinstance(raw.value, dict) else None
        texts = [("system", "system", own_system)] if isinstance(own_system, str) else []
        texts += record.texts() if record is not None else raw.texts()
        content_errors, paths_of = _check_texts(texts, raw.error, tokenizer, images)
        report.entries += [ReportEntry(e, "skipped") for e in errors + content_errors]
        if record is not None and not content_errors:
            example = _example(
                record,
                system if record.system is None else record.system,
                paths_of,
                tokenizer,
                images,
                report,
                image_cells,
            )
            if example is not None:
                examples.append(example)
    return examples


def validate_data(
    paths: str | Path | Sequence[str | Path],
    tokenizer: QWenTokenizer,
    *,
    model_max_length: int = 2048,
    truncation: str = "drop",
    image_root: str | Path | None = None,
    system: str = DEFAULT_SYSTEM,
    skip_bad: bool = False,
    report_path: str | Path | None = None,
    image_cells: int = 256,
) -> tuple[list[Example], ValidationReport]:
    """Read and check every record of the data file(s); return the training examples and the report.

    ``image_root`` (default: each data file's folder) is where relative image paths resolve and the
    only folder images may be read from. ``system`` is the system prompt of records without their
    own ``"system"``. ``truncation`` decides records over ``model_max_length`` tokens: ``"drop"``
    them (reported, not an error), ``"fail"`` (an error), or ``"truncate"`` after the last whole
    user/assistant pair that fits (dropped if none fits). With ``skip_bad=False`` any invalid record
    raises ``DataValidationError``; with ``skip_bad=True`` invalid records are left out. The report
    is written to ``report_path`` when given, in both cases. ``image_cells`` is the number of
    features the vision tower gives a picture (a square grid), for the look targets of ``regions``.
    """
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION_POLICIES)}, got {truncation!r}")
    if model_max_length < 1:
        raise ValueError(f"model_max_length must be positive, got {model_max_length}")
    _, problems = scan_tags(system, tokenizer)
    if problems or tokenizer.image_start_tag in system:
        raise ValueError(f"system prompt {system!r}: {problems[0] if problems else 'images are not allowed here'}")
    files = [paths] if isinstance(paths, (str, Path)) else list(paths)
    report = ValidationReport([str(f) for f in files], model_max_length, truncation)
    examples: list[Example] = []
    for file in files:
        root = Path(image_root if image_root is not None else Path(file).parent).resolve()
        examples += _read_file(file, tokenizer, _ImageChecker(root), system, report, image_cells)
    order = {name: i for i, name in enumerate(report.files)}
    report.entries.sort(key=lambda e: (order.get(e.error.file, 0), e.error.line or 0))
    report.kept = len(examples)
    if report_path is not None:
        report.write(report_path)
    if report.file_errors or (report.errors and not skip_bad) or not examples:
        raise DataValidationError(report, report_path)
    return examples, report
