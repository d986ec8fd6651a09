"""Scene descriptions, label grids and class mapping, region masks, streaming
normalisation statistics and their cache, and the one-line error of every bad input."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import yaml
from affine import Affine

from rest_ds.data import (DataError, DataWarning, IOCounter, Scene, SceneReader, open_scene, prepare_scene,
                          read_rank_tile, read_tile, scan_scene)
from rest_ds.data.stats import BandMoments, stats_cache_paths
from rest_ds.spim.tiling import TileLayout
from tests.rasters import (CLASS_VALUES, CRS, LABELLED_HW, NODATA, TRANSFORM, cube, labelled_scene, write_h5,
                           write_raster)

H, W = LABELLED_HW


def expected_ids(a, lab, region_mask=None):
    valid = (a != NODATA).all(axis=0)
    ids = np.full(lab.shape, -100, np.int64)
    for k, v in enumerate(CLASS_VALUES):
        ids[lab == v] = k
    ids[~valid] = -100
    if region_mask is not None:
        ids[~region_mask] = -100
    return ids, valid


# --- description ----------------------------------------------------------------------------
def test_yaml_loading_resolves_paths_and_round_trips(tmp_path):
    path, _, _ = labelled_scene(tmp_path)
    s = Scene.from_yaml(path)
    assert s.image.path == str(tmp_path / "img.tif") and s.label.path == str(tmp_path / "lab.tif")
    assert s.class_names == ["a", "b", "c"] and s.ignore_index == -100
    assert s.class_colors[0] == (255, 0, 0) and s.class_colors[2] == (0, 0, 255)
    s.to_yaml(tmp_path / "copy.yaml")
    t = Scene.from_yaml(tmp_path / "copy.yaml")
    assert t.to_dict() == s.to_dict()
    assert Scene.from_dict(s).to_dict() == s.to_dict()   # a Scene is its own description


@pytest.mark.parametrize("patch, message", [
    # unknown keys: the dotted key path and a did-you-mean (rest_ds.config_schema, like training configs)
    ({"bandnames": ["x"]}, "bandnames: unknown key (did you mean 'band_names'?"),
    ({"ignore_indx": 5}, "ignore_indx: unknown key (did you mean 'ignore_index'?"),
    ({"image": {"path": "img.tif", "dataset_path": "/x"}}, "image.dataset_path: unknown key (did you mean 'dataset'?"),
    ({"classes": [{"value": 10, "name": "a", "colour": "#ff0000"}]},
     "classes[0].colour: unknown key (did you mean 'color'?"),
    ({"regions": {"train": {"rows": [0, 3]}}}, "regions.train.rows: unknown key"),
    # wrong types and out-of-range values, named
    ({"dates": "two"}, "dates: expected an integer, got 'two'"),
    ({"dates": 0}, "dates: must be >= 1, got 0"),
    ({"ignore_index": 1.5}, "ignore_index: expected an integer, got 1.5"),
    ({"image": {"path": "img.tif", "reference": -1}}, "image.reference: must be >= 0, got -1"),
    ({"image": {"path": "img.tif", "bands": [0, -2]}}, "image.bands[1]: must be >= 0, got -2"),
    ({"image": {"path": "img.tif", "format": "hdf"}}, "image.format: 'hdf' is not one of auto, raster, hdf5, mat; "
                                                      "did you mean 'hdf5'?"),
    ({"image": 5}, "image: expected a mapping with keys path, paths,"),
    ({"classes": [{"value": "ten"}]}, "classes[0].value: expected"),
    ({"classes": [{"value": 10, "color": "#ff00"}]}, "classes[0].color: '#ff00' is not '#rrggbb' or [r, g, b]"),
    ({"classes": [{"value": 10, "color": [0, 300, 0]}]}, "classes[0].color: [0, 300, 0] is not '#rrggbb'"),
    ({"classes": [{"name": "a"}]}, "classes[0].value: missing required key"),
    ({"regions": {"train": {"windows": [[0, "a", 0, 3]]}}}, "regions.train.windows[0][1]: expected an integer"),
    ({"stats": {"mean": [0, 0, 0]}}, "stats.std: missing required key"),
    # consistency checks after parsing
    ({"image": {"path": "img.tif", "paths": ["img.tif"]}}, "image: give exactly one of path"),
    ({"classes": [10, 10]}, "classes: duplicate raw values"),
    ({"classes": []}, "classes: a label is given but no classes"),
    ({"stats": {"mean": [0, 0, 0], "std": [1, 0, 1]}}, "stats.std: every std must be finite and > 0"),
])
def test_malformed_description_is_one_line_error(tmp_path, patch, message):
    path, _, _ = labelled_scene(tmp_path, extra=patch)
    with pytest.raises(DataError) as e:
        Scene.from_yaml(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


# --- labels -------------------------------------------------------------------------------------
def test_labels_map_to_contiguous_ids_with_ignore(tmp_path):
    path, a, lab = labelled_scene(tmp_path)
    ids, valid = expected_ids(a, lab)
    with open_scene(path) as r:
        assert r.shape == (3, H, W) and r.num_classes == 3
        tile = read_tile(r, slice(0, H), slice(0, W))
    np.testing.assert_array_equal(tile.valid, valid)
    np.testing.assert_array_equal(tile.label, ids)
    assert tile.label.dtype == np.int64
    # raw values where invalid are filled with 0 (no normalisation without stats)
    assert (tile.image[:, ~valid] == 0).all()
    np.testing.assert_array_equal(tile.image[:, valid], a[:, valid])
    x, y = tile.to_torch()
    assert tuple(x.shape) == (1, 3, H, W) and tuple(y.shape) == (1, H, W) and str(y.dtype) == "torch.int64"


def test_unknown_label_value_is_an_error(tmp_path):
    path, _, lab = labelled_scene(tmp_path)
    lab[4, 9] = 40
    write_raster(tmp_path / "lab.tif", lab[None], nodata=255)
    with open_scene(path) as r:
        with pytest.raises(DataError, match=r"lab.tif: label value 40 at pixel \(row 4, col 9\)"):
            r.read_label(slice(0, H), slice(0, W))
        r.read_label(slice(5, H), slice(0, W))            # a window without it reads fine


def test_datum_realisation_crs_accepted_with_warning(tmp_path):
    """EPSG:32119 (NAD83) image, EPSG:3358 (NAD83(HARN)) label, identical transforms:
    the nc-landsat7 situation."""
    nc = Affine(28.5, 0.0, 630534.0, 0.0, -28.5, 228114.0)
    a = cube("float32", (3, H, W), seed=11)
    path, _, _ = labelled_scene(tmp_path, label_crs="EPSG:3358", label_transform=nc)
    write_raster(tmp_path / "img.tif", a, crs="EPSG:32119", transform=nc, nodata=NODATA)
    with pytest.warns(DataWarning, match="EPSG:3358 and image CRS EPSG:32119 differ only in datum realisation"):
        open_scene(path).close()


@pytest.mark.parametrize("kwargs, message", [
    ({"label_shape": (H, W + 1)}, "label grid 23x32 (rows x cols) does not match the image grid 23x31"),
    ({"label_transform": TRANSFORM @ Affine.translation(1, 0)}, "label transform"),
    ({"label_crs": "EPSG:32632"}, "label CRS EPSG:32632 differs from the image CRS EPSG:32633"),
    ({"label_crs": "EPSG:4326"}, "label CRS EPSG:4326 differs"),
])
def test_label_grid_mismatch_is_an_error(tmp_path, kwargs, message):
    path, _, _ = labelled_scene(tmp_path, **kwargs)
    with pytest.raises(DataError) as e:
        open_scene(path)
    assert message in str(e.value) and str(tmp_path / "lab.tif") in str(e.value)


def test_regions_from_windows_and_mask_raster(tmp_path):
    mask = np.zeros((H, W), np.uint8)
    mask[3:17, 5:20] = 2
    mask[18:, :] = 1
    write_raster(tmp_path / "reg.tif", mask[None])
    path, a, lab = labelled_scene(tmp_path, extra={"regions": {
        "train": {"windows": [[0, 12, 0, 31]]},
        "val": {"windows": [[12, 23, 0, 16], [12, 23, 16, 31]]},
        "test": {"path": "reg.tif", "values": [2]},
        "any": {"path": "reg.tif"}}})
    rows_train = np.zeros((H, W), bool)
    rows_train[:12] = True
    with open_scene(path) as r:
        for name, m in [("train", rows_train), ("val", ~rows_train), ("test", mask == 2), ("any", mask != 0)]:
            ids, _ = expected_ids(a, lab, m)
            np.testing.assert_array_equal(read_tile(r, slice(0, H), slice(0, W), region=name).label, ids, err_msg=name)
            # and per rank
            layout = TileLayout.even(H, W, (2, 3))
            for i in range(2):
                for j in range(3):
                    rows, cols = layout.tile(i, j)
                    np.testing.assert_array_equal(read_rank_tile(r, layout, i, j, region=name).label, ids[rows, cols])
        with pytest.raises(DataError, match="no region 'tset'"):
            read_tile(r, slice(0, H), slice(0, W), region="tset")


def test_hdf5_label_without_georeferencing_checks_shape_only(tmp_path):
    a = cube("float32", (3, H, W), seed=11)
    lab = np.full((H, W), 10, np.uint8)
    write_raster(tmp_path / "img.tif", a)
    write_h5(tmp_path / "l.h5", "labels", lab)
    s = Scene.from_dict({"name": "h", "image": "img.tif", "label": {"path": "l.h5", "dataset": "labels"},
                         "classes": [10]}, root=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with SceneReader(s) as r:
            assert (r.read_label(slice(0, H), slice(0, W)) == 0).all()
    write_h5(tmp_path / "l.h5", "labels", lab[:-1])
    with pytest.raises(DataError, match="l.h5: label grid 22x31"):
        SceneReader(s)


# --- normalisation ------------------------------------------------------------------------------
def test_streaming_stats_equal_numpy_and_are_cached_next_to_the_data(tmp_path):
    path, a, lab = labelled_scene(tmp_path)
    valid = (a != NODATA).all(axis=0)
    counter = IOCounter()
    reader, summary, stats = prepare_scene(path, counter=counter, block_rows=4)   # 6 blocks
    reader.close()
    x = a[:, valid].astype(np.float64)
    np.testing.assert_allclose(stats.mean, x.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats.std, x.std(axis=1), rtol=1e-10)
    assert summary.valid_pixels == valid.sum() and stats.source == "computed"
    ids, _ = expected_ids(a, lab)
    assert summary.class_counts == [int((ids == k).sum()) for k in range(3)]
    assert summary.label_counts == [int((lab == v).sum()) for v in CLASS_VALUES]
    # block reads covered the scene once, each a full-width block of <= 4 rows
    image_reads = [rec for rec in counter.reads if rec.path.endswith("img.tif")]
    assert sum(rec.rows[1] - rec.rows[0] for rec in image_reads) == H
    assert all(rec.rows[1] - rec.rows[0] <= 4 and rec.cols == (0, W) for rec in image_reads)

    cache = stats_cache_paths(Scene.from_yaml(path))[0]
    assert cache.parent == tmp_path and json.loads(cache.read_text())["valid_pixels"] == valid.sum()
    counter = IOCounter()
    reader, again, stats2 = prepare_scene(path, counter=counter)
    reader.close()
    assert again.source == "cache" and stats2.mean == stats.mean and not counter.reads
    # a changed file invalidates the cache
    a2 = a.copy()
    a2[0, 10, 10] += 1000
    write_raster(tmp_path / "img.tif", a2, nodata=NODATA)
    os.utime(tmp_path / "img.tif", ns=(1, 1))
    reader, third, stats3 = prepare_scene(path)
    reader.close()
    assert third.source == "computed" and stats3.mean[0] != stats.mean[0]


def test_stats_from_config_take_precedence_and_normalise(tmp_path):
    path, a, _ = labelled_scene(tmp_path, extra={"stats": {"mean": [1.0, 2.0, 3.0], "std": [2.0, 4.0, 8.0]}})
    reader, summary, stats = prepare_scene(path)
    with reader:
        assert stats.source == "config"
        tile = read_tile(reader, slice(2, 9), slice(3, 30), stats=stats)
    valid = (a[:, 2:9, 3:30] != NODATA).all(axis=0)
    want = (a[:, 2:9, 3:30] - np.array([1, 2, 3], np.float32)[:, None, None]) / np.array([2, 4, 8], np.float32)[:, None, None]
    np.testing.assert_allclose(tile.image[:, valid], want[:, valid], rtol=1e-6)


def test_band_moments_merge_is_exact():
    rng = np.random.default_rng(0)
    x = rng.normal(5, 3, size=(4, 10, 12)).astype(np.float32)
    valid = rng.random((10, 12)) > 0.3
    parts = [BandMoments.of(x[:, :3], valid[:3]), BandMoments.of(x[:, 3:4], valid[3:4]), BandMoments.of(x[:, 4:], valid[4:])]
    m = parts[0].merge(parts[1]).merge(parts[2])
    ref = x[:, valid].astype(np.float64)
    np.testing.assert_allclose(m.mean, ref.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(m.std, ref.std(axis=1), rtol=1e-12)


# --- bad input: one line, naming the file, before heavy work ------------------------------------------
def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_missing_file(tmp_path):
    path, _, _ = labelled_scene(tmp_path)
    os.remove(tmp_path / "img.tif")
    assert _one_line_error(open_scene, path) == f"{tmp_path / 'img.tif'}: file not found"


@pytest.mark.parametrize("name", ["img.tif", "lab.tif"])
def test_corrupt_file(tmp_path, name):
    path, _, _ = labelled_scene(tmp_path)
    (tmp_path / name).write_bytes(b"II*\x00 definitely not a TIFF" + bytes(100))
    msg = _one_line_error(open_scene, path)
    assert msg.startswith(f"{tmp_path / name}: cannot open as a raster")


def test_corrupt_hdf5_and_mat(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"\x89HDF garbage" * 10)
    (tmp_path / "x.mat").write_bytes(b"MATLAB 5.0 MAT-file garbage")
    s = Scene.from_dict({"name": "h", "image": {"path": "x.h5", "dataset": "/a"}}, root=tmp_path)
    assert _one_line_error(SceneReader, s).startswith(f"{tmp_path / 'x.h5'}: not a readable HDF5 file")
    s = Scene.from_dict({"name": "m", "image": {"path": "x.mat", "dataset": "a"}}, root=tmp_path)
    assert _one_line_error(SceneReader, s).startswith(f"{tmp_path / 'x.mat'}: not a readable MATLAB file")


def test_band_count_mismatch_with_model(tmp_path):
    path, _, _ = labelled_scene(tmp_path)
    msg = _one_line_error(open_scene, path, expected_bands=6)
    assert msg == f"{tmp_path / 'img.tif'}: the image has 3 bands but the model expects 6"
    path, _, _ = labelled_scene(tmp_path, extra={"band_names": ["a", "b"]})
    assert "the image has 3 bands but the scene names 2" in _one_line_error(open_scene, path)


def test_nan_and_inf_in_the_image(tmp_path):
    a = cube("float32", (3, H, W), seed=11)
    a[2, 7, 11] = np.nan
    path, _, _ = labelled_scene(tmp_path, image=a)
    with open_scene(path) as r:                      # opening reads no pixels
        msg = _one_line_error(scan_scene, r)         # the validation pass finds it
        assert msg.startswith(f"{tmp_path / 'img.tif'}: image has NaN at band 2, pixel (row 7, col 11)")
        read_tile(r, slice(8, H), slice(0, W))       # tiles without it are fine
    msg = _one_line_error(prepare_scene, path)
    assert "image has NaN at band 2" in msg
    a[2, 7, 11] = np.inf
    write_raster(tmp_path / "img.tif", a, nodata=NODATA)
    assert "image has inf at band 2, pixel (row 7, col 11)" in _one_line_error(prepare_scene, path, recompute=True)
    # NaN as the declared nodata is not an error
    a[2, 7, 11] = np.nan
    write_raster(tmp_path / "img.tif", a, nodata=np.nan)
    reader, summary, _ = prepare_scene(path, recompute=True)
    reader.close()
    assert summary.valid_pixels == H * W - 1


def test_nonfinite_pixels_as_nodata_besides_the_nodata_value(tmp_path):
    """A file with a nodata value (-9999) and NaN / inf pixels as well: the error's advice was
    'set image.nodata: .nan', which gave -9999 back as data and still refused the inf (its message
    repeated the advice). image.nonfinite: nodata makes NaN and +-inf pixels nodata too: statistics,
    validity and labels as if those pixels held the nodata value."""
    a = cube("float32", (3, H, W), seed=11)
    bad = [(0, 7, 11), (2, 9, 3), (1, 15, 20)]
    for (b, i, j), v in zip(bad, (np.nan, np.inf, -np.inf)):
        a[b, i, j] = v
    path, a, lab = labelled_scene(tmp_path, image=a.copy())            # nodata -9999 pixels as well
    msg = _one_line_error(prepare_scene, path)
    assert "image has NaN at band 0" in msg and "set image.nonfinite: nodata" in msg
    ref = a.copy()
    for b, i, j in bad:
        ref[:, i, j] = NODATA
    write_raster(tmp_path / "ref.tif", ref, nodata=NODATA)
    desc = yaml.safe_load(open(path).read())
    desc["image"]["nonfinite"] = "nodata"
    open(path, "w").write(yaml.safe_dump(desc))
    desc.update(image={"path": "ref.tif"}, name="ref")
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(desc))
    r1, s1, st1 = prepare_scene(path, recompute=True)
    r2, s2, st2 = prepare_scene(tmp_path / "ref.yaml", recompute=True)
    with r1, r2:
        assert s1.valid_pixels == s2.valid_pixels == int((ref != NODATA).all(0).sum())
        np.testing.assert_allclose(st1.mean, st2.mean, rtol=1e-12)
        np.testing.assert_allclose(st1.std, st2.std, rtol=1e-12)
        t1, t2 = read_tile(r1, slice(0, H), slice(0, W), stats=st1), read_tile(r2, slice(0, H), slice(0, W), stats=st2)
        assert np.array_equal(t1.valid, t2.valid) and np.array_equal(t1.label, t2.label)
        assert np.array_equal(t1.image, t2.image) and np.isfinite(t1.image).all()


def test_empty_scene(tmp_path):
    a = np.full((3, H, W), NODATA, np.float32)
    path, _, _ = labelled_scene(tmp_path, image=a)
    msg = _one_line_error(prepare_scene, path)
    assert msg.startswith(f"{tmp_path / 'img.tif'}: empty scene: none of the 23x31 pixels is valid")
    write_h5(tmp_path / "e.h5", "cube", np.zeros((0, 4, 4), np.float32))
    s = Scene.from_dict({"name": "e", "image": {"path": "e.h5", "dataset": "cube"}}, root=tmp_path)
    assert _one_line_error(SceneReader, s) == f"{tmp_path / 'e.h5'}: empty scene: the image is 0 bands x 4 x 4 pixels"


def test_unreadable_hdf5_path(tmp_path):
    write_h5(tmp_path / "c.h5", "/data/cube", cube("float32", (3, 4, 5)))
    s = Scene.from_dict({"name": "h", "image": {"path": "c.h5", "dataset": "/data/cueb"}}, root=tmp_path)
    assert _one_line_error(SceneReader, s) == f"{tmp_path / 'c.h5'}: no dataset '/data/cueb' in the file (datasets: /data/cube)"
    s = Scene.from_dict({"name": "h", "image": {"path": "c.h5", "dataset": "/data"}}, root=tmp_path)
    assert "'/data' is a group, not a dataset" in _one_line_error(SceneReader, s)


def test_missing_mat_variable(tmp_path):
    import scipy.io

    scipy.io.savemat(tmp_path / "v.mat", {"indian_pines": np.zeros((4, 5, 3))})
    s = Scene.from_dict({"name": "m", "image": {"path": "v.mat", "dataset": "indian_pines_gt"}}, root=tmp_path)
    assert _one_line_error(SceneReader, s) == (f"{tmp_path / 'v.mat'}: no variable 'indian_pines_gt' in the file "
                                               f"(variables: indian_pines)")


def test_missing_scene_description(tmp_path):
    assert _one_line_error(Scene.from_yaml, tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: scene description not found"


def test_truncated_file_fails_when_read_naming_the_window(tmp_path):
    path, _, _ = labelled_scene(tmp_path)
    data = (tmp_path / "img.tif").read_bytes()
    (tmp_path / "img.tif").write_bytes(data[:len(data) // 2])       # header intact, strips cut off
    with open_scene(path) as r:
        msg = _one_line_error(scan_scene, r)
    assert msg.startswith(f"{tmp_path / 'img.tif'}: cannot read window rows [0, 23) cols [0, 31) (")
    assert "TIFFReadEncodedStrip" in msg or "IReadBlock" in msg
