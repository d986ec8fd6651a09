"""Third-party model zoo under SPIM: unmodified models, exact vs one process.

Models come from their own libraries with random weights (tests/zoo_models.py):
torchvision DeepLabV3 / LR-ASPP / FCN, timm CNN backbones (``features_only``:
every feature map is an output) and classifiers, transformers UperNet with a
ConvNeXt backbone. Each runs in float64, train mode, on two grids with tiles
of unequal size; ``compare_sharded`` checks every output, the input gradient,
every parameter gradient, every parameter after one SGD step and every buffer
(BatchNorm running statistics) against the same model in one process on the
same input, at 1e-10 relative (float64 isolates SPIM's arithmetic: a wrong
halo, bin or statistic shows up as 1e-4 or more, rounding as ~1e-14).

Zero-in-exact-arithmetic checks: a quantity whose exact value is 0 is pure
rounding in both runs, so its *relative* error is noise over noise. Examples
here: the gradient of the bias of a BatchNorm whose output only feeds a 1x1
conv and another train-mode BatchNorm (EfficientNet's ``bn3`` between blocks:
the next normalisation removes any constant shift), that bias after the SGD
step (it starts at 0), and the running mean of a BatchNorm whose input is a
bias-free conv of zero-mean normalised features. Such a check (a parameter
gradient, a stepped parameter or a buffer) is judged by its absolute error
against the scale of its kind: ``max|a - b| <= 1e-10 * max|r|`` over all the
model's parameter gradients (parameters, buffers) ``r`` of the reference; the
test prints how many checks needed that and their largest absolute error.

Alignment ``A`` is each model's deepest total stride (torchvision's dilated
ResNet-50: 8; dilated MobileNetV3: 16; timm / UperNet: 32). One spawn per grid
runs every case of that grid (rank start-up is the expensive part here).
"""
from __future__ import annotations

import math
import time

import pytest
import torch

from rest_ds.spim import SpatialMesh, TileLayout, check_aligned
from rest_ds.spim.errors import SPIMError
from rest_ds.spim.verify import CLASSES, NOISE_K, compare_sharded

from . import zoo_models as Z
from .harness import TOL64 as TOL
from .harness import offset_scene, run_grid, zero_reference
SEED = 5

# Scenes and their uneven layouts (each tile at least the deepest layer's halo:
# dilated ResNet-50's layer4 needs 4 px at stride 8, MobileNetV3's dilated 5x5
# 4 px at stride 16, at stride 32 ConvNeXt's 7x7 3 px and MixNet's 9x9 4 px
# for a middle tile). On the 1x3 split of the MobileNetV3 scene, ASPP's rate-36
# 3x3 conv on the 6x8 stride-16 map reads (clipped to the scene) the whole map:
# its halo comes from beyond the adjacent tile (the far exchange, one
# all-to-all, rest_ds/spim/halo.py).
SCENES = {
    # name -> (batch, (H, W), align, {grid: TileLayout})
    "r50": (2, (96, 96), 8, {(1, 2): TileLayout((0, 96), (0, 40, 96)),
                             (2, 2): TileLayout((0, 56, 96), (0, 32, 96))}),
    "mnv3": (2, (96, 128), 16, {(1, 2): TileLayout((0, 96), (0, 48, 128)),
                                (2, 2): TileLayout((0, 32, 96), (0, 80, 128)),
                                (1, 3): TileLayout((0, 96), (0, 48, 96, 128))}),
    # MixNet's 9x9 depthwise conv at stride 32 needs a 4 px (128 px) middle tile
    "s32": (2, (224, 96), 32, {(1, 2): TileLayout((0, 224), (0, 32, 96)),
                               (3, 1): TileLayout((0, 64, 192, 224), (0, 96))}),
}

