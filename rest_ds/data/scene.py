"""Scene description (a small YAML file or dataclasses) and :class:`SceneReader`,
which opens it, checks it and reads windows of image, label and region masks.

A scene description, with paths relative to the YAML file::

    name: nc-landsat7                 # also keys the augmentation seed and the stats cache
    image:
      paths: [b1.tif, b2.tif, b3.tif] # one file per band (a stack) ...
      # path: cube.h5                 # ... or one file: GeoTIFF/COG/ENVI/JP2, HDF5, MATLAB
      # format: auto                  # auto | raster | hdf5 | mat
      # dataset: /cube                # HDF5 dataset path / MATLAB variable name
      # layout: CHW                   # CHW (band-first) | HWC (band-last); MATLAB order for .mat
      # bands: [0, 1, 2]              # 0-based subset of a single file's bands
      reference: 0                    # stack: the file whose grid the others are resampled onto
      resampling: bilinear            # stack: one name or one per file (see BandStackReader)
      nodata: -99999                  # one value or one per band; default: the files' own
      # nonfinite: nodata             # NaN/inf pixels are nodata too (default error: a corrupt file)
      # crs: EPSG:32618               # for formats without georeferencing (HDF5, MATLAB)
      # transform: [10, 0, 4e5, 0, -10, 4.2e6]
    band_names: [B1, B2, B3]
    label:
      path: classes.tif               # same keys as image (single file, one band)
      nodata: -99999
      unlabeled: [0]                  # raw values meaning "no label"
    classes:                          # order defines the class ids 0..K-1
      - {value: 1, name: developed, color: "#e31a1c"}
      - {value: 5, name: forest, color: [51, 160, 44]}
    ignore_index: -100
    regions:                          # optional train/val/test areas of the one scene
      train: {windows: [[0, 300, 0, 489]]}   # [row0, row1, col0, col1], half-open, pixels
      val: {path: val_mask.tif}              # or a mask raster on the scene grid (non-zero = in)
    stats: {mean: [...], std: [...]}  # optional; otherwise computed and cached (stats.py)
    dates: 1                          # T > 1: a time series on one grid, T * C bands date-major
                                      # (band t * C + c); tiles keep that (T * C, h, w) order

Parsed by ``rest_ds.config_schema`` like every config: unknown keys are an
error with a did-you-mean (a typo must not silently change nothing), values are
typed (``dates`` >= 1, band indices >= 0, colours ``'#rrggbb'`` or ``[r, g, b]``),
and an error is one :class:`DataError` line naming the file and the key.

**Validity.** A pixel is valid when every band differs from that band's nodata
(NaN nodata: is not NaN) and, with ``image.nonfinite: nodata``, every band is
finite (otherwise NaN/inf on a valid pixel is an error naming the pixel).
Labels of invalid pixels, of label-nodata pixels, of ``unlabeled`` values and
(with a region) of pixels outside the region are ``ignore_index``.
``ignore_index`` defaults to -100, PyTorch's default for ``cross_entropy``;
labels are int64.

**Grids.** Label and region rasters must lie on the image grid: same height and
width, and, where both carry georeferencing, the same transform (to 1e-6
pixel) and the same CRS. Two CRSs that differ only in the datum realisation
(same projection and parameters, same ellipsoid, e.g. NAD83 vs NAD83(HARN):
EPSG:32119 vs EPSG:3358) with identical transforms are accepted with a
:class:`DataWarning`; anything else is a :class:`DataError`. Labels are never
resampled.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

from ..config_schema import ConfigError, bounded, check_ranges, load_yaml, parse_dataclass
from .errors import DataError, DataWarning
from .readers import IOCounter, Reader, open_reader, window_bounds

IGNORE_INDEX = -100

# A colour-blind-safe-ish default palette for classes without a colour.
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


# --- description ------------------------------------------------------------------------------
def _path_shorthand(value: Any) -> Any:
    return {"path": value} if isinstance(value, (str, os.PathLike)) else value


@dataclass
class Source:
    """Where an image, label or region mask lives (see the module docstring)."""

    path: str | None = None
    paths: list[str] | None = None
    format: Literal["auto", "raster", "hdf5", "mat"] = "auto"
    dataset: str | None = None
    layout: str | None = None
    bands: list[int] | None = bounded(None, ge=0)
    reference: int = bounded(0, ge=0)
    resampling: str | list[str] = "bilinear"
    nodata: float | list[float] | None = None
    nonfinite: Literal["error", "nodata"] = "error"   # image: NaN/inf on a valid pixel is an error, or nodata
    crs: str | None = None
    transform: list[float] | None = None

    config_shorthand = staticmethod(_path_shorthand)  # ``image: img.tif``

    def files(self) -> list[str]:
        return list(self.paths) if self.paths is not None else ([self.path] if self.path is not None else [])

    def open(self, counter: IOCounter | None = None) -> Reader:
        return open_reader(self.path, paths=self.paths, format=self.format, dataset=self.dataset,
                           layout=self.layout, bands=self.bands, reference=self.reference,
                           resampling=self.resampling, nodata=self.nodata, crs=self.crs,
                           transform=self.transform, counter=counter)


@dataclass
class LabelSource(Source):
    """A label raster (one band); ``unlabeled`` raw values become ``ignore_index``."""

    unlabeled: list[int | float] = field(default_factory=list)


def _parse_color(color: Any) -> tuple[int, int, int]:
    """``'#rrggbb'`` or ``[r, g, b]`` (0..255) -> ``(r, g, b)``; ValueError otherwise."""
    try:
        if isinstance(color, str):
            s = color.lstrip("#")
            if len(s) != 6:
                raise ValueError
            return int(s[0:2], 16), int(s[2:4], 16), int(s[4:6], 16)
        if isinstance(color, bool) or not isinstance(color, (list, tuple)):
            raise ValueError
        rgb = tuple(int(v) for v in color)
        if len(rgb) != 3 or not all(0 <= v <= 255 and v == c for v, c in zip(rgb, color)):
            raise ValueError
        return rgb  # type: ignore[return-value]
    except (ValueError, TypeError):
        raise ValueError(f"{color!r} is not '#rrggbb' or [r, g, b] in 0..255") from None


@dataclass
class ClassInfo:
    """One class: its raw ``value`` in the label file, ``name`` (default
    ``class_<value>``) and display ``color`` (``'#rrggbb'`` or ``[r, g, b]``)."""

    value: int | float
    name: str | None = None
    color: tuple[int, int, int] | None = field(default=None, metadata={"parse": _parse_color})

    # ``classes: [1, 5]`` for ``[{value: 1}, {value: 5}]``
    config_shorthand = staticmethod(lambda v: {"value": v} if isinstance(v, (int, float)) else v)

    def __post_init__(self):
        if self.name is None:
            self.name = f"class_{self.value}"


@dataclass
class Region:
    """A named area of the scene: pixel rectangles ``[r0, r1, c0, c1]`` (half-open) or
    a mask raster on the scene grid (non-zero or one of ``values`` = inside)."""

    windows: list[list[int]] | None = None
    path: str | None = None
    format: Literal["auto", "raster", "hdf5", "mat"] = "auto"
    dataset: str | None = None
    layout: str | None = None
    values: list[float] | None = None


@dataclass
class StatsSpec:
    mean: list[float]
    std: list[float]


@dataclass
class Scene:
    """A whole scene: image, optional label, classes, regions, normalisation.
    Build it directly or with :meth:`from_yaml`; paths are absolute after loading."""

    name: str
    image: Source
    band_names: list[str] | None = None
    label: LabelSource | None = None
    classes: list[ClassInfo] = field(default_factory=list)
    ignore_index: int = IGNORE_INDEX
    regions: dict[str, Region] = field(default_factory=dict)
    stats: StatsSpec | None = None
    description: str | None = None
    dates: int = bounded(1, ge=1)
    source_file: str | None = field(default=None, metadata={"internal": True})

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "Scene":
        """Read and check a scene YAML file (:class:`DataError` naming the file and key)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(path, "scene description not found")
        try:
            data = load_yaml(path, "scene")
        except ConfigError as e:
            raise DataError(path, e.message) from None
        return cls.from_dict(data, root=os.path.dirname(os.path.abspath(path)), source_file=path)

    @classmethod
    def from_dict(cls, data: Any, root: str | os.PathLike | None = None, source_file: str | None = None) -> "Scene":
        """Build from a parsed description (rest_ds.config_schema: types, ranges,
        unknown keys with a did-you-mean); relative paths are taken from ``root``.
        Raises :class:`DataError` naming ``source_file`` and the key."""
        where = source_file
        try:
            scene = parse_dataclass(cls, data, where, "")
        except ConfigError as e:
            raise DataError(where, f"{e.key}: {e.message}") from None
        scene.source_file = source_file
        root = os.fspath(root) if root is not None else os.getcwd()
        for what, src in (("image", scene.image), ("label", scene.label)):
            if src is None:
                continue
            if (src.path is None) == (src.paths is None):
                raise DataError(where, f"{what}: give exactly one of path (one file) and paths (one file per band)")
            if src.paths is not None and not src.paths:
                raise DataError(where, f"{what}.paths: must be a non-empty list of files")
            if src.path is not None:
                src.path = _abs(src.path, root)
            if src.paths is not None:
                src.paths = [_abs(p, root) for p in src.paths]
        for reg in scene.regions.values():
            if reg.path is not None:
                reg.path = _abs(reg.path, root)
        scene.validate()
        return scene

    def validate(self) -> None:
        """Checks of the description alone (no file is opened)."""
        where = self.source_file
        if not self.name:
            raise DataError(where, "name: the scene needs a name")
        if isinstance(self.dates, bool) or not isinstance(self.dates, int) or self.dates < 1:
            raise DataError(where, f"dates: must be a whole number >= 1 (dates of the time series), not {self.dates!r}")
        try:  # parsing checked the fields' ranges; a scene built in code may not be
            check_ranges(self, where, "")
        except ConfigError as e:
            raise DataError(where, f"{e.key}: {e.message}") from None
        if self.label is not None and not self.classes:
            raise DataError(where, "classes: a label is given but no classes (list the raw label values, in id order)")
        values = [c.value for c in self.classes]
        if len(set(values)) != len(values):
            raise DataError(where, f"classes: duplicate raw values {sorted(v for v in values if values.count(v) > 1)}")
        if self.classes and self.ignore_index in range(len(self.classes)):
            raise DataError(where, f"ignore_index: {self.ignore_index} collides with a class id (0..{len(self.classes) - 1})")
        if self.stats is not None and len(self.stats.mean) != len(self.stats.std):
            raise DataError(where, f"stats: {len(self.stats.mean)} means but {len(self.stats.std)} stds")
        if self.stats is not None and not all(s > 0 and math.isfinite(s) for s in self.stats.std):
            raise DataError(where, "stats.std: every std must be finite and > 0")
        for rname, r in self.regions.items():
            if (r.windows is None) == (r.path is None):
                raise DataError(where, f"regions.{rname}: give exactly one of windows and path")
            for w in r.windows or []:
                if len(w) != 4 or not (0 <= w[0] < w[1] and 0 <= w[2] < w[3]):
                    raise DataError(where, f"regions.{rname}: window {w} is not [row0, row1, col0, col1] with row0 < row1, col0 < col1")

    def to_dict(self) -> dict:
        """The description as plain data (inverse of :meth:`from_dict` with absolute paths)."""
        def clean(obj):
            d = dataclasses.asdict(obj)
            return {k: v for k, v in d.items() if v is not None and v != [] and k != "source_file"}

        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["image"] = _drop_defaults(clean(self.image), Source)
        if self.band_names:
            out["band_names"] = list(self.band_names)
        if self.label is not None:
            out["label"] = _drop_defaults(clean(self.label), LabelSource)
        if self.classes:
            out["classes"] = [{"value": c.value, "name": c.name,
                               **({"color": "#%02x%02x%02x" % tuple(c.color)} if c.color else {})}
                              for c in self.classes]
        if self.ignore_index != IGNORE_INDEX:
            out["ignore_index"] = self.ignore_index
        if self.dates != 1:
            out["dates"] = self.dates
        if self.regions:
            out["regions"] = {k: _drop_defaults(clean(r), Region) for k, r in self.regions.items()}
        if self.stats is not None:
            out["stats"] = {"mean": list(self.stats.mean), "std": list(self.stats.std)}
        return out

    def to_yaml(self, path: str | os.PathLike, relative_to: str | os.PathLike | None = None) -> None:
        """Write the description; paths are made relative to ``relative_to`` (default: the YAML's folder)."""
        import yaml

        base = os.path.abspath(relative_to if relative_to is not None else os.path.dirname(os.path.abspath(path)))
        d = self.to_dict()

        def rel(p):
            return os.path.relpath(p, base)

        for key in ("image", "label"):
            if key in d:
                if "path" in d[key]:
                    d[key]["path"] = rel(d[key]["path"])
                if "paths" in d[key]:
                    d[key]["paths"] = [rel(p) for p in d[key]["paths"]]
        for r in d.get("regions", {}).values():
            if "path" in r:
                r["path"] = rel(r["path"])
        with open(path, "w") as f:
            yaml.safe_dump(d, f, sort_keys=False, default_flow_style=None, width=120)

    # -- convenience ---------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def class_colors(self) -> list[tuple[int, int, int]]:
        return [c.color if c.color is not None else _PALETTE[i % len(_PALETTE)] for i, c in enumerate(self.classes)]

    def files(self) -> list[str]:
        out = self.image.files() + (self.label.files() if self.label else [])
        return out + [r.path for r in self.regions.values() if r.path]


