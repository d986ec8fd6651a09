"""Windowed readers: each reads a ``rows x cols`` window of a ``C x H x W`` image
from disk, never the whole scene (except MATLAB v5, see :class:`MatReader`).

Every reader has the same contract:

- ``shape`` is the global ``(C, H, W)``; ``dtype`` the dtype :meth:`Reader.read`
  returns; ``nodata`` one value (or None) per band; ``crs`` and ``transform``
  the georeferencing (None where the format has none and the scene gives none).
- ``read(rows, cols)`` takes global slices inside the scene and returns a new
  ``(C, h, w)`` array holding exactly that window, with the file's values (no
  normalisation, no nodata filling).
- Opening checks the file and its metadata only (cheap, no pixel data), and any
  failure is a one-line :class:`DataError` naming the file.
- An optional :class:`IOCounter` records every window requested and counts the
  bytes actually pulled from the file (through Python file objects); tests use it
  to show that a rank reads its tile, not the scene.

Formats: :class:`RasterReader` (anything GDAL reads: GeoTIFF, COG, ENVI
``.hdr/.img``, JPEG2000, VRT), :class:`BandStackReader` (one file per band, resampled
onto a reference grid), :class:`HDF5Reader` (h5py slices, band-first or
band-last), :class:`MatReader` (MATLAB v7.3 via h5py slices; v5 via scipy, which
loads the variable whole).
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..cli_args import one_line
from .errors import DataError

Window = tuple[slice, slice]

# Sidecar data files an ENVI header may describe, in the order GDAL users name them.
_ENVI_DATA_SUFFIXES = ("", ".img", ".dat", ".raw", ".bsq", ".bil", ".bip", ".bin")

RESAMPLING = ("nearest", "bilinear", "cubic", "average", "mode")


# --- I/O accounting ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ReadRecord:
    """One window request: file, global row/col ranges, bands, bytes of the array returned."""

    path: str
    rows: tuple[int, int]
    cols: tuple[int, int]
    bands: int
    nbytes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.bands, self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]


@dataclass
class IOCounter:
    """What readers read: ``reads`` (every window requested, one record per file and
    call) and ``bytes_read`` (bytes pulled from the files, counted on the Python
    file objects GDAL and HDF5 read through; includes headers and whole
    strips/blocks/chunks the format forces, so it is the real disk traffic)."""

    bytes_read: int = 0
    reads: list[ReadRecord] = field(default_factory=list)

    def open(self, path, mode: str = "rb"):
        """A counting binary file object (rasterio ``opener`` / h5py file object)."""
        if "w" in mode or "a" in mode or "+" in mode:
            raise PermissionError(f"IOCounter opens files read-only, not with mode {mode!r}")
        return _CountingFile(os.fspath(path), self)

    def record(self, path: str, rows: tuple[int, int], cols: tuple[int, int], bands: int, nbytes: int) -> None:
        self.reads.append(ReadRecord(str(path), rows, cols, bands, int(nbytes)))

    def reset(self) -> None:
        self.bytes_read = 0
        self.reads.clear()


class _CountingFile(io.FileIO):
    def __init__(self, path: str, counter: IOCounter):
        super().__init__(path, "r")
        self._counter = counter

    def read(self, size=-1):
        data = super().read(size)
        self._counter.bytes_read += len(data) if data else 0
        return data

    def readinto(self, buffer):
        n = super().readinto(buffer)
        self._counter.bytes_read += n or 0
        return n


# --- helpers ------------------------------------------------------------------------------------
def window_bounds(rows: slice, cols: slice, height: int, width: int, what: str = "window") -> tuple[int, int, int, int]:
    """``(r0, r1, c0, c1)`` of global slices, checked to be a non-empty window inside
    a ``height x width`` scene (steps other than 1 are refused)."""
    out = []
    for s, n, axis in ((rows, height, "rows"), (cols, width, "cols")):
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise DataError(None, f"{what}: {axis} must be a slice with step 1, got {s!r}")
        a = 0 if s.start is None else int(s.start)
        b = n if s.stop is None else int(s.stop)
        if not 0 <= a < b <= n:
            raise DataError(None, f"{what}: {axis} [{a}, {b}) is empty or outside the scene's [0, {n})")
        out += [a, b]
    return out[0], out[1], out[2], out[3]


def _raster_error(path, exc: Exception, doing: str = "cannot open as a raster") -> DataError:
    msg = one_line(exc)
    cause = exc.__cause__ or exc.__context__
    if cause is not None and "previous exception" in msg:
        msg = one_line(cause)        # GDAL's own reason (e.g. a truncated strip)
    if not os.path.exists(path):
        return DataError(path, "file not found")
    # GDAL repeats the path in its message; keep the reason only.
    msg = msg.replace(f"'{path}'", "").replace(str(path), "").strip(" :")
    return DataError(path, f"{doing} ({msg or type(exc).__name__})")


def _check_exists(path) -> None:
    if not os.path.exists(path):
        raise DataError(path, "file not found")
    if os.path.isdir(path):
        raise DataError(path, "is a directory, not a file")


def _nodata_list(nodata, count: int, path, file_values: Sequence) -> tuple:
    """Per-band nodata: the override (one value or one per band) or the file's."""
    if nodata is None:
        return tuple(None if v is None else float(v) for v in file_values)
    if isinstance(nodata, (list, tuple)):
        if len(nodata) != count:
            raise DataError(path, f"nodata has {len(nodata)} values for {count} bands")
        return tuple(None if v is None else float(v) for v in nodata)
    return (float(nodata),) * count


