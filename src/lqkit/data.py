"""Texts: the bundled WikiText-2 splits and user files (UTF-8)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from .errors import DataError

DEFAULT_EVAL_TEXT = "wikitext2-test.txt"  # WikiText-2 raw test split (see data/ATTRIBUTION.md)
DEFAULT_CALIB_TEXT = "wikitext2-valid.txt"  # WikiText-2 valid split, disjoint from the test split


def bundled_path(name: str) -> Path:
    return Path(str(files("lqkit").joinpath("data", name)))


def read_text(path: str | Path | None, default: str = DEFAULT_EVAL_TEXT) -> tuple[str, str]:
    """(text, label) of a UTF-8 file, or of the bundled ``default`` when ``path`` is None."""
    p = bundled_path(default) if path is None else Path(path).expanduser()
    label = f"bundled:{default}" if path is None else str(path)
    if not p.is_file():
        raise DataError(f"text file {str(path)!r} does not exist; pass an existing UTF-8 text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"text file {str(path)!r} is not valid UTF-8 (byte {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise DataError(f"text file {str(path)!r} is empty; pass a file with text in it")
    return text, label
