"""argparse value types shared by the rest-ds sub-commands (one-line errors)."""
from __future__ import annotations

import argparse


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