def resolve_envi(path: str | os.PathLike) -> str:
    """An ENVI ``.hdr`` path -> the data file GDAL opens (the header's companion)."""
    p = os.fspath(path)
    if not p.lower().endswith(".hdr"):
        return p
    stem = p[:-4]
    for suffix in _ENVI_DATA_SUFFIXES:
        if os.path.isfile(stem + suffix):
            return stem + suffix
    raise DataError(p, f"ENVI header without a data file (looked for {', '.join(Path(stem + s).name for s in _ENVI_DATA_SUFFIXES)})")


# --- readers ------------------------------------------------------------------------------------
class Reader:
    """Base class; see the module docstring for the contract."""

    path: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    nodata: tuple
    crs = None
    transform = None
    counter: IOCounter | None = None

    def read(self, rows: slice, cols: slice) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _window(self, rows: slice, cols: slice) -> tuple[int, int, int, int]:
        return window_bounds(rows, cols, self.shape[1], self.shape[2], what=f"{self.path}: read")

    def _record(self, path, r0, r1, c0, c1, arr: np.ndarray) -> None:
        if self.counter is not None:
            self.counter.record(path, (r0, r1), (c0, c1), arr.shape[0] if arr.ndim == 3 else 1, arr.nbytes)

    def _geo_override(self, crs, transform) -> None:
        if crs is not None:
            from rasterio.crs import CRS

            try:
                self.crs = CRS.from_user_input(crs)
            except Exception as e:
                raise DataError(self.path, f"invalid crs {crs!r} ({one_line(e)})") from None
        if transform is not None:
            from affine import Affine

            if len(transform) != 6:
                raise DataError(self.path, f"transform must have 6 numbers (a, b, c, d, e, f), got {list(transform)}")
            self.transform = Affine(*[float(v) for v in transform])


def _open_raster(path: str, counter: IOCounter | None):
    import rasterio
    from rasterio.errors import RasterioError

    _check_exists(path)
    try:
        if counter is not None:
            return rasterio.open(path, opener=counter.open)
        return rasterio.open(path)
    except (RasterioError, OSError) as e:
        raise _raster_error(path, e) from None


