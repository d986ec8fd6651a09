"""dp x sp meshes: each dp replica's sp group computes its own scene exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rest_ds.spim import SpatialMesh, TileLayout
from rest_ds.spim.verify import compare_sharded

from .harness import TOL32, grid_params, run_ranks


def _model():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 4, 3, padding=1), nn.Upsample(scale_factor=2, mode="bilinear"))


def _rank(sp_grid):
    mesh = SpatialMesh.build(grid=sp_grid)
    # a different scene per dp replica
    x = torch.randn(4, 3, 20, 22, generator=torch.Generator().manual_seed(100 + mesh.dp_index))
    layout = TileLayout((0, 8, 20), (0, 22)) if sp_grid == (2, 1) else TileLayout((0, 20), (0, 10, 22))
    rep = compare_sharded(_model, x, mesh, layout, train=True, step=True)
    return {"dp": mesh.dp, "sp": mesh.sp, "dp_index": mesh.dp_index, "sp_index": mesh.sp_index,
            "sp_ranks": mesh.sp_ranks, "errors": rep.errors, "refused": rep.refused}


@pytest.mark.parametrize("sp_grid", grid_params([(2, 1), (1, 2)], (2, 1)))
def test_dp2_sp2_each_replica_exact(sp_grid):
    out = run_ranks(_rank, 4, sp_grid)
    assert [(o["dp_index"], o["sp_index"]) for o in out] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [o["sp_ranks"] for o in out] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    for o in out:
        assert (o["dp"], o["sp"]) == (2, 2)
        assert o["refused"] is None
        assert o["errors"] and max(o["errors"].values()) <= TOL32, o["errors"]
