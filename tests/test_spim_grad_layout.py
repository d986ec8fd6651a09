"""Gradients in channels-last layout through SPIM's backward (halo.dense_grad).

Maps made from tokens (``x.permute(0, 3, 1, 2)`` after a linear over channels,
as SegFormer's head and Mix-FFN make them) are channels-last, and the gradient
a ``torch.cat`` over channels hands each input is a non-dense channel slice of
a channels-last tensor. SPIM's conv, bilinear-upsample and BatchNorm backwards
use a dense gradient as it is and make a non-dense one dense in its own
layout (an NCHW copy cost SegFormer-B0's head more than the backward itself).
Checked: the layout rule itself, and a float64 train step of a small
channels-last head on an uneven 1x2 grid against one process.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rest_ds.spim import TileLayout
from rest_ds.spim.halo import dense_grad

from .harness import TOL64, check_report, run_grid, train_step_reports

LAYOUT = {(1, 2): TileLayout((0, 16), (0, 16, 40))}  # uneven: 16 | 24 columns, borders on multiples of 8


def test_dense_grad_keeps_dense_layouts_and_copies_slices_channels_last():
    g = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    assert dense_grad(g) is g
    cl = g.contiguous(memory_format=torch.channels_last)
    assert dense_grad(cl) is cl and dense_grad(cl, like=g) is cl
    wide = torch.randn(2, 5, 7, 12, dtype=torch.float64).permute(0, 3, 1, 2)  # channels-last, 12 channels
    part = wide[:, 3:9]  # what cat's backward hands one input: not dense in any layout
    assert not part.is_contiguous() and not part.is_contiguous(memory_format=torch.channels_last)
    d = dense_grad(part)
    assert d.is_contiguous(memory_format=torch.channels_last) and torch.equal(d, part)
    expanded = torch.ones(1, 1, 1, 1, dtype=torch.float64).expand(2, 6, 5, 7)  # the gradient of y.sum()
    d = dense_grad(expanded)
    assert d.is_contiguous() and torch.equal(d, expanded)
    d = dense_grad(part, like=g)  # like: an NCHW input of the op
    assert d.is_contiguous() and torch.equal(d, part)


class ChannelsLastHead(nn.Module):
    """Token-style maps (channels-last): a linear over channels, a strided halo
    conv, bilinear x2 upsampling, a cat over channels, whole-scene BatchNorm."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.proj = nn.Linear(3, c)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.fuse = nn.Conv2d(2 * c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.out = nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, x):
        t = self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # channels-last map
        d = F.relu(self.dw(self.down(t)))  # nonlinear before the BatchNorm: no bias gradient is zero
        up = F.interpolate(d, scale_factor=2, mode="bilinear", align_corners=False)
        y = F.relu(self.bn(self.fuse(torch.cat([up, F.gelu(t)], dim=1))))
        return self.out(y)


def _rank(grid):
    cases = {"cl_head": (lambda: ChannelsLastHead().double(), torch.float64, 2)}
    return train_step_reports(grid, cases, LAYOUT, 3, seed=4, align=8)


def test_channels_last_head_train_step_exact():
    rep = run_grid(_rank, (1, 2))["cl_head"]
    check_report(rep.errors, rep.refused, TOL64, "channels-last head, 1x2 float64")
    assert any(k.startswith("grad ") for k in rep.errors) and "input grad" in rep.errors
    assert rep.comm_bytes.get("halo", 0) > 0, rep.comm_bytes
