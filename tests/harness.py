"""Shared test plumbing: run many sharded-vs-single cases in one spawn per grid.

Starting gloo ranks costs seconds on this machine, so a test module runs all
its cases for one grid inside a single ``spawn`` and parametrized tests read
the cached results."""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

from rest_ds.spim.spawn import spawn


@lru_cache(maxsize=None)
def run_grid(rank_fn: Callable, grid: tuple[int, int]):
    """``rank_fn(grid)`` on ``grid[0] * grid[1]`` ranks, once per (function, grid);
    returns sp rank 0's result (every rank's report is the same)."""
    return spawn(rank_fn, grid[0] * grid[1], grid)[0]


def check_report(errors: dict, refused: str | None, tol: float, what: str) -> None:
    """Assert a compare_sharded report: not refused, compared something, all within tol."""
    assert refused is None, refused
    assert errors, f"{what}: no quantity was compared"
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"{what}: {bad}"