# case -> (factory, scene)
CASES = {
    "tv_deeplabv3_mobilenet_v3_large": (Z.tv_deeplabv3_mobilenet_v3_large, "mnv3"),
    "tv_lraspp_mobilenet_v3_large": (Z.tv_lraspp_mobilenet_v3_large, "mnv3"),
    "tv_deeplabv3_resnet50": (Z.tv_deeplabv3_resnet50, "r50"),
    "tv_fcn_resnet50": (Z.tv_fcn_resnet50, "r50"),
    "timm_efficientnet_b0_features": (Z.timm_efficientnet_b0_features, "s32"),
    "timm_tf_efficientnet_b0_features": (Z.timm_tf_efficientnet_b0_features, "s32"),
    "timm_efficientnet_b0_classifier": (Z.timm_efficientnet_b0_classifier, "s32"),
    "timm_tf_efficientnetv2_b0_features": (Z.timm_tf_efficientnetv2_b0_features, "s32"),
    "timm_mixnet_s_features": (Z.timm_mixnet_s_features, "s32"),
    "timm_hrnet_w18_small_features": (Z.timm_hrnet_w18_small_features, "s32"),
    "timm_hrnet_w18_small_v2_features": (Z.timm_hrnet_w18_small_v2_features, "s32"),
    "timm_regnetx_002_features": (Z.timm_regnetx_002_features, "s32"),
    "timm_regnety_002_features": (Z.timm_regnety_002_features, "s32"),
    "timm_regnety_002_classifier": (Z.timm_regnety_002_classifier, "s32"),
    "timm_regnetz_005_features": (Z.timm_regnetz_005_features, "s32"),
    "timm_convnext_atto_features": (Z.timm_convnext_atto_features, "s32"),
    "timm_convnext_zepto_rms_features": (Z.timm_convnext_zepto_rms_features, "s32"),
    "timm_convnextv2_atto_features": (Z.timm_convnextv2_atto_features, "s32"),
    "timm_convnext_atto_ols_features": (Z.timm_convnext_atto_ols_features, "s32"),
    "timm_mobilenetv3_large_075_features": (Z.timm_mobilenetv3_large_075_features, "s32"),
    "timm_resnet26d_features": (Z.timm_resnet26d_features, "s32"),
    "timm_resnet18d_os8_features": (Z.timm_resnet18d_os8_features, "s32"),
    "timm_gcresnet33ts_features": (Z.timm_gcresnet33ts_features, "s32"),
    "hf_upernet_convnext": (Z.hf_upernet_convnext, "s32"),
}

GRIDS = sorted({g for _, _, _, layouts in SCENES.values() for g in layouts})


def _cases_on(grid, only=None):
    return [n for n, (_, scene) in CASES.items() if grid in SCENES[scene][3] and (only is None or n in only)]


def zoo_reports(grid: tuple[int, int], only=None) -> dict:
    """Rank body: every case of ``grid``; returns ``case -> (VerifyReport or the
    SPIMError's message, seconds)``."""
    mesh = SpatialMesh.build(grid=grid)
    out = {}
    for name in _cases_on(grid, only):
        factory, scene = CASES[name]
        batch, hw, align, layouts = SCENES[scene]
        x = offset_scene(batch, 3, hw, torch.float64)
        t0 = time.perf_counter()
        try:
            rep = compare_sharded(factory, x, mesh, layouts[grid], train=True, step=True, seed=SEED,
                                  align=align, dtype=torch.float64)
        except SPIMError as e:  # raised alike on every rank (SPIM's contract): report, go on
            rep = f"{type(e).__name__}: {e}"
        out[name] = (rep, time.perf_counter() - t0)
    return out




# (grid, case) for every grid a case's scene is tiled on
RUNS = [(g, n) for g in GRIDS for n in _cases_on(g)]


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("grid,case", RUNS, ids=[f"{g[0]}x{g[1]}-{n}" for g, n in RUNS])
def test_zoo_model_exact(grid, case):
    rep, seconds = run_grid(zoo_reports, grid)[case]
    assert not isinstance(rep, str), rep
    assert rep.refused is None, rep.refused
    assert rep.grid == grid
    factory, _ = CASES[case]
    model = factory()
    expected = {"input grad"} | {f"grad {n}" for n, _ in model.named_parameters()}
    expected |= {f"param after step {n}" for n, _ in model.named_parameters()}
    expected |= {f"buffer {n}" for n, _ in model.named_buffers()}
    missing = expected - set(rep.errors)
    assert not missing, sorted(missing)[:10]
    assert any(k.startswith("output[") for k in rep.errors)
    assert rep.comm_bytes.get("halo", 0) > 0, rep.comm_bytes
    zero = zero_reference(rep, TOL)
    bad = {k: v for k, v in rep.failures(TOL).items() if k not in zero}
    worst = {g: max((v for k, v in rep.errors.items() if k.startswith(g) and k not in zero), default=0.0)
             for g in ("output", "input grad", "grad ", "param after step", "buffer")}
    print(f"{grid[0]}x{grid[1]} {case} ({seconds:.0f} s): max rel error "
          + " ".join(f"{g.strip()} {v:.1e}," for g, v in worst.items())
          + f" zero-reference {len(zero)}" + (f" (max abs {max(zero.values()):.1e})" if zero else ""))
    assert not bad, f"{len(bad)} of {len(rep.errors)} above {TOL}: " + ", ".join(
        f"{k}={v:.2e} (abs {rep.abs_errors.get(k, math.nan):.1e})"
        for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:8])


