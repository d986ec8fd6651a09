"""The window and resampling ops' fast paths and their reference path
(``rest_ds.spim.set_reference_paths``: every window through one all-to-all,
torch's op on it, torch's autograd) both equal one process: a conv/pool
stack, float64 at 1e-10, output, input and parameter gradients and one
optimizer step, on a 1x2 and an uneven 2x2 grid (one spawn per grid). The
autograd graph shows which path ran. Both paths move the same halo bytes,
and on a stride-1 stack exactly those of ``rest_ds.train.bench.analytic_bytes``
(the geometry's volume; with strides it scales the input partition, which
assumes aligned tiles, and these are not)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rest_ds.spim import SpatialMesh, TileLayout, comm_stats, parallelize, set_reference_paths, shard, to_local
from rest_ds.spim.verify import compare_sharded
from rest_ds.train.bench import analytic_bytes

from .harness import TOL64 as TOL
from .harness import check_report, grid_params, offset_scene, run_grid

H, W = 30, 34
LAYOUTS = {(1, 2): TileLayout((0, H), (0, 19, W)), (2, 2): TileLayout((0, 13, H), (0, 19, W))}
FAST = {"_BorderConv2dBackward", "_HaloConv2dBackward", "_BorderMaxPool2dBackward", "_HaloMaxPool2dBackward",
        "_HaloSumPool2dBackward", "_BorderUpsampleBackward"}


class ConvPool(nn.Module):
    """Each window op family and both fast paths of each: padded-tile (border
    strips) and assembled-window convs and max pools, avg pooling, ceil_mode,
    an even kernel with padding 'same' (one more after than before), and a
    bilinear x8 upsampling (its fast path recomputes the border strips)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 5)
        self.b = nn.Conv2d(4, 4, 3, stride=2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.c = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.e = nn.Conv2d(4, 4, (2, 4), padding="same")
        self.avg = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.ceil = nn.MaxPool2d(2, ceil_mode=True)
        self.d = nn.Conv2d(4, 2, 5, padding=2)

    def forward(self, x):
        y = self.pool(torch.relu(self.b(torch.relu(self.a(x)))))
        y = self.d(self.ceil(self.avg(self.e(torch.tanh(self.c(y))))))
        return F.interpolate(y, scale_factor=8, mode="bilinear")  # to a size no earlier map had


def same_stack() -> nn.Module:
    """Stride 1 throughout: every feature map keeps the input partition."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, (2, 4), padding="same"), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.MaxPool2d(3, 1, 1), nn.AvgPool2d(3, 1, 1),
                         nn.Conv2d(4, 2, 5, padding=2))


def _backward_nodes(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(type(f).__name__)
        todo.extend(n for n, _ in f.next_functions)
    return names


def _halo_bytes(model: nn.Module, x: torch.Tensor, mesh, layout) -> tuple[set[str], int]:
    """(backward node names, halo bytes all sp ranks sent) of one forward and
    backward; the input needs no gradient, so its halos travel forward only."""
    comm_stats().reset()
    y = to_local(parallelize(model, mesh)(shard(x, mesh, layout)))
    nodes = _backward_nodes(y)
    y.sum().backward()
    t = torch.tensor([comm_stats().bytes.get("halo", 0)], dtype=torch.int64)
    torch.distributed.all_reduce(t, group=mesh.sp_group)
    return nodes, int(t)


def _rank(grid):
    mesh = SpatialMesh.build(grid=grid)
    layout = LAYOUTS[grid]
    x = offset_scene(2, 3, (H, W), torch.float64)
    out = {}
    for reference in (False, True):
        before = set_reference_paths(reference)
        try:
            rep = compare_sharded(ConvPool, x, mesh, layout, train=True, step=True, dtype=torch.float64)
            nodes, halo = _halo_bytes(ConvPool().double(), x, mesh, layout)
            _, halo_same = _halo_bytes(same_stack().double(), x, mesh, layout)
        finally:
            set_reference_paths(before)
        out["reference" if reference else "fast"] = (rep.errors, rep.refused, nodes, halo, halo_same)
    out["analytic"] = analytic_bytes(same_stack(), tuple(x.shape), layout, dtype_bytes=8)["halo"]
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("grid", grid_params(LAYOUTS, (2, 2)))  # the uneven 2x2 in the fast tier
def test_fast_and_reference_paths_equal_one_process(grid):
    res = run_grid(_rank, grid)
    for path in ("fast", "reference"):
        errors, refused, _, halo, halo_same = res[path]
        check_report(errors, refused, TOL, f"{path} paths on {grid}")
        assert any(k.startswith("grad ") for k in errors), errors
        assert halo == res["fast"][3] > 0 and halo_same == res["analytic"] > 0, (path, halo, halo_same, res)
    fast_nodes, ref_nodes = res["fast"][2], res["reference"][2]
    # the fast run took both kinds of conv and of max pool path; the reference run none of them
    assert FAST <= fast_nodes, FAST - fast_nodes
    assert not FAST & ref_nodes and {"_HaloExchangeBackward", "ConvolutionBackward0"} <= ref_nodes, ref_nodes
