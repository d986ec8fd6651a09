"""Host staging of SPIM's collectives (CUDA tensors on a gloo group).

Ranks sharing one GPU talk over gloo, which moves host memory only, so every
SPIM collective copies device tensors to the host and received buffers back.
Without a GPU the same code paths run here by forcing staging of CPU tensors
(``comm._FORCE_STAGING``): a missing copy-back leaves receive buffers empty and
the sharded result wrong."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from rest_ds.spim import SpatialMesh, TileLayout, comm
from rest_ds.spim.verify import compare_sharded

from .harness import TOL32, check_report, grid_params, run_grid
from .nets import TOKENS_HW, TokenBlock

H, W = TOKENS_HW

LAYOUTS = {(1, 2): TileLayout((0, H), (0, 5, W)), (1, 3): TileLayout((0, H), (0, 4, 9, W))}


class ConvAttnPool(nn.Module):
    """halo conv + whole-scene BatchNorm + global attention + global pooling."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 3, padding=1, bias=False)  # a bias before BatchNorm has zero gradient
        self.bn = nn.BatchNorm2d(24)
        self.attn = TokenBlock(heads=4)   # Ulysses on 1x2, all-gather K/V on 1x3
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        y = self.attn(torch.relu(self.bn(self.conv(x))))
        return y, self.pool(y)


def _rank(grid):
    mesh = SpatialMesh.build(grid=grid)
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    out = {}
    for staged in (False, True):
        comm._FORCE_STAGING = staged
        try:
            rep = compare_sharded(ConvAttnPool, x, mesh, LAYOUTS[grid], train=True, step=True)
        finally:
            comm._FORCE_STAGING = False
        out[staged] = (rep.errors, rep.refused, rep.comm_bytes)
    return out


@pytest.mark.parametrize("grid", grid_params(LAYOUTS, (1, 2)))
def test_staged_collectives_are_exact(grid):
    res = run_grid(_rank, grid)
    for staged, (errors, refused, _) in res.items():
        check_report(errors, refused, TOL32, f"staged={staged} on {grid}")
    assert res[True][2] == res[False][2], "staging changed the accounted bytes"
    kinds = set(res[True][2])
    assert {"halo", "all_reduce"} <= kinds and kinds & {"all_to_all", "all_gather"}, kinds


@pytest.mark.slow
@pytest.mark.launcher
def test_verify_device_cuda_without_gpu_is_a_clear_error():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, also where there is one
    r = subprocess.run([sys.executable, "-m", "rest_ds.cli", "verify", "rest_ds.models.zoo:resnet18_upernet",
                        "--input-shape", "1,3,64,64", "--grid", "1x2", "--device", "cuda"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stdout + r.stderr  # usage error, as for any bad argument
    assert "no CUDA device" in r.stderr and "Traceback" not in r.stderr