def _drop_defaults(d: dict, cls) -> dict:
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else
                         f.default_factory() if f.default_factory is not dataclasses.MISSING else object())
                for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if defaults.get(k, object()) != v}


def _abs(p, root: str) -> str:
    p = os.path.expanduser(os.fspath(p))
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(root, p))


# --- grid comparison --------------------------------------------------------------------------
_DATUM_ELLIPSOID = {"NAD83": "GRS80", "WGS84": "WGS84", "NAD27": "clrk66", "ETRS89": "GRS80", "GGRS87": "GRS80"}
_DATUM_ONLY_KEYS = {"datum", "towgs84", "nadgrids", "no_defs", "type", "wktext"}


def _projection_key(crs) -> dict | None:
    """PROJ parameters of ``crs`` with the datum replaced by its ellipsoid: equal keys
    mean the same projection on the same ellipsoid, differing at most in the datum
    realisation (NAD83 vs NAD83(HARN) vs NAD83(2011), ETRS89 realisations, ...)."""
    try:
        d = dict(crs.to_dict())
    except Exception:
        return None
    if not d:
        return None
    if "datum" in d and "ellps" not in d:
        ell = _DATUM_ELLIPSOID.get(str(d["datum"]))
        if ell is None:
            return None
        d["ellps"] = ell
    return {k: (round(v, 9) if isinstance(v, float) else v) for k, v in d.items() if k not in _DATUM_ONLY_KEYS}


