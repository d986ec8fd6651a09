"""Whole models under SPIM vs one process, in training mode with BatchNorm.

Unmodified timm ``resnet18`` and ``convnext_nano`` (``features_only=True``)
feeding the UPerNet head (plus the tiny CNN variant), random weights, on uneven
tiles aligned to 32 (the deepest total stride) of grids 1x2, 2x2 and 1x3:
outputs, input grad, every parameter grad, every parameter after one SGD step
and every buffer (BatchNorm running stats, batch counters) are compared with
one process. One spawn per grid runs every case.

Two precisions, because of one ill-conditioned layer:

* float32, batch 4, tolerance 1e-5 (docs/design.md's contract).
* float64, batch 2, tolerance 1e-10. With batch 2 the BatchNorm after PPM's
  1x1 bin normalises two values per channel; for the channels where the two
  happen to be close (variance near ``eps``) it amplifies rounding by orders
  of magnitude, so in float32 the one-process reference itself is up to ~3e-5
  away from the float64 result on that branch's conv weight gradient, and
  any other summation order (SPIM's tile sums) lands as far away. In float64
  the same comparison isolates SPIM's arithmetic: a wrong halo, bin or
  statistic shows up as a relative error of 1e-4 or more, rounding as ~1e-13.

The input is noise plus a per-image, per-band offset: a batch of different
scenes. (With pure i.i.d. noise every image has the same global means, which
makes that BatchNorm even more ill-conditioned.)
"""
from __future__ import annotations

import functools

import pytest
import torch

from rest_ds.models import Segmentor, UPerHead, convnext_nano_upernet, resnet18_upernet, tiny_cnn_upernet
from rest_ds.models.decoders import PPM
from rest_ds.spim import TileLayout, check_aligned

from .harness import TOL, expected_check_names, grid_id, offset_scene, run_grid, train_step_reports

ALIGN = 32


def _double(factory):
    return factory().double()


# A narrow head keeps the suite fast; the backbones are the unmodified timm models.
_R18 = functools.partial(resnet18_upernet, channels=32)
_CNX = functools.partial(convnext_nano_upernet, channels=32)
# case -> (factory, dtype, batch)
CASES = {
    "resnet18_upernet-fp32-b4": (_R18, torch.float32, 4),
    "resnet18_upernet-fp64-b2": (functools.partial(_double, _R18), torch.float64, 2),
    "convnext_nano_upernet-fp32-b4": (_CNX, torch.float32, 4),
    "convnext_nano_upernet-fp64-b2": (functools.partial(_double, _CNX), torch.float64, 2),
    "tiny_cnn_upernet-fp32-b4": (tiny_cnn_upernet, torch.float32, 4),
}

# Uneven tilings on multiples of 32 (none is the even split) of a 96 x 160 scene
# (deepest feature map 3 x 5). For 1x3 the scene is 224 wide: ConvNeXt's 7x7
# depthwise conv needs 3 columns of halo at stride 32, so a tile between two
# others must be at least 3 x 32 = 96 px wide (a narrower middle tile is refused).
LAYOUTS = {
    (1, 2): TileLayout((0, 96), (0, 64, 160)),
    (2, 2): TileLayout((0, 64, 96), (0, 64, 160)),
    (1, 3): TileLayout((0, 96), (0, 96, 192, 224)),
}


def _run_grid(grid):
    return train_step_reports(grid, CASES, LAYOUTS, 3, seed=3, align=ALIGN)


@pytest.fixture(scope="module", params=list(LAYOUTS), ids=grid_id)
def grid_reports(request):
    return request.param, run_grid(_run_grid, request.param)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_model_train_step_exact(grid_reports, case):
    grid, reports = grid_reports
    factory, dtype, _ = CASES[case]
    rep = reports[case]
    assert rep.refused is None, rep.refused
    assert rep.grid == grid
    # every output, gradient, stepped parameter and BatchNorm buffer was compared
    x = offset_scene(2, 3, LAYOUTS[(1, 2)].shape, dtype)
    missing = expected_check_names(factory().train(), x, every_param=True) - set(rep.errors)
    assert not missing, sorted(missing)[:10]
    assert any(k.endswith("running_var") for k in rep.errors)
    assert rep.comm_bytes.get("halo", 0) > 0 and rep.comm_bytes.get("all_reduce", 0) > 0, rep.comm_bytes
    worst = max(rep.errors, key=rep.errors.get)
    print(f"{grid[0]}x{grid[1]} {case}: max rel error {rep.errors[worst]:.2e} ({worst}) over {len(rep.errors)} tensors")
    bad = rep.failures(TOL[dtype])
    assert not bad, f"{len(bad)} of {len(rep.errors)} above {TOL[dtype]}: " + ", ".join(
        f"{k}={v:.2e}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:8])


def test_layouts_are_uneven_and_aligned():
    for grid, layout in LAYOUTS.items():
        assert layout.grid == grid
        check_aligned(layout.rows, ALIGN)
        check_aligned(layout.cols, ALIGN)
        even = TileLayout.even(*layout.shape, grid, ALIGN)
        assert layout != even or grid == (1, 1)


# --- single-process checks of the plain modules -------------------------------

def test_factories_shapes_and_alignment():
    x = torch.randn(2, 4, 64, 96)
    for factory in (resnet18_upernet, convnext_nano_upernet, tiny_cnn_upernet):
        model = factory(num_classes=5, in_chans=4).eval()
        assert isinstance(model, Segmentor) and model.align == 32
        with torch.no_grad():
            assert model(x).shape == (2, 5, 64, 96)


def test_uperhead_matches_hand_computation():
    torch.manual_seed(0)
    head = UPerHead([4, 6], channels=5, num_classes=3, pool_scales=(1, 2), dropout=0.0).eval()
    f0, f1 = torch.randn(2, 4, 8, 12), torch.randn(2, 6, 4, 6)

    def up(t, size):
        return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)

    with torch.no_grad():
        psp = [up(b(f1), (4, 6)) for b in head.psp_modules]
        top = head.bottleneck(torch.cat([f1, *psp], 1))
        lat = head.lateral_convs[0](f0) + up(top, (8, 12))
        fused = head.fpn_bottleneck(torch.cat([head.fpn_convs[0](lat), up(top, (8, 12))], 1))
        assert torch.equal(head([f0, f1]), head.conv_seg(fused))
    with pytest.raises(ValueError, match="expects 2 feature maps"):
        head([f0])


def test_ppm_output_sizes():
    ppm = PPM((1, 3, 6), 4, 2).eval()
    outs = ppm(torch.randn(1, 4, 5, 7))
    assert [tuple(o.shape) for o in outs] == [(1, 2, 5, 7)] * 3