def test_zoo_layouts_are_uneven_and_aligned():
    for name, (batch, hw, align, layouts) in SCENES.items():
        assert len(layouts) >= 2, name
        for grid, layout in layouts.items():
            assert layout.grid == grid and layout.shape == hw, (name, grid)
            check_aligned(layout.rows, align)
            check_aligned(layout.cols, align)
            sizes = [b - a for part in (layout.rows, layout.cols) for a, b in zip(part[:-1], part[1:])
                     if len(part) > 2]
            assert len(set(sizes)) > 1, (name, grid, sizes)
    assert math.prod(max(g) for g in GRIDS) > 1
    for name, (batch, hw, align, layout) in VERIFY_SCENES.items():
        assert layout.grid == VERIFY_GRID and layout.shape == hw, name
        check_aligned(layout.cols, align)
        assert len({b - a for a, b in zip(layout.cols[:-1], layout.cols[1:])}) > 1, name


# --- `rest-ds verify` at its defaults on the whole zoo -------------------------
# The default verdict (float32, the reference's rounding noise measured from a
# float64 reference, classes PASS / ROUNDING / ZERO-REF / FAIL at tol 1e-5,
# rest_ds/spim/verify.py) on every zoo factory, train mode, one SGD step, on one
# uneven 1x2 grid. The transformers below are exact in float64 in their own
# tests (tests/test_models_swin.py, tests/test_spim_sr_attention.py); their
# scenes are those tests'.
VERIFY_TOL = 1e-5  # rest-ds verify's default --tol
VERIFY_GRID = (1, 2)
VERIFY_SCENES = {
    "swin": (2, (128, 320), 128, TileLayout((0, 128), (0, 256, 320))),
    "sr32": (2, (64, 152), 32, TileLayout((0, 64), (0, 64, 152))),
    "cli": (2, (128, 160), 32, TileLayout((0, 128), (0, 96, 160))),  # near rest-ds verify's defaults
}
VERIFY_EXTRA = {
    "timm_swin_tiny_features": (Z.timm_swin_tiny_features, "swin"),
    "timm_swinv2_tiny_features": (Z.timm_swinv2_tiny_features, "swin"),
    "hf_swin_backbone": (Z.hf_swin_backbone, "swin"),
    "timm_pvt_v2_b0_features": (Z.timm_pvt_v2_b0_features, "sr32"),
    "hf_segformer": (Z.hf_segformer, "sr32"),
    "timm_ese_vovnet19b_dw_features": (Z.timm_ese_vovnet19b_dw_features, "cli"),
}


def _verify_scene(case: str):
    if case in VERIFY_EXTRA:
        factory, scene = VERIFY_EXTRA[case]
        return (factory, *VERIFY_SCENES[scene])
    factory, scene = CASES[case]
    batch, hw, align, layouts = SCENES[scene]
    return factory, batch, hw, align, layouts[VERIFY_GRID]


def default_verify_reports(grid: tuple[int, int]) -> dict:
    """Rank body: every zoo case in float32 with the measured noise, as
    ``rest-ds verify --train`` (``verify(..., noise_floor=True)`` runs exactly
    this ``compare_sharded``); ``case -> (VerifyReport or message, seconds)``."""
    mesh = SpatialMesh.build(grid=grid)
    out = {}
    for name in list(CASES) + list(VERIFY_EXTRA):
        factory, batch, hw, align, layout = _verify_scene(name)
        x = offset_scene(batch, 3, hw, torch.float32)
        t0 = time.perf_counter()
        try:
            rep = compare_sharded(factory, x, mesh, layout, train=True, step=True, seed=SEED, align=align,
                                  dtype=torch.float32, noise_floor=True, confirm_tol=VERIFY_TOL)
        except SPIMError as e:
            rep = f"{type(e).__name__}: {e}"
        out[name] = (rep, time.perf_counter() - t0)
    return out