def _crs_identical(a, b) -> bool:
    """Strict identity (rasterio's ``==`` calls NAD83 and NAD83(HARN) the same): the
    same WKT, or the same PROJ parameters including the datum. (EPSG look-ups are
    avoided here: they cost ~0.1 s per CRS.)"""
    if a.to_wkt() == b.to_wkt():
        return True
    try:
        return bool(a.to_dict()) and a.to_dict() == b.to_dict()
    except Exception:
        return False


@functools.lru_cache(maxsize=64)
def _crs_name_of_wkt(wkt: str) -> str:
    from rasterio.crs import CRS

    crs = CRS.from_wkt(wkt)
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()[:60]


def _crs_name(crs) -> str:
    return "none" if crs is None else _crs_name_of_wkt(crs.to_wkt())


def check_same_grid(image: Reader, other: Reader, what: str) -> None:
    """Raise :class:`DataError` (naming ``other``'s file) unless ``other`` lies on
    ``image``'s grid; warn for CRSs differing only in datum realisation."""
    if other.shape[1:] != image.shape[1:]:
        raise DataError(other.path, f"{what} grid {other.shape[1]}x{other.shape[2]} (rows x cols) does not match the "
                                    f"image grid {image.shape[1]}x{image.shape[2]} of {image.path}")
    if image.transform is not None and other.transform is not None:
        a, b = image.transform, other.transform
        tol = 1e-6 * max(abs(a.a), abs(a.e), abs(a.b), abs(a.d), 1e-12)
        if any(abs(x - y) > tol for x, y in zip(tuple(a)[:6], tuple(b)[:6])):
            raise DataError(other.path, f"{what} transform {tuple(round(v, 6) for v in tuple(b)[:6])} does not match "
                                        f"the image transform {tuple(round(v, 6) for v in tuple(a)[:6])} of {image.path}")
    if image.crs is not None and other.crs is not None and not _crs_identical(image.crs, other.crs):
        ka, kb = _projection_key(image.crs), _projection_key(other.crs)
        if ka is not None and ka == kb:
            warnings.warn(f"{other.path}: {what} CRS {_crs_name(other.crs)} and image CRS {_crs_name(image.crs)} differ "
                          f"only in datum realisation (same projection and ellipsoid) and the transforms are "
                          f"identical: treated as the same grid", DataWarning, stacklevel=3)
        else:
            raise DataError(other.path, f"{what} CRS {_crs_name(other.crs)} differs from the image CRS "
                                        f"{_crs_name(image.crs)} of {image.path}: a different grid (reproject it first)")


