"""Where in the model the op being run lives, for error messages.

``parallelize`` registers forward pre/post hooks that push and pop the dotted
module path, so a refusal raised inside an op reads
``module 'decode_head.ppm.1' (Conv2d): ...``.
"""
from __future__ import annotations

from .errors import SPIMUnsupportedError

_STACK: list[tuple[str, str]] = []


def push(path: str, type_name: str) -> None:
    _STACK.append((path, type_name))


def pop() -> None:
    if _STACK:
        _STACK.pop()


def reset() -> None:
    _STACK.clear()


def where() -> str:
    if not _STACK:
        return "outside any module"
    path, type_name = _STACK[-1]
    return f"module '{path or '<root>'}' ({type_name})"


def unsupported(op: str, why: str) -> SPIMUnsupportedError:
    """The refusal error for op ``op`` at the current module."""
    return SPIMUnsupportedError(f"{where()}: {op} is not supported by SPIM: {why}")