class RasterReader(Reader):
    """Any GDAL raster (GeoTIFF, COG, ENVI ``.hdr``/``.img``, JPEG2000, VRT) through
    rasterio windows.

    ``bands``: 0-based band indices to use (default all). ``nodata``: one value or
    one per selected band, overriding the file's. Reads decode only the
    strips/blocks the window touches: a tiled GeoTIFF/COG reads about the tile's
    share of the file; a striped GeoTIFF reads whole rows, so a grid with several
    columns re-reads each strip once per column of tiles."""

    def __init__(self, path, *, bands: Sequence[int] | None = None, nodata=None, crs=None, transform=None,
                 counter: IOCounter | None = None):
        self.path = resolve_envi(path)
        self.counter = counter
        self._ds = _open_raster(self.path, counter)
        ds = self._ds
        n = ds.count
        if bands is None:
            bands = list(range(n))
        bad = [b for b in bands if not 0 <= int(b) < n]
        if bad:
            self.close()
            raise DataError(self.path, f"band indices {bad} out of range: the file has {n} bands (0-based indices)")
        self._indexes = [int(b) + 1 for b in bands]
        self.shape = (len(self._indexes), ds.height, ds.width)
        self.dtype = np.result_type(*[np.dtype(ds.dtypes[i - 1]) for i in self._indexes]) if self._indexes else np.dtype("float32")
        self.nodata = _nodata_list(nodata, len(self._indexes), self.path, [ds.nodatavals[i - 1] for i in self._indexes])
        self.crs = ds.crs
        self.transform = ds.transform if not ds.transform.is_identity else None
        self.descriptions = tuple(ds.descriptions[i - 1] for i in self._indexes)
        self._geo_override(crs, transform)

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        from rasterio.errors import RasterioError
        from rasterio.windows import Window

        r0, r1, c0, c1 = self._window(rows, cols)
        try:
            arr = self._ds.read(self._indexes, window=Window(c0, r0, c1 - c0, r1 - r0))
        except (RasterioError, OSError) as e:
            raise _raster_error(self.path, e, f"cannot read window rows [{r0}, {r1}) cols [{c0}, {c1})") from None
        arr = arr.astype(self.dtype, copy=False)
        self._record(self.path, r0, r1, c0, c1, arr)
        return arr

    def close(self) -> None:
        ds = getattr(self, "_ds", None)
        if ds is not None:
            ds.close()
            self._ds = None


def _same_grid(a, b) -> bool:
    return (a.crs == b.crs and a.width == b.width and a.height == b.height
            and a.transform.almost_equals(b.transform, precision=1e-9 * max(1.0, abs(a.transform.a))))