# --- label mapping ------------------------------------------------------------------------------
class ClassMap:
    """Raw label values -> contiguous ids ``0..K-1`` (the order of ``classes``);
    nodata, ``unlabeled`` and invalid pixels -> ``ignore_index``; any other raw
    value is an error (a label the description does not know must not be trained
    on silently)."""

    def __init__(self, values: Sequence[float], ignore_index: int = IGNORE_INDEX, unlabeled: Sequence[float] = (),
                 nodata: float | None = None):
        self.values = np.asarray(values, dtype=np.float64)
        self.ignore_index = int(ignore_index)
        self.unlabeled = np.asarray(list(unlabeled), dtype=np.float64)
        self.nodata = nodata
        self._order = np.argsort(self.values, kind="stable")
        self._sorted = self.values[self._order]

    @property
    def num_classes(self) -> int:
        return len(self.values)

    def __call__(self, raw: np.ndarray, path: str = "label", origin: tuple[int, int] = (0, 0)) -> np.ndarray:
        r = raw.astype(np.float64, copy=False)
        out = np.full(r.shape, self.ignore_index, dtype=np.int64)
        if self._sorted.size:
            pos = np.clip(np.searchsorted(self._sorted, r), 0, self._sorted.size - 1)
            hit = self._sorted[pos] == r
            out[hit] = self._order[pos[hit]]
        else:
            hit = np.zeros(r.shape, bool)
        skip = hit.copy()
        if self.nodata is not None:
            skip |= np.isnan(r) if math.isnan(self.nodata) else (r == self.nodata)
        if self.unlabeled.size:
            skip |= np.isin(r, self.unlabeled)
        if not skip.all():
            bad = np.argwhere(~skip)[0]
            value = r[tuple(bad)]
            n = int((~skip).sum())
            raise DataError(path, f"label value {_fmt_value(value)} at pixel (row {origin[0] + bad[0]}, col "
                                  f"{origin[1] + bad[1]}) ({n} pixel{'s' if n > 1 else ''} in this window) is neither "
                                  f"a class value ({', '.join(_fmt_value(v) for v in self._sorted)}) nor nodata nor "
                                  f"unlabeled; add it to classes or label.unlabeled")
        return out


