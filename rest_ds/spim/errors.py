"""Errors raised by SPIM.

Every check that can fail is computed from information all ranks of an sp group
share (global shapes, the tile layout, the module), so every rank raises the same
error at the same point and no rank is left waiting in a collective.
"""
from __future__ import annotations


class SPIMError(RuntimeError):
    """Bad input or geometry: tiles too small for a halo, misaligned tiles,
    mismatched shapes across ranks, a mesh that does not fit the world size."""


class SPIMUnsupportedError(SPIMError):
    """``parallelize`` or a sharded op refuses something it cannot run exactly.

    The message names the module (dotted path inside the parallelized model) and
    the op, so the user knows what to replace."""
