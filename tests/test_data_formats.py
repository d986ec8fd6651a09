"""Every reader format round-trips through a small file the test writes, and the
windowed read of every rank (grid cell) equals the same slice of a whole read;
an IOCounter shows what a rank reads is its tile.

Ranks are simulated by iterating over the grid cells, each with its own freshly
opened reader (as a separate process would have)."""
from __future__ import annotations

import numpy as np
import pytest
from affine import Affine

from rest_ds.data import IOCounter, open_reader
from rest_ds.data.readers import BandStackReader, MatReader
from rest_ds.data.samples import write_mat73
from rest_ds.spim.tiling import TileLayout
from tests.rasters import TRANSFORM, C, H, W, cube, write_h5, write_raster

LAYOUTS = [
    TileLayout.even(H, W, (1, 1)),
    TileLayout.even(H, W, (2, 3)),
    TileLayout.even(H, W, (3, 2)),
    TileLayout(rows=(0, 5, 37), cols=(0, 20, 29)),    # very uneven
]


def write_mat5(path, variables, compress=False):
    import scipy.io

    scipy.io.savemat(path, variables, do_compression=compress)
    return path


# Each case: (writes the file and returns open_reader kwargs, the expected C x H x W array).
def _gtiff(tmp, a):
    return {"path": write_raster(tmp / "s.tif", a, nodata=-9999.0)}


def _gtiff_tiled(tmp, a):
    return {"path": write_raster(tmp / "t.tif", a, tiled=True, blockxsize=16, blockysize=16)}


def _cog(tmp, a):
    return {"path": write_raster(tmp / "c.tif", a, driver="COG", blocksize=16, compress="DEFLATE", overviews="NONE")}


def _jp2(tmp, a):
    # GDAL's OpenJPEG driver, lossless (reversible wavelet)
    return {"path": write_raster(tmp / "j.jp2", a, driver="JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES",
                                 BLOCKXSIZE=32, BLOCKYSIZE=32)}


def _envi(interleave):
    def make(tmp, a):
        write_raster(tmp / f"e_{interleave}.img", a, driver="ENVI", interleave=interleave, nodata=7)
        return {"path": tmp / f"e_{interleave}.hdr"}          # the header path is accepted
    return make


def _h5_chw(tmp, a):
    return {"path": write_h5(tmp / "c.h5", "/group/cube", a), "dataset": "/group/cube", "layout": "CHW"}


def _h5_hwc(tmp, a):
    return {"path": write_h5(tmp / "h.hdf5", "cube", a.transpose(1, 2, 0), chunks=(8, 8, C)),
            "dataset": "cube", "layout": "HWC"}


def _mat5(compress):
    def make(tmp, a):
        p = write_mat5(tmp / f"v5{int(compress)}.mat", {"cube": a.transpose(1, 2, 0), "other": np.zeros(3)}, compress)
        return {"path": p, "dataset": "cube"}                  # MATLAB H x W x C (default layout HWC)
    return make


def _mat73_hwc(tmp, a):
    return {"path": write_mat73(tmp / "v73.mat", {"cube": a.transpose(1, 2, 0)}) or tmp / "v73.mat", "dataset": "cube"}


def _mat73_chw(tmp, a):
    return {"path": write_mat73(tmp / "v73c.mat", {"cube": a}) or tmp / "v73c.mat", "dataset": "cube",
            "layout": "CHW"}


def _stack(tmp, a):
    paths = [write_raster(tmp / f"b{b}.tif", a[b:b + 1]) for b in range(a.shape[0])]
    return {"paths": paths}


FORMATS = {
    "gtiff-striped-f32": (_gtiff, "float32"),
    "gtiff-tiled-i16": (_gtiff_tiled, "int16"),
    "cog-deflate-u16": (_cog, "uint16"),
    "jp2-openjpeg-u16": (_jp2, "uint16"),
    "envi-bsq": (_envi("BSQ"), "float32"),
    "envi-bil": (_envi("BIL"), "int16"),
    "envi-bip": (_envi("BIP"), "uint16"),
    "hdf5-chw": (_h5_chw, "float32"),
    "hdf5-hwc-chunked": (_h5_hwc, "float64"),
    "mat5": (_mat5(False), "float64"),
    "mat5-compressed": (_mat5(True), "int16"),
    "mat73-hwc": (_mat73_hwc, "float32"),
    "mat73-chw": (_mat73_chw, "uint16"),
    "bandstack-same-grid": (_stack, "float32"),
}


@pytest.fixture(params=sorted(FORMATS))
def written(request, tmp_path):
    make, dtype = FORMATS[request.param]
    a = cube(dtype)
    return request.param, make(tmp_path, a), a


