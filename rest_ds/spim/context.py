"""Where in the model the op being run lives, for error messages.

``parallelize`` registers forward pre/post hooks that push and pop the dotted
module path, so a refusal raised inside an op reads
``module 'decode_head.ppm.1' (Conv2d): ...``.
"""
from __future__ import annotations

from .errors import SPIMUnsupportedError

_STACK: list[tuple[str, str]] = []

# Per-forward settings of the parallelized model being run (set by its root pre-hook).
settings: dict = {"attention": "auto"}

# Partitions of the sharded tensors created in the current forward, keyed by
# (axis 0=rows/1=cols, number of tiles, global size); first one wins. Resampling
# reuses them so that an upsampled map lines up with the map of that size it is
# added to or concatenated with (ops/resample.py). Built from global
# information only, so identical on every rank.
_LAYOUTS: dict[tuple[int, int, int], tuple[int, ...]] = {}


def push(path: str, type_name: str) -> None:
    _STACK.append((path, type_name))


def pop() -> None:
    if _STACK:
        _STACK.pop()


def reset() -> None:
    _STACK.clear()
    _LAYOUTS.clear()


def note_layout(rows: tuple[int, ...], cols: tuple[int, ...]) -> None:
    """Record the row and column partitions of a sharded tensor."""
    _LAYOUTS.setdefault((0, len(rows) - 1, rows[-1]), rows)
    _LAYOUTS.setdefault((1, len(cols) - 1, cols[-1]), cols)


def layout_for(axis: int, parts: int, size: int) -> tuple[int, ...] | None:
    """The partition of a sharded tensor of global ``size`` along ``axis`` seen so far, or None."""
    return _LAYOUTS.get((axis, parts, size))


def where() -> str:
    if not _STACK:
        return "outside any module"
    path, type_name = _STACK[-1]
    return f"module '{path or '<root>'}' ({type_name})"


def unsupported(op: str, why: str) -> SPIMUnsupportedError:
    """The refusal error for op ``op`` at the current module."""
    return SPIMUnsupportedError(f"{where()}: {op} is not supported by SPIM: {why}")
