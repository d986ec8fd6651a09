"""`rest-ds segment` on a small GeoTIFF the test writes (SYNTHETIC data).

The model is the tiny ViT + UPerNet, fitted for a few steps in one process so
its logits are decisive, then exported (safetensors + JSON). The input is the
bare GeoTIFF (no scene description). Checked: CRS, transform, nodata (input
nodata pixels -> 255), colour table, tiling and compression; for P = 2, 3 ranks
vs 1 in whole-scene mode the probabilities agree to fp32 rounding and the maps
differ only at argmax ties within fp32 rounding; the sliding-window map is equal
for P = 1, 3.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a model fitted in-process, segment on 1, 2 and 3 ranks

from tests.train_scene import EPSG, NODATA, TRANSFORM, make_scene

# model_and_scene (the exported tiny model and its scene): tests/conftest.py


def _segment(m, name, P, *extra):
    from rest_ds.cli import main

    out = m["dir"] / f"{name}.tif"
    rc = main(["segment", "--checkpoint", str(m["model"]), "--input", str(m["image"]), "--output", str(out),
               "--nproc", str(P), *extra])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def whole_maps(model_and_scene):
    m = model_and_scene
    outs = {1: _segment(m, "whole1", 1, "--preview", str(m["dir"] / "whole1.png"), "--probs", str(m["dir"] / "probs1.tif")),
            2: _segment(m, "whole2", 2, "--probs", str(m["dir"] / "probs2.tif")),
            3: _segment(m, "whole3", 3, "--probs", str(m["dir"] / "probs3.tif"))}
    return outs


@pytest.mark.timeout(600)
def test_geotiff_keeps_georeferencing_and_nodata(model_and_scene, whole_maps):
    import rasterio

    with rasterio.open(model_and_scene["image"]) as src:
        crs, transform = src.crs, src.transform
        invalid = (src.read() == NODATA).any(0)
    with rasterio.open(whole_maps[2]) as dst:
        assert dst.crs == crs and dst.crs.to_epsg() == EPSG
        assert tuple(dst.transform)[:6] == pytest.approx(TRANSFORM) and dst.transform == transform
        assert dst.nodata == 255 and dst.dtypes[0] == "uint8" and dst.count == 1
        assert dst.profile["tiled"] and dst.compression.name.lower() == "deflate"
        cmap = dst.colormap(1)
        assert cmap[1][:3] == (0x1f, 0x78, 0xb4) and cmap[3][:3] == (0x33, 0x78, 0x2c)
        assert dst.tags(1)["class_2"] == "field"
        a = dst.read(1)
    assert invalid.any() and (a[invalid] == 255).all() and (a[~invalid] != 255).all()
    assert set(np.unique(a[~invalid])) <= {1, 2, 3} and len(np.unique(a[~invalid])) >= 2
    with rasterio.open(model_and_scene["dir"] / "probs2.tif") as p:
        probs = p.read()
        assert p.count == 3 and p.crs == crs
    assert np.isnan(probs[:, invalid]).all()
    assert np.allclose(probs[:, ~invalid].sum(0), 1, atol=1e-5)
    assert (model_and_scene["dir"] / "whole1.png").stat().st_size > 100


def check_same_up_to_fp32_ties(probs1: np.ndarray, map1: np.ndarray, probs: np.ndarray, map_: np.ndarray,
                               atol: float = 1e-5, tie: float = 1e-5) -> int:
    """What the README claims for P ranks vs one process: per-class probabilities
    (``K x H x W``, NaN at nodata) equal to fp32 rounding, and class maps equal
    except at argmax ties, i.e. pixels whose top-2 margin in ``probs1`` is below
    ``tie``. Returns the number of differing map pixels."""
    assert np.array_equal(np.isnan(probs1), np.isnan(probs))
    valid = ~np.isnan(probs1)
    err = np.abs(probs - probs1)[valid].max()
    assert err <= atol, f"probabilities differ by {err:.3g} > {atol}"
    top2 = np.sort(np.nan_to_num(probs1, nan=0.0), axis=0)[-2:]
    diff = map_ != map1
    margins = (top2[1] - top2[0])[diff]
    assert (margins < tie).all(), f"maps differ at {diff.sum()} pixels, top-2 margins up to {margins.max():.3g}"
    return int(diff.sum())


@pytest.mark.timeout(600)
def test_whole_scene_map_is_the_same_for_any_rank_count(model_and_scene, whole_maps):
    import rasterio

    d = model_and_scene["dir"]
    maps = {P: rasterio.open(p).read(1) for P, p in whole_maps.items()}
    probs = {P: rasterio.open(d / f"probs{P}.tif").read() for P in whole_maps}
    for P in (2, 3):
        check_same_up_to_fp32_ties(probs[1], maps[1], probs[P], maps[P])
        assert np.array_equal(maps[1] == 255, maps[P] == 255)


def test_tie_check_catches_a_border_error(model_and_scene, whole_maps):
    """The check above fails when a tile border is computed differently: a one-column
    perturbation of the P = 1 probabilities of the size of a wrong halo."""
    import rasterio

    d = model_and_scene["dir"]
    p1, m1 = rasterio.open(d / "probs1.tif").read(), rasterio.open(whole_maps[1]).read(1)
    bad = p1.copy()
    bad[:, :, 50] = np.roll(bad[:, :, 50], 1, axis=0)          # another class order on one column
    with pytest.raises(AssertionError, match="probabilities differ"):
        check_same_up_to_fp32_ties(p1, m1, bad, m1)
    badmap = np.where(np.isnan(bad).any(0), 255, bad.argmax(0) + 1).astype(m1.dtype)
    assert (badmap != m1).any()
    with pytest.raises(AssertionError, match="maps differ"):
        check_same_up_to_fp32_ties(p1, m1, p1, badmap)


@pytest.mark.timeout(600)
def test_sliding_window_map_is_the_same_for_any_rank_count(model_and_scene, whole_maps):
    import rasterio

    m = model_and_scene
    maps = {P: rasterio.open(_segment(m, f"slide{P}", P, "--mode", "slide")).read(1) for P in (1, 3)}
    assert np.array_equal(maps[1], maps[3])
    whole = rasterio.open(whole_maps[1]).read(1)
    assert np.array_equal(maps[1] == 255, whole == 255)
    assert not np.array_equal(maps[1], whole)        # windows of 32 px see less context: a different map


def test_segment_errors_are_named(model_and_scene, tmp_path, capsys):
    from rest_ds.cli import main

    m = model_and_scene
    rc = main(["segment", "--checkpoint", str(tmp_path / "none.safetensors"), "--input", str(m["image"]),
               "--output", str(tmp_path / "o.tif")])
    assert rc == 2 and "none.json: missing" in capsys.readouterr().err
    import rasterio
    with rasterio.open(m["image"]) as src:
        prof = src.profile
        data = src.read()[:3]
    prof.update(count=3)
    with rasterio.open(tmp_path / "three.tif", "w", **prof) as dst:
        dst.write(data)
    rc = main(["segment", "--checkpoint", str(m["model"]), "--input", str(tmp_path / "three.tif"),
               "--output", str(tmp_path / "o.tif")])
    err = capsys.readouterr().err
    assert rc == 2 and "has 3 bands but the model expects 4" in err


def test_segment_grid_and_overlap_are_checked(model_and_scene, tmp_path, capsys):
    """A --grid too fine for the scene names --grid (SPIM's tiling error named no option); an --overlap
    not below the window is a usage error; another --crop defaults to overlap crop/4 (the training run's
    overlap, 8, was kept and refused a window of 8)."""
    import rasterio

    from rest_ds.cli import main

    m = model_and_scene
    align = json.loads(Path(m["model"]).with_suffix(".json").read_text())["align"]
    with rasterio.open(m["image"]) as src:
        prof, data = src.profile, src.read()[:, :align]          # one alignment unit high
    prof.update(height=align)
    with rasterio.open(tmp_path / "flat.tif", "w", **prof) as dst:
        dst.write(data)
    rc = main(["segment", "--checkpoint", str(m["model"]), "--input", str(tmp_path / "flat.tif"),
               "--output", str(tmp_path / "g.tif"), "--nproc", "2", "--grid", "2x1"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--grid 2x1: the tiles do not fit the {align}x101 scene" in err, err
    rc = main(["segment", "--checkpoint", str(m["model"]), "--input", str(m["image"]), "--output",
               str(tmp_path / "o.tif"), "--mode", "slide", "--overlap", "32"])
    err = capsys.readouterr().err
    assert rc == 2 and "--overlap 32 must be smaller than the window (--crop 32" in err, err
    maps = {}
    for name, extra in (("default", []), ("explicit", ["--overlap", "2"])):
        assert main(["segment", "--checkpoint", str(m["model"]), "--input", str(m["image"]), "--output",
                     str(tmp_path / f"{name}.tif"), "--mode", "slide", "--crop", "8", *extra]) == 0
        with rasterio.open(tmp_path / f"{name}.tif") as src:
            maps[name] = src.read(1)
    assert np.array_equal(maps["default"], maps["explicit"])


def test_segment_refuses_bands_in_another_order(model_and_scene, tmp_path, capsys):
    """A scene whose band_names hold the model's bands in another order was segmented silently
    with every band read as another one; segment names the scene and the image.bands that reads it
    in the model's order, and with that fix the map equals the map of the scene in the right order."""
    import shutil

    import rasterio
    import yaml

    from rest_ds.cli import main

    m = model_and_scene
    (tmp_path / "named").mkdir()
    model = tmp_path / "named" / Path(m["model"]).name           # the model with its bands named
    shutil.copy(m["model"], model)
    meta = json.loads(Path(m["model"]).with_suffix(".json").read_text())
    meta["band_names"] = ["B02", "B03", "B04", "B08"]
    model.with_suffix(".json").write_text(json.dumps(meta))
    with rasterio.open(m["image"]) as src:
        prof, img = src.profile, src.read()
    with rasterio.open(tmp_path / "swapped.tif", "w", **prof) as dst:
        dst.write(img[[3, 2, 1, 0]])
    desc = {"name": "swapped", "image": {"path": "swapped.tif"}, "band_names": ["nir", "red", "green", "blue"]}
    (tmp_path / "swapped.yaml").write_text(yaml.safe_dump(desc))
    args = ["segment", "--checkpoint", str(model), "--nproc", "1"]
    rc = main(args + ["--input", str(tmp_path / "swapped.yaml"), "--output", str(tmp_path / "s.tif")])
    err = capsys.readouterr().err
    assert rc == 2 and "swapped.yaml: the scene has the same bands in another order" in err, err
    assert "image.bands: [3, 2, 1, 0]" in err and not (tmp_path / "s.tif").exists()
    desc.update(image={"path": "swapped.tif", "bands": [3, 2, 1, 0]}, band_names=["blue", "green", "red", "nir"])
    (tmp_path / "swapped.yaml").write_text(yaml.safe_dump(desc))
    assert main(args + ["--input", str(tmp_path / "swapped.yaml"), "--output", str(tmp_path / "s.tif")]) == 0
    assert main(args + ["--input", str(m["image"]), "--output", str(tmp_path / "ref.tif")]) == 0
    with rasterio.open(tmp_path / "s.tif") as a, rasterio.open(tmp_path / "ref.tif") as b:
        assert np.array_equal(a.read(), b.read())
