"""Halos that reach past the adjacent tile (a dilated conv wider than a tile,
pooling windows over several thin tiles): exact through the far plan (one
all-to-all over the sp group), float64 vs one process at 1e-10 on uneven 1x3
and 3x1 grids; and torchvision's DeepLabV3-MobileNetV3 (ASPP rate 36) on a 1x3
grid of a 96x96 scene, which needed 288 px tiles before."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rest_ds.spim import SpatialMesh, TileLayout
from rest_ds.spim.verify import compare_sharded

from . import zoo_models as Z
from .harness import TOL64 as TOL
from .harness import check_report, offset_scene, run_grid, zero_reference

# thin uneven tiles: 3, 5, 6 rows (3x1) and 4, 5, 5 cols (1x3)
LAYOUTS = {(3, 1): TileLayout((0, 3, 8, 14), (0, 10)), (1, 3): TileLayout((0, 10), (0, 4, 9, 14))}


class FarThenNear(nn.Module):
    """A far exchange between neighbour exchanges, with a residual add."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=7, dilation=7)
        self.c = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.c(y + self.b(y))


CASES = {
    "conv_dil12_same": lambda: nn.Conv2d(3, 4, 3, padding=12, dilation=12),
    "conv_dil4_p2": lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=4),
    "conv_dil5_s2": lambda: nn.Conv2d(3, 4, 3, stride=2, padding=5, dilation=5),
    "conv_depthwise_dil9": lambda: nn.Conv2d(3, 3, 3, padding=9, dilation=9, groups=3),
    "conv_k11": lambda: nn.Conv2d(3, 4, 11, padding=5),
    "far_then_near": FarThenNear,
    "maxpool_k9": lambda: nn.MaxPool2d(9, 1, 4),
    "maxpool_k9_s2": lambda: nn.MaxPool2d(9, 2, 4),
    "avgpool_k9": lambda: nn.AvgPool2d(9, 1, 4, count_include_pad=False),
}


def _rank(grid):
    mesh = SpatialMesh.build(grid=grid)
    layout = LAYOUTS[grid]
    x = offset_scene(2, 3, layout.shape, torch.float64)
    out = {}
    for name, factory in CASES.items():
        rep = compare_sharded(factory, x, mesh, layout, train=True, step=True, dtype=torch.float64)
        out[name] = (rep.errors, rep.refused, rep.comm_bytes)
    if grid == (1, 3):
        x = offset_scene(2, 3, (96, 96), torch.float64)
        rep = compare_sharded(Z.tv_deeplabv3_mobilenet_v3_large, x, mesh, TileLayout((0, 96), (0, 48, 80, 96)),
                              train=True, step=True, seed=5, align=16, dtype=torch.float64)
        out["deeplabv3_mobilenet_v3_large"] = rep
    return out


def _check(grid):
    res = run_grid(_rank, grid)
    for name, got in res.items():
        if not isinstance(got, tuple):  # a whole model: judged as the zoo judges it
            assert got.refused is None and got.errors, got.refused
            zero = zero_reference(got, TOL)  # zero in exact arithmetic (BatchNorm biases, running means)
            bad = {k: v for k, v in got.failures(TOL).items() if k not in zero}
            assert not bad, (name, sorted(bad.items(), key=lambda kv: -kv[1])[:8])
            assert len(zero) < len(got.errors) // 4, (name, len(zero), len(got.errors))
            print(f"{name} on {grid}: {len(got.errors)} checks, max rel error "
                  f"{max(v for k, v in got.errors.items() if k not in zero):.1e}, zero-reference {len(zero)}")
            errors, comm = got.errors, got.comm_bytes
        else:
            errors, refused, comm = got
            check_report(errors, refused, TOL, f"{name} on {grid}")
        assert "input grad" in errors and comm.get("halo", 0) > 0, (name, sorted(errors)[:5], comm)
        if not name.startswith(("maxpool", "avgpool")):
            assert any(k.startswith("grad ") for k in errors), (name, sorted(errors)[:5])
    return res


def test_far_halo_exact_3x1():
    assert set(_check((3, 1))) == set(CASES)


@pytest.mark.slow  # a whole torchvision model on 3 ranks
def test_far_halo_exact_1x3_and_deeplab():
    assert set(_check((1, 3))) == set(CASES) | {"deeplabv3_mobilenet_v3_large"}
