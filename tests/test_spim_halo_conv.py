"""The assembled-window conv path (``window._HaloConv2d``) equals one process in
every geometry it can be given, also when only some ranks take it.

SPIM picks a conv's path per rank: the border strips (``_BorderConv2d``) where
the padded tile has exactly this tile's outputs, else the window. The choice
depends on the tile's position (a valid conv sends the first tile to the
window, the middle ones to the strips), so one conv can run both ways at once.
The window path used to assemble its window NCHW whatever the tile's layout:
its output of a channels-last tile came back NCHW where the strips (and one
process) give channels-last, and a group norm after it, whose scene
statistics gather per-group moments of an NCHW tile but per-channel ones of a
channels-last tile, mixed unlike buffers across ranks (float64 errors of
order 1: the ViTDet pyramid + FPN decoders with commit 1c9099a's size rule,
and, without any forcing, a valid conv then a group norm on the uneven 1x3
grid below). The group norm now gathers per-group moments from every tile
whatever its layout, which also covers a channels-last map whose tile on one
rank is 1 x 1 (contiguous in both layouts: the 2x2 grid below).

Each case is conv -> GroupNorm -> "same" conv, float64 vs one process (output,
input and parameter gradients) at 1e-10, on uneven 1x2, 2x2 and 1x3 grids,
one spawn per grid. Modes: ``all``: every rank's convs forced to the window
path (a sweep of kernel, stride, padding, dilation, groups, even kernels with
'same', halos wider than a neighbour's tile); ``rank0``: the first conv forced
to it on sp rank 0 only (the other ranks take their own choice); ``natural``:
no forcing. The autograd node of each conv's output says which path ran.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from rest_ds.spim import SpatialMesh, SpatialTensor, TileLayout, to_local
from rest_ds.spim.ops import window
from rest_ds.spim.verify import compare_sharded

from .harness import TOL64 as TOL
from .harness import check_report, grid_params, offset_scene, run_ranks

# uneven tilings of a 12 x 18 scene; the 1x3 middle tile (4 columns) is narrower
# than the halo of a kernel of extent 9 (a far plan)
LAYOUTS = {(1, 2): TileLayout((0, 12), (0, 7, 18)), (2, 2): TileLayout((0, 5, 12), (0, 11, 18)),
           (1, 3): TileLayout((0, 12), (0, 5, 9, 18))}
CIN, COUT = 4, 6
# name -> Conv2d keyword arguments (in CIN, out COUT)
CONVS = {
    "k3-same": dict(kernel_size=3, padding=1),
    "k3-valid": dict(kernel_size=3),
    "k5-s2-p2": dict(kernel_size=5, stride=2, padding=2),
    "k3-s2-valid": dict(kernel_size=3, stride=2),
    "k4-s4-patchify": dict(kernel_size=4, stride=4),  # tile origins at every stride phase
    "k3-s3-p1": dict(kernel_size=3, stride=3, padding=1),
    "k3-d2-p2": dict(kernel_size=3, dilation=2, padding=2),
    "k3-d3-p1": dict(kernel_size=3, dilation=3, padding=1),  # padding below the halo: the map shrinks
    "k2x4-same": dict(kernel_size=(2, 4), padding="same"),  # one more after than before
    "k3x1-g2": dict(kernel_size=(3, 1), padding=(1, 0), groups=2),
    "k5-d2-valid": dict(kernel_size=5, dilation=2),  # extent 9: wider than the 1x3 middle tile
    "k1-s2": dict(kernel_size=1, stride=2),
    "k3-s2-p1-g2-nobias": dict(kernel_size=3, stride=2, padding=1, groups=2, bias=False),
}
# (case name, conv, mode, channels-last input)
CASES = [(f"all-{n}-{'cl' if i % 2 else 'nchw'}", n, "all", bool(i % 2)) for i, n in enumerate(CONVS)]
CASES += [(f"rank0-{n}-cl", n, "rank0", True) for n in ("k3-same", "k5-s2-p2", "k3-valid", "k3-d2-p2")]
CASES += [("natural-k3-valid-cl", "k3-valid", "natural", True), ("natural-k3-valid-nchw", "k3-valid", "natural", False),
          # on 2x2, sp rank 1's output is 1 x 1: NCHW- and channels-last-contiguous at once
          ("natural-k4-s4-cl", "k4-s4-patchify", "natural", True)]

_PATHS: dict[str, tuple] = {}  # this rank's (path, local output size) of the first conv of the case being run


class ConvNormConv(nn.Module):
    """conv (the case) -> GroupNorm (statistics over the scene: one gather) -> "same" conv."""

    def __init__(self, conv: dict, channels_last: bool, name: str):
        super().__init__()
        self.channels_last, self.name = channels_last, name
        self.conv = nn.Conv2d(CIN, COUT, **conv)
        self.norm = nn.GroupNorm(2, COUT)
        self.head = nn.Conv2d(COUT, 3, 3, padding=1)

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = self.conv(x)
        if isinstance(y, SpatialTensor):  # the sharded run (the reference is a plain tensor)
            _PATHS[self.name] = (type(to_local(y).grad_fn).__name__, tuple(to_local(y).shape[-2:]))
        return self.head(self.norm(y))


@contextlib.contextmanager
def _window_path(on: bool):
    """Send every conv of this rank to ``_HaloConv2d`` (``on``): its padded-tile
    geometry is withheld, as for a tile whose window the padded tile does not fit."""
    saved = window._border_geometry
    if on:
        window._border_geometry = lambda *args: None
    window._conv_geometry.cache_clear()
    try:
        yield
    finally:
        window._border_geometry = saved
        window._conv_geometry.cache_clear()


def _factory(name: str, conv: str, mode: str, cl: bool, forced: bool):
    def make():
        m = ConvNormConv(CONVS[conv], cl, name)
        if forced and mode == "rank0":  # the first conv only: entered before it, left after it
            stack = contextlib.ExitStack()
            m.conv.register_forward_pre_hook(lambda *_: stack.enter_context(_window_path(True)) and None)
            m.conv.register_forward_hook(lambda *_: stack.close())
        return m
    return make


def _rank(grid):
    mesh = SpatialMesh.build(grid=grid)
    layout = LAYOUTS[grid]
    rank0 = mesh.sp_index == 0
    out = {}
    for name, conv, mode, cl in CASES:
        forced = mode == "all" or (mode == "rank0" and rank0)
        x = offset_scene(2, CIN, layout.shape, torch.float64)
        with _window_path(mode == "all"):
            rep = compare_sharded(_factory(name, conv, mode, cl, forced), x, mesh, layout, train=True, step=True,
                                  dtype=torch.float64)
        out[name] = (rep.errors, rep.refused, *_PATHS.pop(name, (None, None)))
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("grid", grid_params(LAYOUTS, (1, 3)))  # 1x3: the paths mix without forcing
def test_window_conv_path_equals_one_process(grid):
    per_rank = run_ranks(_rank, grid[0] * grid[1], grid)
    for name, conv, mode, cl in CASES:
        errors, refused, _, _ = per_rank[0][name]
        check_report(errors, refused, TOL, f"{name} on {grid}")
        assert any(k.startswith("grad conv.") for k in errors), sorted(errors)
        paths = [r[name][2] for r in per_rank]
        if mode in ("all", "rank0"):  # the window path ran where it was forced
            forced = paths if mode == "all" else paths[:1]
            assert set(forced) == {"_HaloConv2dBackward"}, (name, paths)
        if mode == "natural" and conv == "k3-valid" and grid == (1, 3):  # first tile: window; middle: strips
            assert paths[0] == "_HaloConv2dBackward" and paths[1] == "_BorderConv2dBackward", paths
    # the forced rank-0-only cases ran both paths at once somewhere (the case the layout fix is for)
    mixed = [n for n, _, mode, _ in CASES if mode == "rank0" and len({r[n][2] for r in per_rank}) == 2]
    assert mixed, "no rank-0-only case mixed the paths"
    if grid == (2, 2):  # the group norm case of a tile whose layout is ambiguous
        assert (1, 1) in [r["natural-k4-s4-cl"][3] for r in per_rank]
