"""Helpers shared by every ``rest-ds`` sub-command: exit codes, one-line
messages, the grid argument and argparse value types (one-line errors).

Dependency-free (standard library only), so every layer may use
:func:`one_line` for its error messages.
"""
from __future__ import annotations

import argparse
import sys

# Exit status of every sub-command: done / a check or a rank failed / bad input
# (config, option, scene, model SPIM refuses) / interrupted (Ctrl-C, 128 + SIGINT).
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def one_line(text: object) -> str:
    """``text`` (an exception or a string) on one line: its non-blank lines,
    stripped and joined by single spaces."""
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def fail(message: object, code: int = EXIT_USAGE) -> int:
    """Print ``error: <message>`` (on one line) to stderr; returns ``code``."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    return code


class GridError(argparse.ArgumentTypeError, ValueError):
    """A malformed grid: argparse shows its message as is, and it is a ValueError
    for callers outside argparse (config validation)."""


def parse_grid(text: str) -> tuple[int, int]:
    """``'2x3'`` -> ``(2, 3)`` (rows x columns of tiles, each >= 1; ``*`` works
    as ``x``); :class:`GridError` (a ValueError) otherwise."""
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        if len(parts) != 2:
            raise ValueError
        ph, pw = int(parts[0]), int(parts[1])
    except ValueError:
        raise GridError(f"'{text}' is not PHxPW (rows x columns of tiles, e.g. 2x1 or 1x3)") from None
    if ph < 1 or pw < 1:
        raise GridError(f"grid '{text}' needs at least one row and one column of tiles")
    return ph, pw


def _number(text: str, kind, lowest, what: str):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None
    if not v >= lowest:
        raise argparse.ArgumentTypeError(f"'{text}' must be >= {lowest}")
    return v


def positive_int(text: str) -> int:
    return _number(text, int, 1, "an integer")


def nonneg_int(text: str) -> int:
    return _number(text, int, 0, "an integer")


def nonneg_float(text: str) -> float:
    return _number(text, float, 0, "a number")


def positive_float(text: str) -> float:
    """A number > 0 (a size such as --memory GIB)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not v > 0:  # also NaN
        raise argparse.ArgumentTypeError(f"'{text}' must be > 0")
    return v
