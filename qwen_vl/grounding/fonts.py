"""Finding a font that can draw CJK labels."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

#: Environment variable naming a font file to use for labels.
FONT_ENV = "QWEN_VL_FONT"

#: Lower-cased file-name fragments of common fonts with Chinese glyphs.
CJK_NAME_HINTS = (
    "wqy",
    "wenquanyi",
    "notosanscjk",
    "notoserifcjk",
    "noto-cjk",
    "notosanssc",
    "notosanstc",
    "droidsansfallback",
    "sourcehansans",
    "sourcehanserif",
    "sarasa",
    "ukai",
    "uming",
    "arphic",
    "msyh",
    "simhei",
    "simsun",
    "simkai",
    "pingfang",
    "hiragino",
    "stheiti",
    "heiti",
    "cjk",
)
FONT_SUFFIXES = (".ttf", ".ttc", ".otf", ".otc")
INSTALL_HINT = (
    "install a font with CJK glyphs (e.g. `apt-get install fonts-wqy-zenhei` or `fonts-noto-cjk`) "
    f"or point {FONT_ENV} at one"
)

_PROBES = ("中", "文")  # two different ideographs: a font without them draws the same box twice


def default_font_dirs() -> list[Path]:
    """System and user font folders of Linux, macOS and Windows that exist here."""
    home = Path.home()
    dirs = [
        Path("/usr/share/fonts"),
        Path("/usr/local/share/fonts"),
        home / ".fonts",
        home / ".local" / "share" / "fonts",
        Path("/Library/Fonts"),
        Path("/System/Library/Fonts"),
        home / "Library" / "Fonts",
    ]
    if sys.platform == "win32":
        dirs.append(Path(os.environ.get("WINDIR", r"C:\Windows")) / "Fonts")
    return [d for d in dirs if d.is_dir()]


def has_cjk_glyphs(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> bool:
    """Whether ``font`` draws real Chinese glyphs: ink for 中 and 文, and not the same
    (missing-glyph) shape for both."""
    try:
        first, second = (_render(font, ch) for ch in _PROBES)
    except (OSError, ValueError, TypeError):
        return False
    if first.getbbox() is None or second.getbbox() is None:
        return False
    return first.size != second.size or first.tobytes() != second.tobytes()


def _render(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> Image.Image:
    left, top, right, bottom = (int(v) for v in font.getbbox(text))
    image = Image.new("L", (max(1, right - left + 2), max(1, bottom - top + 2)))
    ImageDraw.Draw(image).text((1 - left, 1 - top), text, font=font, fill=255)
    return image


@functools.lru_cache(maxsize=64)
def _font_file_has_cjk(path: str, mtime: float) -> bool:
    try:
        font = ImageFont.truetype(path, 24)
    except (OSError, ValueError):
        return False
    return has_cjk_glyphs(font)


def font_file_has_cjk(path: str | os.PathLike[str]) -> bool:
    """Whether the font file at ``path`` loads and draws Chinese glyphs (cached per file)."""
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        return False
    return _font_file_has_cjk(os.fspath(path), mtime)


@functools.lru_cache(maxsize=1)
def _system_candidates() -> tuple[str, ...]:
    """Font files fontconfig lists for Chinese, then CJK-named files of the default folders."""
    return (*_fontconfig_candidates(), *_named_candidates(default_font_dirs()))


def clear_font_cache() -> None:
    """Forget the scanned font lists (after installing a font, for example)."""
    _system_candidates.cache_clear()
    _font_file_has_cjk.cache_clear()


def _fontconfig_candidates() -> list[str]:
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        return []
    try:
        result = subprocess.run([fc_list, ":lang=zh", "file"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    files = [line.strip().rstrip(":").strip() for line in result.stdout.splitlines()]
    return sorted(f for f in files if f.lower().endswith(FONT_SUFFIXES))


def _named_candidates(dirs: Iterable[Path]) -> list[str]:
    found: list[str] = []
    for folder in dirs:
        try:
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in FONT_SUFFIXES)
        except OSError:
            continue
        for path in files:
            name = path.name.lower().replace(" ", "").replace("_", "")
            if any(hint in name for hint in CJK_NAME_HINTS):
                found.append(str(path))
    return found


def find_cjk_font(
    preferred: str | os.PathLike[str] | None = None,
    *,
    search_dirs: Iterable[str | os.PathLike[str]] | None = None,
    use_fontconfig: bool = True,
) -> Path | None:
    """A font file that really draws Chinese glyphs, or None.

    Looked up in order: ``preferred``, the ``QWEN_VL_FONT`` environment variable,
    fontconfig (``fc-list :lang=zh file``, when ``use_fontconfig``), then files in
    ``search_dirs`` (default: the system and user font folders) whose names suggest
    CJK (wqy, Noto CJK, Droid Sans Fallback, Source Han, ...). Every candidate is
    checked by rendering two ideographs. The system lists are scanned once per process
    (``clear_font_cache()`` forgets them).
    """
    candidates: list[str] = []
    for explicit in (preferred, os.environ.get(FONT_ENV) or None):
        if explicit is not None:
            candidates.append(os.fspath(explicit))
    if search_dirs is None and use_fontconfig:
        candidates.extend(_system_candidates())
    else:
        if use_fontconfig:
            candidates.extend(_fontconfig_candidates())
        dirs = default_font_dirs() if search_dirs is None else [Path(d) for d in search_dirs]
        candidates.extend(_named_candidates(dirs))
    seen: set[str] = set()
    for candidate in candidates:
        if candidate in seen:
            continue
        seen.add(candidate)
        if os.path.isfile(candidate) and font_file_has_cjk(candidate):
            return Path(candidate)
    return None


Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

_MISSING = "\U0010fffd"  # a private-use code point no font draws: its glyph is the missing-glyph box


@functools.lru_cache(maxsize=8192)
def has_glyph(font: Font, char: str) -> bool:
    """Whether ``font`` draws ``char`` with a glyph of its own (not its missing-glyph box)."""
    try:
        drawn, missing = _render(font, char), _render(font, _MISSING)
    except (OSError, ValueError, TypeError, UnicodeError):
        return False
    return drawn.size != missing.size or drawn.tobytes() != missing.tobytes()


def split_runs(text: str, fonts: list[Font]) -> list[tuple[str, Font]]:
    """``text`` cut into runs, each with the first of ``fonts`` that has its characters
    (characters no font has stay with ``fonts[0]``; whitespace joins the current run)."""
    runs: list[tuple[str, Font]] = []
    for char in text:
        if char.isspace() and runs:
            font = runs[-1][1]
        else:
            font = next((f for f in fonts if has_glyph(f, char)), fonts[0])
        if runs and runs[-1][1] is font:
            runs[-1] = (runs[-1][0] + char, font)
        else:
            runs.append((char, font))
    return runs


def load_label_fonts(
    size: int,
    font_path: str | os.PathLike[str] | None = None,
    *,
    need_cjk: bool = True,
) -> list[Font]:
    """Fonts of ``size`` pixels for labels, tried in order for each character.

    ``font_path`` if given (it must load), else a CJK font from ``find_cjk_font``; then
    Pillow's default font for what the first lacks (some CJK fonts, such as Droid Sans
    Fallback, have no Latin letters). Without a CJK font, only Pillow's default font is
    returned, with a warning (when ``need_cjk``) that CJK labels may not render.
    """
    fallback = ImageFont.load_default(size)
    if font_path is not None:
        return [ImageFont.truetype(os.fspath(font_path), size), fallback]
    found = find_cjk_font()
    if found is not None:
        return [ImageFont.truetype(str(found), size), fallback]
    if need_cjk:
        warnings.warn(
            f"no font with CJK glyphs found; labels use Pillow's default font and CJK text may "
            f"not render: {INSTALL_HINT}",
            RuntimeWarning,
            stacklevel=3,
        )
    return [fallback]
