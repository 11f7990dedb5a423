"""The loss curve of a run: ``loss.csv`` (one row per logged step) and ``loss.png``.

Rows are flushed as they are written, so a killed run keeps every row it logged. On
resume from step ``s`` the rows with a step above ``s`` (logged after the checkpoint the
run continues from) are dropped first, so the file stays one clean curve. Floats are
written with ``repr`` and read back bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import IO

from PIL import Image, ImageDraw, ImageFont

from qwen_vl.model.saving import atomic_write

CSV_NAME = "loss.csv"
PNG_NAME = "loss.png"


@dataclass(frozen=True)
class LossRow:
    """One logged optimizer step."""

    step: int
    epoch: float
    loss: float
    lr: float
    tokens: int
    tokens_per_s: float
    elapsed_s: float


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(LossRow))
_INT_COLUMNS = {"step", "tokens"}


def _format_row(row: LossRow) -> str:
    return ",".join(str(int(v)) if n in _INT_COLUMNS else repr(float(v)) for n, v in zip(COLUMNS, astuple(row)))


def read_loss_csv(path: str | Path) -> list[LossRow]:
    """The rows of a ``loss.csv``; a last line cut short by a kill (no newline) is ignored."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    complete = lines[:-1]  # the text after the last newline is empty or a partial row
    if not complete or complete[0] != ",".join(COLUMNS):
        raise ValueError(f"{path}:1: expected the header {','.join(COLUMNS)!r}")
    rows = []
    for number, line in enumerate(complete[1:], start=2):
        cells = line.split(",")
        try:
            if len(cells) != len(COLUMNS):
                raise ValueError(f"{len(cells)} fields, expected {len(COLUMNS)}")
            rows.append(LossRow(*(int(c) if n in _INT_COLUMNS else float(c) for n, c in zip(COLUMNS, cells))))
        except ValueError as e:
            raise ValueError(f"{path}:{number}: bad row {line!r} ({e})") from e
    return rows


class LossLog:
    """Appends rows to ``out_dir/loss.csv`` and draws ``out_dir/loss.png``.

    ``resume_step=None`` starts a new file; ``resume_step=s`` keeps the rows with
    ``step <= s`` of the existing file (if any) and appends after them.
    """

    def __init__(self, out_dir: str | Path, *, resume_step: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.csv_path = self.out_dir / CSV_NAME
        kept = []
        if resume_step is not None and self.csv_path.is_file():
            kept = [r for r in read_loss_csv(self.csv_path) if r.step <= resume_step]
        text = "".join(line + "\n" for line in [",".join(COLUMNS), *map(_format_row, kept)])
        atomic_write(self.csv_path, lambda p: p.write_text(text, encoding="utf-8"))
        self._rows: list[LossRow] = kept
        self._file: IO[str] | None = open(self.csv_path, "a", encoding="utf-8", newline="")

    @property
    def rows(self) -> list[LossRow]:
        """Every row of the curve so far (kept ones included)."""
        return list(self._rows)

    def log(
        self, step: int, epoch: float, loss: float, lr: float, tokens: int, tokens_per_s: float, elapsed_s: float
    ) -> LossRow:
        """Append one row and flush it to the file."""
        row = LossRow(
            int(step), float(epoch), float(loss), float(lr), int(tokens), float(tokens_per_s), float(elapsed_s)
        )
        if self._file is None:
            raise ValueError(f"{self.csv_path}: the log is closed")
        self._file.write(_format_row(row) + "\n")
        self._file.flush()
        self._rows.append(row)
        return row

    def write_png(self, path: str | Path | None = None, *, size: tuple[int, int] = (800, 480)) -> Path:
        """Draw the loss curve to ``path`` (default ``out_dir/loss.png``), atomically."""
        path = Path(path) if path is not None else self.out_dir / PNG_NAME
        image = draw_loss_curve(self._rows, size)
        atomic_write(path, lambda p: image.save(p, format="PNG"))
        return path

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> LossLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- drawing (Pillow only)


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """About ``count`` round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    if not hi > lo:
        lo, hi = lo - 1.0, hi + 1.0
    raw = (hi - lo) / max(1, count)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    if integer:
        step = max(1.0, float(round(step)))
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [round(i * step, 12) for i in range(first, last + 1)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _label(value: float) -> str:
    return f"{value:.6g}"


def draw_loss_curve(rows: list[LossRow], size: tuple[int, int] = (800, 480)) -> Image.Image:
    """An RGB image of loss against step: axes, gridlines, numbered ticks, axis labels, title."""
    width, height = size
    left, right, top, bottom = 80, 24, 40, 56
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font(13)
    points = [(r.step, r.loss) for r in rows if math.isfinite(r.loss)]
    title = f"training loss (last {_label(points[-1][1])} at step {points[-1][0]})" if points else "training loss"
    draw.text((width / 2, top / 2), title, fill="black", font=font, anchor="mm")
    x0, y0, x1, y1 = left, top, width - right, height - bottom  # plot area, y grows downwards
    if not points:
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), "no finite loss values yet", fill="gray", font=font, anchor="mm")
        return image
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xt, yt = nice_ticks(min(xs), max(xs), 6, integer=True), nice_ticks(min(ys), max(ys), 5)

    def px(step: float) -> float:
        return x0 + (step - xt[0]) / (xt[-1] - xt[0]) * (x1 - x0)

    def py(loss: float) -> float:
        return y1 - (loss - yt[0]) / (yt[-1] - yt[0]) * (y1 - y0)

    for t in xt:
        draw.line((px(t), y0, px(t), y1), fill=(225, 225, 225))
        draw.line((px(t), y1, px(t), y1 + 5), fill="black")
        draw.text((px(t), y1 + 8), str(int(t)), fill="black", font=font, anchor="mt")
    for t in yt:
        draw.line((x0, py(t), x1, py(t)), fill=(225, 225, 225))
        draw.line((x0 - 5, py(t), x0, py(t)), fill="black")
        draw.text((x0 - 8, py(t)), _label(t), fill="black", font=font, anchor="rm")
    draw.rectangle((x0, y0, x1, y1), outline="black")
    draw.text(((x0 + x1) / 2, height - 14), "step", fill="black", font=font, anchor="mb")
    label = Image.new("RGB", (60, 20), "white")
    ImageDraw.Draw(label).text((30, 10), "loss", fill="black", font=font, anchor="mm")
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, (4, int((y0 + y1) / 2 - rotated.height / 2)))
    curve = [(px(s), py(v)) for s, v in points]
    if len(curve) == 1:
        cx, cy = curve[0]
        draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=(31, 119, 180))
    else:
        draw.line(curve, fill=(31, 119, 180), width=2, joint="curve")
    return image