class BandStackReader(Reader):
    """One file per band (or per group of bands), put on one reference grid.

    The grid (CRS, transform, height, width) is that of ``paths[reference]``.
    Files already on it are read with plain windows. Others (e.g. Sentinel-2 20 m
    and 60 m bands under 10 m ones, or the 15 m Landsat 8 pan band under 30 m
    bands) are resampled with a GDAL warped VRT (``rasterio.vrt.WarpedVRT``) onto
    the reference grid: reading a window of the VRT makes GDAL read only the
    source pixels that window needs (plus the kernel's margin), and each output
    pixel depends only on its own source neighbourhood, so a tile read equals the
    same slice of a whole-scene read exactly (the tests check this).

    ``resampling`` (one name or one per file): ``bilinear`` (default, for
    reflectance upsampled onto a finer grid), ``average`` (reflectance
    downsampled onto a coarser grid: the mean of the covered source pixels),
    ``nearest`` / ``mode`` (categorical bands such as quality or class masks),
    ``cubic``. Resampled files are returned as float32 (integer DNs are not
    rounded); files on the grid keep their dtype; the stack has the common dtype.

    Nodata: the file's own nodata (or the override) is the source nodata, which
    GDAL excludes from the resampling kernels, and the destination nodata. A
    resampled file without nodata gets NaN as nodata, so reference-grid pixels it
    does not cover (e.g. the last 60 m column under a wider 10 m grid) read as
    invalid, not as zeros."""

    def __init__(self, paths: Sequence, *, reference: int = 0, resampling="bilinear", nodata=None,
                 crs=None, transform=None, counter: IOCounter | None = None):
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        paths = [resolve_envi(p) for p in paths]
        if not paths:
            raise DataError(None, "band stack: no files given")
        self.path = paths[0]
        self.paths = tuple(paths)
        self.counter = counter
        if not 0 <= reference < len(paths):
            raise DataError(self.path, f"band stack: reference {reference} is not an index into the {len(paths)} files")
        methods = list(resampling) if isinstance(resampling, (list, tuple)) else [resampling] * len(paths)
        if len(methods) != len(paths):
            raise DataError(self.path, f"band stack: {len(methods)} resampling methods for {len(paths)} files")
        for m in methods:
            if m not in RESAMPLING:
                raise DataError(self.path, f"band stack: unknown resampling {m!r} (use one of {', '.join(RESAMPLING)})")
        self._ds = []
        self._src = []   # what read() reads from, per file: the dataset or its WarpedVRT
        try:
            for p in paths:
                self._ds.append(_open_raster(p, counter))
            ref = self._ds[reference]
            count = sum(ds.count for ds in self._ds)
            nd = _nodata_list(nodata, count, self.path, [v for ds in self._ds for v in ds.nodatavals])
            nodata_out, dtypes, k = [], [], 0
            for p, ds, m in zip(paths, self._ds, methods):
                file_nd = nd[k:k + ds.count]
                k += ds.count
                if _same_grid(ds, ref):
                    self._src.append(ds)
                    nodata_out += file_nd
                    dtypes += [np.dtype(t) for t in ds.dtypes]
                    continue
                if ds.crs is None or ref.crs is None:
                    raise DataError(p, "band stack: file is not on the reference grid and has no CRS to resample with")
                if len({v for v in file_nd}) > 1:
                    raise DataError(p, f"band stack: a resampled multi-band file needs one nodata for all its bands, got {list(file_nd)}")
                src_nd = file_nd[0]
                out_dtype = np.dtype(ds.dtypes[0]) if m in ("nearest", "mode") else np.dtype("float32")
                dst_nd = src_nd if src_nd is not None else (float("nan") if out_dtype.kind == "f" else None)
                if dst_nd is None:
                    # nearest/mode on integer data without nodata: uncovered pixels would be 0;
                    # refuse rather than invent data (set nodata for this file).
                    if not _covers(ds, ref):
                        raise DataError(p, "band stack: file does not cover the reference grid and has no nodata "
                                           "to mark the uncovered pixels; give image.nodata")
                self._src.append(WarpedVRT(ds, crs=ref.crs, transform=ref.transform, width=ref.width,
                                           height=ref.height, resampling=getattr(Resampling, m),
                                           src_nodata=src_nd, nodata=dst_nd, dtype=out_dtype.name))
                nodata_out += [dst_nd] * ds.count
                dtypes += [out_dtype] * ds.count
        except DataError:
            self.close()
            raise
        except Exception as e:
            self.close()
            raise DataError(self.path, f"band stack: cannot build the resampled stack ({one_line(e)})") from None
        self.shape = (count, ref.height, ref.width)
        self.dtype = np.result_type(*dtypes)
        self.nodata = tuple(nodata_out)
        self.crs = ref.crs
        self.transform = ref.transform
        self.resampled = tuple(s is not ds for s, ds in zip(self._src, self._ds))
        self._geo_override(crs, transform)

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        from rasterio.errors import RasterioError
        from rasterio.windows import Window

        r0, r1, c0, c1 = self._window(rows, cols)
        win = Window(c0, r0, c1 - c0, r1 - r0)
        out = np.empty((self.shape[0], r1 - r0, c1 - c0), dtype=self.dtype)
        k = 0
        for p, src in zip(self.paths, self._src):
            try:
                arr = src.read(window=win)
            except (RasterioError, OSError) as e:
                raise _raster_error(p, e, f"cannot read window rows [{r0}, {r1}) cols [{c0}, {c1})") from None
            out[k:k + arr.shape[0]] = arr
            self._record(p, r0, r1, c0, c1, arr)
            k += arr.shape[0]
        return out

    def close(self) -> None:
        for s, ds in zip(getattr(self, "_src", []), getattr(self, "_ds", [])):
            if s is not ds:
                s.close()
        for ds in getattr(self, "_ds", []):
            ds.close()
        self._src, self._ds = [], []


