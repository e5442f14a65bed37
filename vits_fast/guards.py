"""Input checks shared by the command-line tools and the loaders.

* :func:`refuse_overwrite`: an output path that is one of the command's inputs is refused before anything is
  written (same file by ``os.path.samefile``, or the same resolved path when the output does not exist yet).
* :func:`number`: an ``argparse`` type for numeric flags: finite (no ``nan``/``inf``) and inside a range, so a bad
  value is a usage message, not a traceback or a silent NaN later.
* :func:`check_number`: the same check for values that come from a file or a library call.
* :func:`decode_line`: one line of a text input as UTF-8 text; undecodable bytes or binary control bytes give a
  message naming the line and column.

The size limits the tools enforce are defined beside the code that applies them and listed in the README
("Limits").
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

PathLike = Union[str, os.PathLike]

# C0 control bytes other than tab and carriage return: never part of a text line, typical of binary data.
_CONTROL = {chr(c) for c in range(32)} - {"\t", "\r"}


class OverwriteError(ValueError):
    """An output would replace one of the command's inputs or existing work it was not asked to replace."""


class TextLineError(ValueError):
    """A line of a text input that is not UTF-8 text (the message names the file/stream, line and column)."""


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name the same file (hard links and symlinks included); a missing path compares by its
    resolved name."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def refuse_overwrite(outputs: Iterable[PathLike], inputs: Iterable[Optional[PathLike]]) -> None:
    """Raise :class:`OverwriteError` when an output path names one of the inputs (``None`` inputs are skipped)."""
    sources = [Path(p) for p in inputs if p is not None]
    for out in outputs:
        for src in sources:
            if same_file(out, src):
                raise OverwriteError(f"refusing to overwrite the input {src} with the output {out}; choose "
                                     f"another output")


def check_number(name: str, value: float, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_inclusive: bool = True, error: type = ValueError) -> float:
    """``value`` as a float if finite and in ``[low, high]`` (``(low, high]`` without ``low_inclusive``), else
    ``error`` with a message naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise error(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise error(f"{name} must be a finite number, got {value!r}")
    if low is not None and (v < low or (v == low and not low_inclusive)):
        raise error(f"{name} must be {'>=' if low_inclusive else '>'} {low:g}, got {value!r}")
    if high is not None and v > high:
        raise error(f"{name} must be <= {high:g}, got {value!r}")
    return v


def number(kind: type = float, *, low: Optional[float] = None, high: Optional[float] = None,
           low_inclusive: bool = True) -> Callable[[str], float]:
    """``argparse`` type: ``kind`` (float or int) parsed from the flag, finite and in range (see
    :func:`check_number`), else a usage error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        check_number("the value", value, low=low, high=high, low_inclusive=low_inclusive,
                     error=argparse.ArgumentTypeError)
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def decode_line(raw: Union[bytes, str], line_no: int, where: str) -> str:
    """One line of text input (bytes are decoded as UTF-8) without its line ending.

    Raises :class:`TextLineError` naming ``where``, the line and the column for bytes that are not UTF-8 and for
    NUL/control characters (binary data).
    """
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TextLineError(f"{where} line {line_no}: byte 0x{raw[exc.start]:02x} at column {exc.start + 1} "
                                f"is not UTF-8 text") from None
    else:
        text = raw
    text = text.rstrip("\r\n")
    bad = next((i for i, ch in enumerate(text) if ch in _CONTROL), None)
    if bad is not None:
        raise TextLineError(f"{where} line {line_no}: control byte 0x{ord(text[bad]):02x} at column {bad + 1} "
                            f"(binary data, not text)")
    return text