def test_round_trip_and_rank_windows(written):
    name, kwargs, a = written
    with open_reader(**kwargs) as r:
        assert r.shape == a.shape, name
        full = r.read(slice(0, H), slice(0, W))
    assert full.dtype == a.dtype, name
    np.testing.assert_array_equal(full, a, err_msg=name)
    for layout in LAYOUTS:
        ph, pw = layout.grid
        for i in range(ph):
            for j in range(pw):
                rows, cols = layout.tile(i, j)
                counter = IOCounter()
                with open_reader(**kwargs, counter=counter) as r:   # a fresh "rank"
                    tile = r.read(rows, cols)
                np.testing.assert_array_equal(tile, full[:, rows, cols], err_msg=f"{name} {layout} ({i}, {j})")
                # every window this rank asked for is exactly its tile
                assert counter.reads and all(rec.rows == (rows.start, rows.stop) and rec.cols == (cols.start, cols.stop)
                                             for rec in counter.reads), name


def test_georeferencing_and_nodata_round_trip(tmp_path):
    a = cube("float32")
    with open_reader(write_raster(tmp_path / "g.tif", a, nodata=-9999.0)) as r:
        assert r.crs.to_epsg() == 32633 and r.transform == TRANSFORM and r.nodata == (-9999.0,) * C
    write_raster(tmp_path / "e.img", a, driver="ENVI", nodata=-1)
    with open_reader(tmp_path / "e.hdr") as r:
        assert r.transform == TRANSFORM and r.nodata == (-1.0,) * C and r.crs is not None
    # HDF5 carries no georeferencing: it comes from the description
    p = write_h5(tmp_path / "c.h5", "cube", a)
    with open_reader(p, dataset="cube", crs="EPSG:32633", transform=list(TRANSFORM)[:6], nodata=[1, 2, 3, 4, 5]) as r:
        assert r.crs.to_epsg() == 32633 and r.transform == TRANSFORM and r.nodata == (1.0, 2.0, 3.0, 4.0, 5.0)
    # a raster band subset
    with open_reader(tmp_path / "g.tif", bands=[3, 1]) as r:
        np.testing.assert_array_equal(r.read(slice(0, H), slice(0, W)), a[[3, 1]])


def test_hdf5_single_band_and_nodata_attribute(tmp_path):
    import h5py

    a = cube("float32", (H, W))
    with h5py.File(tmp_path / "l.h5", "w") as f:
        d = f.create_dataset("only", data=a)
        d.attrs["_FillValue"] = -5.0
    with open_reader(tmp_path / "l.h5") as r:            # the one dataset is found without a path
        assert r.shape == (1, H, W) and r.nodata == (-5.0,)
        np.testing.assert_array_equal(r.read(slice(3, 9), slice(4, 29))[0], a[3:9, 4:29])


def test_mat_versions_detected(tmp_path):
    a = cube("float32")
    write_mat5(tmp_path / "a.mat", {"x": a.transpose(1, 2, 0)})
    write_mat73(tmp_path / "b.mat", {"x": a.transpose(1, 2, 0)})
    with MatReader(tmp_path / "a.mat") as r5, MatReader(tmp_path / "b.mat") as r73:
        assert (r5.version, r73.version) == ("5", "7.3")
        assert r5.variable == r73.variable == "x"
        np.testing.assert_array_equal(r5.read(slice(1, 4), slice(2, 9)), r73.read(slice(1, 4), slice(2, 9)))