def _verdict_margin(rep) -> float:
    """max over the checks of ``|sharded - ref| / (tol * |ref| + k * noise)`` (FAIL above 1)."""
    return max((rep.abs_errors[k] / (VERIFY_TOL * rep.sizes[k] + NOISE_K * rep.noise_abs[k])
                for k in rep.noise_abs if VERIFY_TOL * rep.sizes[k] + NOISE_K * rep.noise_abs[k] > 0), default=0.0)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_zoo_default_verify_verdict():
    reports = run_grid(default_verify_reports, VERIFY_GRID)
    bad = {}
    for name, (rep, seconds) in reports.items():
        if isinstance(rep, str) or rep.refused is not None:
            bad[name] = rep if isinstance(rep, str) else f"refused: {rep.refused}"
            print(f"{name}: {bad[name]}")
            continue
        cls = rep.classify(VERIFY_TOL)
        counts = {c: sum(1 for v in cls.values() if v == c) for c in CLASSES}
        fails = {k: rep.errors[k] for k, c in cls.items() if c == "FAIL"}
        top = {c: max((rep.errors[k] for k, v in cls.items() if v == c), default=0.0) for c in CLASSES}
        zero_abs = max((rep.abs_errors[k] for k, v in cls.items() if v == "ZERO-REF"), default=0.0)
        print(f"{VERIFY_GRID[0]}x{VERIFY_GRID[1]} {name} ({seconds:.0f} s): "
              + " ".join(f"{c} {n}" for c, n in counts.items())
              + f"; max rel error {rep.max_error:.1e} (PASS {top['PASS']:.1e}, ROUNDING {top['ROUNDING']:.1e},"
              f" ZERO-REF abs {zero_abs:.1e}); largest error / allowed {_verdict_margin(rep):.2f}; "
              + ("FAIL" if fails else "PASS"))
        assert len(cls) > 2 and any(k.startswith("output[") for k in cls), name
        assert rep.noise_abs, name  # the verdict used a measured noise
        if fails:
            bad[name] = ", ".join(f"{k}={v:.2e} (noise {rep.noise_floor.get(k, math.nan):.1e})"
                                  for k, v in sorted(fails.items(), key=lambda kv: -kv[1])[:5])
    assert not bad, bad


# --- vector norms over the scene (ConvNeXt-V2's GlobalResponseNorm) -----------

class _NormNet(torch.nn.Module):
    def __init__(self, which: str):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.which = which

    def forward(self, x):
        y = self.conv(x)
        w = self.which
        if w == "grn_nhwc":  # timm GlobalResponseNorm, channels-last
            z = y.permute(0, 2, 3, 1)
            return z * z.norm(p=2, dim=(1, 2), keepdim=True)
        if w == "fro_all":
            return y + torch.norm(y)
        if w == "l1_hw":
            return y * torch.linalg.vector_norm(y, 1, dim=(-2, -1), keepdim=True)
        if w == "l3_chw":
            return torch.linalg.vector_norm(y, 3, dim=(1, 2, 3))
        if w == "linf_hw":
            return torch.linalg.vector_norm(y, float("inf"), dim=(2, 3))
        if w == "linalg_flat":
            return torch.linalg.norm(y)
        if w == "channels":  # not over the sharded dims: the tile's own norm
            return y / y.norm(dim=1, keepdim=True)
        if w == "one_dim":
            return y.norm(dim=2)
        if w == "matrix":
            return torch.linalg.norm(y, ord="nuc", dim=(2, 3))
        raise ValueError(w)


NORMS = ("grn_nhwc", "fro_all", "l1_hw", "l3_chw", "linf_hw", "linalg_flat", "channels")
NORM_REFUSED = ("one_dim", "matrix")


def _norm_reports(grid):
    import functools

    mesh = SpatialMesh.build(grid=grid)
    x = offset_scene(2, 3, (12, 10), torch.float64)
    layout = TileLayout((0, 5, 12), (0, 3, 10))
    return {w: compare_sharded(functools.partial(_NormNet, w), x, mesh, layout, train=True, step=True,
                               dtype=torch.float64)
            for w in NORMS + NORM_REFUSED}


def test_norm_over_scene_exact_or_refused():
    reports = run_grid(_norm_reports, (2, 2))
    for w in NORMS:
        rep = reports[w]
        assert rep.refused is None, (w, rep.refused)
        assert rep.errors and rep.max_error <= TOL, (w, rep.errors)
    assert "only one of the sharded dims" in reports["one_dim"].refused
    assert "matrix norm" in reports["matrix"].refused and "norm" in reports["matrix"].refused
