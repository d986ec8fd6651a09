"""Multi-temporal (Prithvi-EO-2.0 time series) input: scene key ``dates: T``.

* Exactness: a Prithvi-ViT + UPerNet segmentor built through the training
  config path (``build_model(..., dates=T)``: ``num_frames`` = T, ``in_chans`` = C)
  fed the scene's date-major ``(B, T*C, H, W)`` tile, T = 1..4 (and T = 4 with
  tubelets of 2 dates), one SGD train step on uneven tiles of a 1x2 and a 1x3
  grid vs one process on the whole scene, float64 at 1e-10 (one spawn per grid).
* The ``(B, T*C, H, W)`` input equals the model on ``(B, C, T, H, W)`` (the
  layout the Prithvi card describes).
* Data path: ``rest-ds data synthetic --dates T`` writes T * C bands with
  ``dates: T``; a rank's tile (every date) equals the slice of the whole scene
  and only its window is read.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from rest_ds.spim import SpatialMesh, TileLayout
from rest_ds.spim.verify import compare_sharded

from .harness import grid_id, offset_scene, run_grid

C, HW = 3, (32, 48)
LAYOUTS = {(1, 2): TileLayout((0, 32), (0, 16, 48)), (1, 3): TileLayout((0, 32), (0, 8, 32, 48))}
# name -> (dates T, tubelet size)
CASES = {"T1": (1, 1), "T2": (2, 1), "T3": (3, 1), "T4": (4, 1), "T4-tubelet2": (4, 2)}


def model_config(tubelet: int = 1) -> dict:
    return {"encoder": {"name": "prithvi_vit",
                        "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "indices": [0, 1],
                                   "tubelet_size": tubelet}},
            "decoder": {"name": "upernet", "channels": 16, "norm": "gn", "dropout": 0.0,
                        "kwargs": {"pool_scales": [1, 2], "ppm_norm": "none"}}}


def segmentor(dates: int, tubelet: int):
    from rest_ds.train.engine import build_model

    model, _ = build_model(model_config(tubelet), num_classes=4, in_chans=dates * C, dates=dates)
    return model.double()


def _run_grid(grid):
    mesh = SpatialMesh.build(grid=grid)
    out = {}
    for name, (t, tub) in CASES.items():
        x = offset_scene(2, t * C, HW, torch.float64)
        out[name] = compare_sharded(functools.partial(segmentor, t, tub), x, mesh, LAYOUTS[grid], train=True,
                                    step=True, seed=5, align=8)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("grid", list(LAYOUTS), ids=grid_id)
@pytest.mark.parametrize("case", list(CASES))
def test_prithvi_dates_exact_under_spim(grid, case):
    rep = run_grid(_run_grid, grid)[case]
    assert rep.refused is None, rep.refused
    t, tub = CASES[case]
    torch.manual_seed(0)
    names = {n for n, _ in segmentor(t, tub).named_parameters()}
    assert {f"grad {n}" for n in names} <= set(rep.errors)
    assert {f"param after step {n}" for n in names} <= set(rep.errors)
    assert {"output[0]", "input grad"} <= set(rep.errors)
    bad = rep.failures(1e-10)
    assert not bad, f"{case} on {grid}: " + ", ".join(f"{k}={v:.2e}" for k, v in sorted(bad.items())[:8])


def test_date_major_channels_are_the_frames():
    """(B, T*C, H, W) date-major = (B, C, T, H, W); out_channels follow T (concat fusion)."""
    t = 3
    torch.manual_seed(0)
    model = segmentor(t, 1).eval()
    x = offset_scene(1, t * C, HW, torch.float64)
    five = x.reshape(1, t, C, *HW).transpose(1, 2)
    with torch.no_grad():
        a = model.encoder(x)
        b = model.encoder(five)
        wrong = model.encoder(x.reshape(1, C, t, *HW))  # channel-major would be another input
    assert model.encoder.input_channels == t * C and model.encoder.out_channels[0] == t * 32
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.allclose(a[-1], wrong[-1])


def test_build_model_refuses_an_encoder_without_dates():
    from rest_ds.train.config import ConfigError
    from rest_ds.train.engine import build_model

    cfg = {"encoder": {"name": "timm_cnn", "kwargs": {"model_name": "resnet10t", "out_indices": [1, 2]}},
           "decoder": {"name": "fcn", "channels": 8}}
    with pytest.raises(ConfigError, match="time series of 2 dates"):
        build_model(cfg, num_classes=3, in_chans=2 * C, dates=2)


@pytest.mark.parametrize("fmt", ["hdf5", "tif"])
def test_time_series_tile_is_the_slice_of_the_whole_scene(tmp_path, fmt):
    from rest_ds.data.readers import IOCounter
    from rest_ds.data.samples import synthetic_cube, synthetic_hyperspectral
    from rest_ds.data.scene import Scene, SceneReader
    from rest_ds.data.tiles import read_rank_tile

    t, bands = 3, 4
    path = synthetic_hyperspectral(tmp_path / fmt, format=fmt, bands=bands, height=32, width=48, dates=t, seed=2)
    scene = Scene.from_yaml(path)
    assert scene.dates == t and len(scene.band_names) == t * bands and scene.band_names[bands] == "t1_400nm"
    cube, _, _ = synthetic_cube(bands=bands, height=32, width=48, dates=t, seed=2, nodata=-9999.0)
    # the phenology makes the dates differ, and the last class's spectrum differs from the first's only in time
    assert not np.allclose(cube[:bands], cube[bands:2 * bands], atol=0.01)
    with SceneReader(scene) as whole:
        assert whole.dates == t and whole.shape == (t * bands, 32, 48)
        full, full_valid = whole.read_image(slice(0, 32), slice(0, 48))
    np.testing.assert_array_equal(full_valid, cube[0] != -9999.0)
    np.testing.assert_array_equal(full[:, full_valid], cube[:, full_valid])
    layout = TileLayout((0, 16, 32), (0, 8, 48))
    for r in range(2):
        for c in range(2):
            counter = IOCounter()
            with SceneReader(Scene.from_yaml(path), counter=counter) as reader:
                tile = read_rank_tile(reader, layout, r, c, with_label=False)
            rows, cols = layout.tile(r, c)
            # invalid pixels (the nodata corner) are the fill value 0 in a tile
            np.testing.assert_array_equal(tile.image, np.where(full_valid, full, 0)[:, rows, cols])
            np.testing.assert_array_equal(tile.valid, full_valid[rows, cols])
            # every date of the tile, one date = one (C, h, w) block of the date-major bands
            x = tile.image.reshape(t, bands, *tile.image.shape[1:])
            v = full_valid[rows, cols]
            np.testing.assert_array_equal(x[t - 1][:, v], cube[(t - 1) * bands:, rows, cols][:, v])
            assert counter.reads and all(rec.rows == (rows.start, rows.stop) and rec.cols == (cols.start, cols.stop)
                                         for rec in counter.reads)


def test_dates_must_divide_the_bands(tmp_path):
    import yaml

    from rest_ds.data.errors import DataError
    from rest_ds.data.samples import synthetic_hyperspectral
    from rest_ds.data.scene import Scene, SceneReader

    path = synthetic_hyperspectral(tmp_path, bands=5, height=16, width=16)
    d = yaml.safe_load(path.read_text())
    d["dates"] = 2
    d.pop("band_names")
    with pytest.raises(DataError, match="not a multiple of the scene's dates: 2"):
        SceneReader(Scene.from_dict(d, root=tmp_path))
    d["dates"] = 0
    with pytest.raises(DataError, match="dates: must be >= 1, got 0"):
        Scene.from_dict(d, root=tmp_path)


def test_wavelengths_given_as_config_text():
    """configs/hyperspectral_128_hls.yaml lists the 128 bands in nm; the config reads them as text ("417"),
    scene band names are "417nm": both are wavelengths for band_rule: spectral (names stay names)."""
    from pathlib import Path

    from rest_ds.models.encoders.bands import band_mapping, wavelength
    from rest_ds.train.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "hyperspectral_128_hls.yaml")
    bands = cfg.model.encoder.bands
    assert len(bands) == 128 and [wavelength(b) for b in bands[:2]] == [400.0, 417.0]
    assert wavelength("417nm") == 417.0 and wavelength("RED") == 664.6
    assert wavelength("foo") is None and wavelength("nan") is None
    m = band_mapping(6, 128, ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"], bands, "spectral")
    # each new band interpolates the pretrained ones (rows scaled by 6/128 to keep the activation's scale)
    assert tuple(m.shape) == (128, 6) and bool((m >= 0).all())
    assert torch.allclose(m.sum(1), torch.full((128,), 6 / 128, dtype=m.dtype))