def _fmt_value(v: float) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


# --- reading -------------------------------------------------------------------------------------
class SceneReader:
    """An opened scene: checks it at once (files, band count, label and region
    grids: metadata only, no pixel data), then reads windows.

    ``expected_bands``: the model's input channel count; a different band count
    is an error naming the image file. ``counter``: an :class:`IOCounter` shared by
    every file of the scene (measurement)."""

    def __init__(self, scene: Scene, *, expected_bands: int | None = None, counter: IOCounter | None = None):
        self.scene = scene
        self.counter = counter
        self.image: Reader = scene.image.open(counter)
        self.label: Reader | None = None
        self._regions: dict[str, Reader] = {}
        try:
            C, H, W = self.image.shape
            if C == 0 or H == 0 or W == 0:
                raise DataError(self.image.path, f"empty scene: the image is {C} bands x {H} x {W} pixels")
            if C % scene.dates:
                raise DataError(self.image.path, f"the image has {C} bands, not a multiple of the scene's "
                                                 f"dates: {scene.dates} (date-major: band t * C + c)")
            if scene.band_names is not None and len(scene.band_names) != C:
                raise DataError(self.image.path, f"the image has {C} bands but the scene names {len(scene.band_names)} "
                                                 f"({', '.join(map(str, scene.band_names))})")
            if expected_bands is not None and C != expected_bands:
                raise DataError(self.image.path, f"the image has {C} bands but the model expects {expected_bands}")
            if scene.stats is not None and len(scene.stats.mean) != C:
                raise DataError(scene.source_file or self.image.path,
                                f"stats give {len(scene.stats.mean)} bands, the image has {C}")
            if scene.label is not None:
                self.label = scene.label.open(counter)
                if self.label.shape[0] != 1:
                    raise DataError(self.label.path, f"a label must have one band, this one has {self.label.shape[0]}")
                check_same_grid(self.image, self.label, "label")
                self.class_map = ClassMap([c.value for c in scene.classes], scene.ignore_index,
                                          scene.label.unlabeled, self.label.nodata[0])
            for name, reg in scene.regions.items():
                if reg.path is not None:
                    r = open_reader(reg.path, format=reg.format, dataset=reg.dataset, layout=reg.layout, counter=counter)
                    self._regions[name] = r
                    if r.shape[0] != 1:
                        raise DataError(r.path, f"region mask '{name}' must have one band, it has {r.shape[0]}")
                    check_same_grid(self.image, r, f"region '{name}'")
                else:
                    for w in reg.windows:
                        if w[1] > H or w[3] > W:
                            raise DataError(scene.source_file, f"regions.{name}: window {w} extends past the "
                                                               f"{H}x{W} scene")
        except BaseException:
            self.close()
            raise
        # Float data compares with the nodata rounded to its dtype (a float32 file's -3.4e38);
        # integer data with the exact value (an out-of-range nodata matches nothing, no wrap-around).
        kind = np.dtype(self.image.dtype).kind
        self._nodata = [v if v is None or math.isnan(v) or kind != "f" else self.image.dtype.type(v)
                        for v in self.image.nodata]

    # -- geometry ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return self.image.shape

    @property
    def crs(self):
        return self.image.crs

    @property
    def transform(self):
        return self.image.transform

    @property
    def num_classes(self) -> int:
        return len(self.scene.classes)

    @property
    def dates(self) -> int:
        """T, the dates of a time series (scene key ``dates``): the image's ``T * C``
        bands are date-major (band ``t * C + c`` is band c of date t)."""
        return self.scene.dates

    # -- reading ----------------------------------------------------------------------------
    def read_image(self, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        """``(float32 C x h x w raw values, bool h x w valid)`` of a global window.
        NaN/inf on a valid pixel is a :class:`DataError` naming the file and pixel."""
        r0, _, c0, _ = window_bounds(rows, cols, *self.shape[1:], what=f"{self.scene.name}: image window")
        raw = self.image.read(rows, cols)
        valid = self._valid(raw)
        if raw.dtype.kind == "f" and self.scene.image.nonfinite == "error":
            finite = np.isfinite(raw)
            bad = ~finite & valid[None]
            if bad.any():
                b, i, j = np.argwhere(bad)[0]
                kind = "NaN" if np.isnan(raw[b, i, j]) else "inf"
                n = int(bad.sum())
                raise DataError(self._band_file(b), f"image has {kind} at band {b}, pixel (row {r0 + i}, col {c0 + j}) "
                                                    f"({n} non-finite value{'s' if n > 1 else ''} in this window) and "
                                                    f"the band's nodata is {self.image.nodata[b]}; fix the file or set "
                                                    f"image.nonfinite: nodata (NaN/inf pixels become nodata, "
                                                    f"besides the nodata value)")
        return raw.astype(np.float32, copy=False), valid

    def _valid(self, raw: np.ndarray) -> np.ndarray:
        """bool ``h x w``: the pixels of a raw ``C x h x w`` block that no band marks as nodata."""
        valid = np.ones(raw.shape[1:], dtype=bool)
        for b, nd in enumerate(self._nodata):
            if nd is None:
                continue
            valid &= ~np.isnan(raw[b]) if (isinstance(nd, float) and math.isnan(nd)) else (raw[b] != nd)
        if raw.dtype.kind == "f" and self.scene.image.nonfinite == "nodata":
            valid &= np.isfinite(raw).all(0)
        return valid

    def read_valid(self, rows: slice, cols: slice) -> np.ndarray:
        """bool ``h x w``: :meth:`read_image`'s validity of a window (nodata), without its
        check of the values (a non-finite value is reported when the pixels are read)."""
        window_bounds(rows, cols, *self.shape[1:], what=f"{self.scene.name}: image window")
        return self._valid(self.image.read(rows, cols))

    def _band_file(self, band: int) -> str:
        paths = getattr(self.image, "paths", None)
        if not paths:
            return self.image.path
        srcs = getattr(self.image, "_src", [])
        k = 0
        for p, s in zip(paths, srcs):
            k += s.count
            if band < k:
                return p
        return self.image.path

    def read_label(self, rows: slice, cols: slice) -> np.ndarray:
        """int64 ``h x w`` class ids of a global window (``ignore_index`` for label
        nodata and unlabeled; image validity is applied by :func:`read_tile`)."""
        if self.label is None:
            raise DataError(self.scene.source_file, f"scene '{self.scene.name}' has no label")
        r0, _, c0, _ = window_bounds(rows, cols, *self.shape[1:], what=f"{self.scene.name}: label window")
        raw = self.label.read(rows, cols)[0]
        return self.class_map(raw, self.label.path, (r0, c0))

    def read_region(self, name: str, rows: slice, cols: slice) -> np.ndarray:
        """bool ``h x w``: which pixels of the window lie in region ``name``."""
        if name not in self.scene.regions:
            raise DataError(self.scene.source_file, f"scene '{self.scene.name}' has no region '{name}' "
                                                    f"(regions: {', '.join(self.scene.regions) or 'none'})")
        r0, r1, c0, c1 = window_bounds(rows, cols, *self.shape[1:], what=f"{self.scene.name}: region window")
        reg = self.scene.regions[name]
        if reg.windows is not None:
            out = np.zeros((r1 - r0, c1 - c0), dtype=bool)
            for a, b, c, d in reg.windows:
                out[max(a, r0) - r0:max(min(b, r1) - r0, 0), max(c, c0) - c0:max(min(d, c1) - c0, 0)] = True
            return out
        raw = self._regions[name].read(rows, cols)[0]
        if reg.values is not None:
            return np.isin(raw, np.asarray(reg.values, dtype=raw.dtype))
        return (raw != 0) & ~np.isnan(raw.astype(np.float64))

    def close(self) -> None:
        for r in [self.image, self.label, *self._regions.values()]:
            if r is not None:
                r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_scene(scene: Scene | str | os.PathLike, *, expected_bands: int | None = None,
               counter: IOCounter | None = None) -> SceneReader:
    """Open (and check) a :class:`Scene` or a scene YAML file."""
    if not isinstance(scene, Scene):
        scene = Scene.from_yaml(scene)
    return SceneReader(scene, expected_bands=expected_bands, counter=counter)