# --- per-band files on different grids ----------------------------------------------------------
def test_band_stack_resampling_onto_reference_grid(tmp_path):
    """10 m reference bands, a 20 m band (nearest: each 20 m pixel becomes 2x2
    10 m pixels exactly) and a 20 m band with bilinear; and the reverse: a 10 m
    band averaged onto a 20 m reference (2x2 block means)."""
    h, w = 24, 30
    fine = cube("float32", (2, h, w), seed=1)
    coarse = cube("float32", (1, h // 2, w // 2), seed=2)
    t10 = TRANSFORM
    t20 = Affine(20.0, 0.0, t10.c, 0.0, -20.0, t10.f)
    p10 = write_raster(tmp_path / "b10.tif", fine)
    p20 = write_raster(tmp_path / "b20.tif", coarse, transform=t20)
    with BandStackReader([p10, p20, p20], resampling=["nearest", "nearest", "bilinear"]) as r:
        assert r.shape == (4, h, w) and r.transform == t10 and r.resampled == (False, True, True)
        full = r.read(slice(0, h), slice(0, w))
        np.testing.assert_array_equal(full[:2], fine)
        np.testing.assert_array_equal(full[2], np.repeat(np.repeat(coarse[0], 2, 0), 2, 1))
        bil = full[3]
        assert np.isfinite(bil).all() and coarse.min() <= bil.min() and bil.max() <= coarse.max()
    for layout in [TileLayout.even(h, w, (2, 3)), TileLayout(rows=(0, 7, 24), cols=(0, 1, 30))]:
        for i in range(layout.grid[0]):
            for j in range(layout.grid[1]):
                rows, cols = layout.tile(i, j)
                with BandStackReader([p10, p20, p20], resampling=["nearest", "nearest", "bilinear"]) as r:
                    np.testing.assert_array_equal(r.read(rows, cols), full[:, rows, cols])
    # downsampling onto a coarser reference: average of each 2x2 block
    with BandStackReader([p20, p10], reference=0, resampling="average") as r:
        assert r.shape == (3, h // 2, w // 2)
        down = r.read(slice(0, h // 2), slice(0, w // 2))
        blocks = fine.reshape(2, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
        np.testing.assert_allclose(down[1:], blocks, rtol=1e-6)


def test_band_stack_uncovered_pixels_are_nodata(tmp_path):
    """A coarse band that ends short of the reference grid leaves NaN (invalid), not zeros."""
    fine = cube("float32", (1, 20, 20), seed=3)
    short = cube("uint16", (1, 9, 9), seed=4)         # 9 x 20 m = 180 m < 200 m
    p10 = write_raster(tmp_path / "f.tif", fine)
    p20 = write_raster(tmp_path / "s.tif", short, transform=Affine(20.0, 0, TRANSFORM.c, 0, -20.0, TRANSFORM.f))
    with BandStackReader([p10, p20], resampling="bilinear") as r:
        assert np.isnan(r.nodata[1])
        full = r.read(slice(0, 20), slice(0, 20))
    assert np.isnan(full[1, -1, :]).all() and np.isnan(full[1, :, -1]).all()
    assert np.isfinite(full[1, :17, :17]).all()


# --- what a rank reads ----------------------------------------------------------------------------
def _rank_bytes(kwargs, layout):
    out = {}
    for i in range(layout.grid[0]):
        for j in range(layout.grid[1]):
            counter = IOCounter()
            with open_reader(**kwargs, counter=counter) as r:
                counter.bytes_read = 0                  # opening reads headers; count the tile read only
                r.read(*layout.tile(i, j))
            out[(i, j)] = (counter.bytes_read, counter.reads)
    return out


@pytest.mark.parametrize("fmt", ["cog", "hdf5-chunked", "hdf5-contiguous", "mat73"])
def test_rank_reads_its_tile_not_the_scene(tmp_path, fmt):
    """Bytes pulled from the file by each of 2x2 ranks of a 4 x 256 x 256 uint16 scene
    (512 KiB of pixels): about a quarter each, far from the whole scene."""
    c, h, w = 4, 256, 256
    a = cube("uint16", (c, h, w), seed=5)
    scene_bytes = a.nbytes
    if fmt == "cog":
        kwargs = {"path": write_raster(tmp_path / "c.tif", a, driver="COG", blocksize=32, compress="NONE",
                                       overviews="NONE")}
    elif fmt == "hdf5-chunked":
        kwargs = {"path": write_h5(tmp_path / "k.h5", "x", a, chunks=(c, 32, 32)), "dataset": "x"}
    elif fmt == "hdf5-contiguous":
        kwargs = {"path": write_h5(tmp_path / "n.h5", "x", a), "dataset": "x"}
    else:
        kwargs = {"path": write_mat73(tmp_path / "m.mat", {"x": a.transpose(1, 2, 0)}) or tmp_path / "m.mat"}
    layout = TileLayout.even(h, w, (2, 2), align=32)
    full_counter = IOCounter()
    with open_reader(**kwargs, counter=full_counter) as r:
        full_counter.bytes_read = 0
        r.read(slice(0, h), slice(0, w))
    assert full_counter.bytes_read >= scene_bytes
    for (i, j), (nbytes, reads) in _rank_bytes(kwargs, layout).items():
        rows, cols = layout.tile(i, j)
        tile_bytes = c * (rows.stop - rows.start) * (cols.stop - cols.start) * 2
        assert [rec.shape for rec in reads] == [(c, rows.stop - rows.start, cols.stop - cols.start)]
        assert tile_bytes <= nbytes <= 1.15 * tile_bytes + 16384, (fmt, (i, j), nbytes, tile_bytes)
        assert nbytes < 0.3 * scene_bytes


def test_striped_geotiff_reads_whole_rows(tmp_path):
    """A striped GeoTIFF decodes whole strips: a 2x1 (rows) grid reads about half the
    file per rank, a 1x2 (cols) grid the whole file per rank (documented; choose_grid
    prefers row splits, and tiled GeoTIFF/COG avoid this)."""
    a = cube("uint16", (2, 128, 128), seed=6)
    kwargs = {"path": write_raster(tmp_path / "s.tif", a, blockysize=4)}
    by_rows = _rank_bytes(kwargs, TileLayout.even(128, 128, (2, 1)))
    by_cols = _rank_bytes(kwargs, TileLayout.even(128, 128, (1, 2)))
    assert all(n <= 0.55 * a.nbytes for n, _ in by_rows.values())
    assert all(n >= a.nbytes for n, _ in by_cols.values())


def test_mat_v5_loads_the_whole_variable(tmp_path):
    """Honest limitation: scipy reads a v5 variable whole, whatever the window."""
    a = cube("float64", (4, 64, 64), seed=7)
    p = write_mat5(tmp_path / "v5.mat", {"x": a.transpose(1, 2, 0)})
    counter = IOCounter()
    with open_reader(p, counter=counter) as r:
        counter.bytes_read = 0
        tile = r.read(slice(0, 8), slice(0, 8))
    np.testing.assert_array_equal(tile, a[:, :8, :8])
    assert counter.bytes_read >= a.nbytes