def _covers(ds, ref) -> bool:
    """Does ``ds`` cover the bounds of ``ref`` (same CRS assumed)?"""
    a, b = ds.bounds, ref.bounds
    return a.left <= b.left and a.right >= b.right and a.bottom <= b.bottom and a.top >= b.top


def _open_h5(path: str, counter: IOCounter | None, what: str = "HDF5"):
    import h5py

    _check_exists(path)
    fobj = None
    try:
        if counter is not None:
            fobj = counter.open(path)
            return h5py.File(fobj, "r"), fobj
        return h5py.File(path, "r"), None
    except Exception as e:
        if fobj is not None:
            fobj.close()
        raise DataError(path, f"not a readable {what} file ({one_line(e)})") from None


def _h5_datasets(f) -> list[str]:
    import h5py

    names: list[str] = []
    f.visititems(lambda name, obj: names.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _h5_dataset(f, path: str, name: str | None, what: str = "dataset"):
    import h5py

    available = _h5_datasets(f)
    if name is None:
        cubes = [n for n in available if f[n].ndim in (2, 3)]
        if len(cubes) == 1:
            return f[cubes[0]], cubes[0]
        raise DataError(path, f"give the {what} path: the file holds {len(available)} datasets "
                              f"({', '.join(available[:8]) or 'none'}{', ...' if len(available) > 8 else ''})")
    try:
        obj = f[name]
    except Exception:
        raise DataError(path, f"no {what} '{name}' in the file (datasets: {', '.join(available[:8]) or 'none'}"
                              f"{', ...' if len(available) > 8 else ''})") from None
    if not isinstance(obj, h5py.Dataset):
        raise DataError(path, f"'{name}' is a group, not a dataset (datasets: {', '.join(available[:8]) or 'none'})")
    return obj, name


def _layout_axes(layout: str, ndim: int, path) -> tuple[int, int, int | None]:
    """Axis of (H, W, C) in a dataset of ``ndim`` dims for layout ``CHW``/``HWC``."""
    layout = str(layout).upper()
    if layout not in ("CHW", "HWC"):
        raise DataError(path, f"layout must be 'CHW' (band-first) or 'HWC' (band-last), got {layout!r}")
    if ndim == 2:
        return 0, 1, None
    if ndim != 3:
        raise DataError(path, f"dataset has {ndim} dims; an image needs 2 (H, W) or 3 ({layout})")
    return (1, 2, 0) if layout == "CHW" else (0, 1, 2)


class HDF5Reader(Reader):
    """An HDF5 dataset through h5py hyperslab reads.

    ``dataset``: path inside the file (e.g. ``/cube``; may be omitted when the file
    holds exactly one 2-D/3-D dataset). ``layout``: ``CHW`` (band-first) or ``HWC``
    (band-last); a 2-D dataset is one band. A window read selects
    ``[:, r0:r1, c0:c1]`` (or ``[r0:r1, c0:c1, :]``), so HDF5 reads only the
    chunks (chunked layout) or the row runs (contiguous layout) that hold the
    window. Georeferencing comes from ``crs``/``transform`` (HDF5 has no standard
    for it); ``nodata`` from the argument or the dataset's ``_FillValue``/``nodata``
    attribute."""

    def __init__(self, path, *, dataset: str | None = None, layout: str = "CHW", nodata=None, crs=None,
                 transform=None, counter: IOCounter | None = None):
        self.path = os.fspath(path)
        self.counter = counter
        self._f, self._fobj = _open_h5(self.path, counter)
        try:
            self._ds, self.dataset = _h5_dataset(self._f, self.path, dataset)
            ds = self._ds
            if ds.dtype.kind not in "biuf":
                raise DataError(self.path, f"dataset '{self.dataset}' has non-numeric dtype {ds.dtype}")
            self._h, self._w, self._c = _layout_axes(layout, ds.ndim, self.path)
            shape = ds.shape
            count = 1 if self._c is None else shape[self._c]
            self.shape = (count, shape[self._h], shape[self._w])
            self.dtype = ds.dtype
            if nodata is None:
                for key in ("nodata", "_FillValue", "missing_value"):
                    if key in ds.attrs:
                        nodata = float(np.asarray(ds.attrs[key]).ravel()[0])
                        break
            self.nodata = _nodata_list(nodata, count, self.path, [None] * count)
            self._geo_override(crs, transform)
        except BaseException:
            self.close()
            raise

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        r0, r1, c0, c1 = self._window(rows, cols)
        idx = [slice(None)] * self._ds.ndim
        idx[self._h], idx[self._w] = slice(r0, r1), slice(c0, c1)
        try:
            arr = self._ds[tuple(idx)]
        except Exception as e:
            raise DataError(self.path, f"cannot read '{self.dataset}' rows [{r0}, {r1}) cols [{c0}, {c1}) "
                                       f"({one_line(e)})") from None
        if self._c is None:
            arr = arr[None]
        elif self._c == 2:
            arr = np.ascontiguousarray(arr.transpose(2, 0, 1))
        self._record(self.path, r0, r1, c0, c1, arr)
        return arr

    def close(self) -> None:
        f = getattr(self, "_f", None)
        if f is not None:
            f.close()
            self._f = None
        if getattr(self, "_fobj", None) is not None:
            self._fobj.close()
            self._fobj = None


def mat_version(path) -> str:
    """``'7.3'`` (an HDF5 file) or ``'5'`` (MATLAB v4/v5/v7 format) of a .mat file."""
    import h5py

    _check_exists(path)
    try:
        return "7.3" if h5py.is_hdf5(os.fspath(path)) else "5"
    except OSError as e:
        raise DataError(path, f"cannot read ({one_line(e)})") from None


class MatReader(Reader):
    """A MATLAB .mat variable. ``layout`` is in MATLAB's own axis order, as MATLAB
    and ``scipy.io.loadmat`` show it: ``HWC`` (the usual ``rows x cols x bands``
    hyperspectral cube) or ``CHW``; a 2-D variable is one band.

    **v7.3** files are HDF5: MATLAB writes arrays column-major, so h5py sees the
    axes reversed (a MATLAB ``H x W x C`` variable is an HDF5 ``C x W x H``
    dataset). A window read is an h5py hyperslab of that dataset, transposed
    back; only the window is read.

    **v5** (also v4/v6/v7, the pre-HDF5 formats): ``scipy.io.loadmat`` cannot read
    part of a variable, so **every read loads the whole variable** (decompressing
    it if MATLAB compressed it) and keeps only the window; the rank holds the
    whole cube for the duration of the read. Opening only reads the header
    (``scipy.io.whosmat``). For scenes larger than memory, save with
    ``save -v7.3`` or convert to HDF5/GeoTIFF."""

    def __init__(self, path, *, variable: str | None = None, layout: str = "HWC", nodata=None, crs=None,
                 transform=None, counter: IOCounter | None = None):
        self.path = os.fspath(path)
        self.counter = counter
        self.version = mat_version(self.path)
        self.variable = variable
        self._f = self._fobj = None
        layout = str(layout).upper()
        try:
            if self.version == "7.3":
                self._f, self._fobj = _open_h5(self.path, counter, "MATLAB v7.3")
                self._ds, name = _h5_dataset(self._f, self.path, None if variable is None else variable, "variable")
                self.variable = name.lstrip("/")
                mshape = tuple(reversed(self._ds.shape))  # MATLAB's view
                cls = self._ds.attrs.get("MATLAB_class", b"")
                cls = cls.decode() if isinstance(cls, bytes) else str(cls)
                if cls and cls not in ("double", "single", "int8", "uint8", "int16", "uint16", "int32", "uint32",
                                       "int64", "uint64", "logical"):
                    raise DataError(self.path, f"variable '{self.variable}' is a MATLAB {cls}, not a numeric array")
                self.dtype = self._ds.dtype
            else:
                self._open_v5(variable)
                mshape = self._mshape
            self._h, self._w, self._c = _layout_axes(layout, len(mshape), self.path)
            count = 1 if self._c is None else mshape[self._c]
            self.shape = (count, mshape[self._h], mshape[self._w])
            self._mndim = len(mshape)
            self.nodata = _nodata_list(nodata, count, self.path, [None] * count)
            self._geo_override(crs, transform)
        except BaseException:
            self.close()
            raise

    _V5_DTYPES = {"double": "float64", "single": "float32", "int8": "int8", "uint8": "uint8", "int16": "int16",
                  "uint16": "uint16", "int32": "int32", "uint32": "uint32", "int64": "int64", "uint64": "uint64",
                  "logical": "uint8"}

    def _open_v5(self, variable):
        import scipy.io

        try:
            info = scipy.io.whosmat(self.path)
        except Exception as e:
            raise DataError(self.path, f"not a readable MATLAB file ({one_line(e)})") from None
        names = [n for n, _, _ in info]
        if variable is None:
            cubes = [(n, s, c) for n, s, c in info if len(s) in (2, 3)]
            if len(cubes) != 1:
                raise DataError(self.path, f"give the variable name: the file holds {', '.join(names) or 'no variables'}")
            variable = cubes[0][0]
        hit = [(s, c) for n, s, c in info if n == variable]
        if not hit:
            raise DataError(self.path, f"no variable '{variable}' in the file (variables: {', '.join(names) or 'none'})")
        shape, cls = hit[0]
        if cls not in self._V5_DTYPES:
            raise DataError(self.path, f"variable '{variable}' is a MATLAB {cls}, not a numeric array")
        self.variable = variable
        self._mshape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(self._V5_DTYPES[cls])

    def _load_v5(self) -> np.ndarray:
        import scipy.io

        try:
            if self.counter is not None:
                with self.counter.open(self.path) as f:
                    data = scipy.io.loadmat(f, variable_names=[self.variable])
            else:
                data = scipy.io.loadmat(self.path, variable_names=[self.variable])
        except Exception as e:
            raise DataError(self.path, f"cannot load variable '{self.variable}' ({one_line(e)})") from None
        arr = np.asarray(data[self.variable])
        if arr.shape != self._mshape:
            raise DataError(self.path, f"variable '{self.variable}' loads as {arr.shape}, header said {self._mshape}")
        return arr

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        r0, r1, c0, c1 = self._window(rows, cols)
        nd = self._mndim
        if self.version == "7.3":
            # MATLAB axis a is HDF5 axis nd-1-a.
            idx = [slice(None)] * nd
            idx[nd - 1 - self._h], idx[nd - 1 - self._w] = slice(r0, r1), slice(c0, c1)
            try:
                arr = self._ds[tuple(idx)]
            except Exception as e:
                raise DataError(self.path, f"cannot read '{self.variable}' rows [{r0}, {r1}) cols [{c0}, {c1}) "
                                           f"({one_line(e)})") from None
            arr = arr.transpose(tuple(reversed(range(nd))))  # back to MATLAB's axis order
        else:
            full = self._load_v5()
            idx = [slice(None)] * nd
            idx[self._h], idx[self._w] = slice(r0, r1), slice(c0, c1)
            arr = full[tuple(idx)]
            del full
        if self._c is None:
            arr = arr[None]
        else:
            arr = arr.transpose(self._c, self._h, self._w)
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        self._record(self.path, r0, r1, c0, c1, arr)
        return arr

    def close(self) -> None:
        if getattr(self, "_f", None) is not None:
            self._f.close()
            self._f = None
        if getattr(self, "_fobj", None) is not None:
            self._fobj.close()
            self._fobj = None


# --- format detection -----------------------------------------------------------------------------
FORMATS = ("auto", "raster", "hdf5", "mat")
_HDF5_SUFFIXES = (".h5", ".hdf5", ".he5", ".hdf", ".nc")


def detect_format(path) -> str:
    """``raster`` / ``hdf5`` / ``mat`` from the file name (``auto`` resolution)."""
    p = os.fspath(path).lower()
    if p.endswith(".mat"):
        return "mat"
    if p.endswith(_HDF5_SUFFIXES):
        return "hdf5"
    return "raster"


def open_reader(path=None, *, paths: Sequence | None = None, format: str = "auto", dataset: str | None = None,
                layout: str | None = None, bands: Sequence[int] | None = None, reference: int = 0,
                resampling="bilinear", nodata=None, crs=None, transform=None,
                counter: IOCounter | None = None) -> Reader:
    """Open the right reader for one file (``path``) or a per-band stack (``paths``).

    ``format``: ``auto`` (from the extension: ``.mat`` -> MATLAB, ``.h5/.hdf5/.he5/.hdf/.nc``
    -> HDF5, anything else -> GDAL raster), ``raster``, ``hdf5`` or ``mat``.
    ``dataset``: HDF5 dataset path or MATLAB variable name. ``layout``: ``CHW`` or
    ``HWC`` for HDF5 (default ``CHW``) and MATLAB (default ``HWC``, MATLAB's order)."""
    if (path is None) == (paths is None):
        raise DataError(None, "give exactly one of path (one file) and paths (one file per band)")
    if format not in FORMATS:
        raise DataError(path, f"unknown format {format!r} (use one of {', '.join(FORMATS)})")
    if paths is not None:
        if format not in ("auto", "raster"):
            raise DataError(paths[0] if paths else None, f"a per-band stack must be raster files, not {format}")
        if bands is not None or dataset is not None:
            raise DataError(paths[0] if paths else None, "bands/dataset do not apply to a per-band stack")
        return BandStackReader(paths, reference=reference, resampling=resampling, nodata=nodata, crs=crs,
                               transform=transform, counter=counter)
    fmt = detect_format(path) if format == "auto" else format
    if bands is not None and fmt != "raster":
        raise DataError(path, "bands (a subset of a raster's bands) applies to raster files only")
    if fmt == "hdf5":
        return HDF5Reader(path, dataset=dataset, layout=layout or "CHW", nodata=nodata, crs=crs,
                          transform=transform, counter=counter)
    if fmt == "mat":
        return MatReader(path, variable=dataset, layout=layout or "HWC", nodata=nodata, crs=crs,
                         transform=transform, counter=counter)
    if dataset is not None or layout is not None:
        raise DataError(path, "dataset/layout apply to HDF5 and MATLAB files only")
    return RasterReader(path, bands=bands, nodata=nodata, crs=crs, transform=transform, counter=counter)


def file_signature(paths: Sequence) -> list[list]:
    """``[path, size, mtime_ns]`` per file: what a cache keyed on the data must match."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out


def nbytes_of(shape: Sequence[int], dtype) -> int:
    return int(math.prod(shape)) * np.dtype(dtype).itemsize
