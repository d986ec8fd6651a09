"""Shared test plumbing: run many sharded-vs-single cases in one spawn per grid.

Starting gloo ranks costs seconds on this machine, so a test module runs all
its cases for one grid inside a single ``spawn`` and parametrized tests read
the cached results."""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch

from rest_ds.spim import SpatialMesh
from rest_ds.spim.spawn import spawn
from rest_ds.spim.verify import compare_sharded


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


def offset_scene(batch: int, channels: int, hw: tuple[int, int], dtype) -> torch.Tensor:
    """A seeded random scene with a per-sample, per-channel offset (so that
    whole-scene statistics differ from per-tile ones)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn((batch, channels, *hw), generator=g) + 2 * torch.randn((batch, channels, 1, 1), generator=g)
    return x.to(dtype)


def train_step_reports(grid: tuple[int, int], cases: dict, layouts: dict, channels: int, seed: int,
                       align: int) -> dict:
    """Rank body: one compare_sharded train step per case ``name -> (factory,
    dtype, batch)`` on ``layouts[grid]``; returns ``name -> VerifyReport``."""
    mesh = SpatialMesh.build(grid=grid)
    layout = layouts[grid]
    return {name: compare_sharded(factory, offset_scene(batch, channels, layout.shape, dtype), mesh, layout,
                                  train=True, step=True, seed=seed, align=align)
            for name, (factory, dtype, batch) in cases.items()}


def init_deepspeed_rank() -> None:
    """Rank body prologue of the DeepSpeed engine tests: DeepSpeed's gloo process
    group, its logging quietened, deterministic algorithms on."""
    import deepspeed

    from rest_ds.train.engine import quiet_deepspeed

    quiet_deepspeed()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.use_deterministic_algorithms(True)
