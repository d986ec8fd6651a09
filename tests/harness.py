"""Shared test plumbing, written once for every test module (no test module
imports another).

Multi-rank: starting gloo ranks costs seconds on this machine, so a test module
runs all its cases for one grid inside a single spawn (:func:`run_ranks` /
:func:`run_grid`, cached per arguments) and parametrized tests read the cached
results. :func:`grid_params` puts every grid but one in the ``slow`` tier, and
:func:`selected` tells a module fixture which cases this run selected (after
``-m`` / ``-k``), so a fast or targeted run spawns only what it checks.

Also: the tolerances (:data:`TOL`), the names a compare_sharded report must
hold (:func:`expected_check_names`), and the subprocess helpers of the CLI and
launcher tests (:func:`rest_ds`, :func:`launch`, :func:`read_csv`, ``free_port``).
"""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest
import torch

from rest_ds.spim import SpatialMesh
from rest_ds.spim.spawn import free_port, spawn  # noqa: F401  (free_port: re-exported for the launcher tests)
from rest_ds.spim.verify import compare_sharded

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# max|a - b| / max|b| allowed between a sharded run and one process on the same input
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
TOL32, TOL64 = TOL[torch.float32], TOL[torch.float64]


@lru_cache(maxsize=None)
def run_ranks(rank_fn: Callable, world: int, *args: Any, timeout_s: float = 600.0,
              collective_timeout_s: float = 120.0) -> list:
    """``rank_fn(*args)`` on ``world`` gloo ranks, once per (function, world, args)
    in this pytest process (args must be hashable); returns every rank's result.
    A rank that raises fails the calling test with its traceback (RankError);
    tests of that failure path itself call ``spawn``."""
    return spawn(rank_fn, world, *args, timeout_s=timeout_s, collective_timeout_s=collective_timeout_s)


def run_grid(rank_fn: Callable, grid: tuple[int, int], *args: Any):
    """``rank_fn(grid, *args)`` on ``grid[0] * grid[1]`` ranks, once per (function,
    grid, args); returns sp rank 0's result (every rank's report is the same)."""
    return run_ranks(rank_fn, grid[0] * grid[1], grid, *args)[0]


def grid_id(grid: tuple[int, int]) -> str:
    return f"{grid[0]}x{grid[1]}"


def grid_params(grids: Iterable[tuple[int, int]], fast: tuple[int, int]) -> list:
    """``grids`` as pytest params with ids "PHxPW": ``fast`` in the fast tier,
    every other grid marked ``slow`` (the fast tier checks each op family on one grid)."""
    grids = list(grids)
    if fast not in grids:
        raise ValueError(f"fast grid {fast} is not one of {grids}")
    return [pytest.param(g, id=grid_id(g), marks=() if g == fast else pytest.mark.slow) for g in grids]


def selected(request: pytest.FixtureRequest, name: str, **where: Any) -> tuple:
    """The values of parametrized argument ``name`` over the tests of the requesting
    module that this run selected (after ``-m`` / ``-k``), in collection order,
    restricted to tests whose other params equal ``where``; lets a module fixture
    spawn only the cases that will be checked."""
    out = []
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is request.module and name in params and \
                all(params.get(k) == v for k, v in where.items()) and params[name] not in out:
            out.append(params[name])
    return tuple(out)


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


def expected_check_names(model: torch.nn.Module, x: torch.Tensor, *, step: bool = True,
                         every_param: bool = False) -> set[str]:
    """The quantities a compare_sharded report of ``model`` on ``x`` must hold: every
    output, the input grad, the gradient of every parameter that gets one on one
    process (``every_param``: of every parameter), with ``step`` every stepped
    parameter, and every buffer. Runs one forward and backward of ``model``
    (in its current train/eval mode) on one process."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    sum(o.float().sum() for o in outs if o.is_floating_point()).backward()
    names = {f"output[{i}]" for i in range(len(outs))} | {"input grad"}
    names |= {f"grad {n}" for n, p in model.named_parameters() if every_param or p.grad is not None}
    if step:
        names |= {f"param after step {n}" for n, _ in model.named_parameters()}
    names |= {f"buffer {n}" for n, _ in model.named_buffers()}
    return names


_KINDS = ("grad ", "param after step ", "buffer ")


def zero_reference(rep, tol: float) -> dict[str, float]:
    """Checks of a VerifyReport above ``tol`` that pass as zero-in-exact-arithmetic
    quantities: a parameter gradient, stepped parameter or buffer whose absolute
    error is at most ``tol`` times the largest reference value of its kind (all
    parameter gradients, all parameters, all buffers); name -> absolute error."""
    scale = {k: max((v for n, v in rep.sizes.items() if n.startswith(k)), default=0.0) for k in _KINDS}
    out = {}
    for name in rep.failures(tol):
        kind = next((k for k in _KINDS if name.startswith(k)), None)
        err = rep.abs_errors.get(name, math.inf)
        if kind is not None and err <= tol * scale[kind]:
            out[name] = err
    return out


# --- subprocesses: the CLI and the launchers ----------------------------------------------------
def _env(extra: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(extra or {})}


def launch(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None, port: int | None = None):
    """``deepspeed --num_gpus 2 --no_local_rank --module rest_ds ARGS`` (CPU: 2 ranks);
    returns (CompletedProcess, seconds)."""
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--no_local_rank", "--master_port", str(port or free_port()),
           "--module", "rest_ds", *args]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - t0


def rest_ds(args: list[str], cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed ``rest-ds ARGS`` (the console script) as a subprocess in ``cwd``."""
    return subprocess.run([str(BIN / "rest-ds"), *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def read_csv(p: Path) -> list[dict]:
    with open(p, newline="") as f:
        return list(csv.DictReader(f))
