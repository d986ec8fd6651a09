"""Per-band normalisation statistics and the one streaming pass that validates a scene.

:func:`scan_scene` streams over the scene in blocks of rows (never holding more
than one block), and in the same pass:

- accumulates per-band mean and standard deviation over *valid* pixels (a pixel
  is valid when no band is nodata; the same pixels the model is trained on),
  merged block by block with Chan et al.'s pairwise update in float64;
- raises on NaN/inf in valid pixels and on label values the scene does not know
  (:class:`DataError` naming the file and pixel);
- counts label classes (``class_counts``: pixels with valid imagery and a class;
  ``label_counts``: the label file alone).

:func:`prepare_scene` is what a job calls before training: it opens the scene
(metadata checks), then loads the scan result from a JSON cache **next to the
data** (``<image folder>/<scene name>.rest_ds-stats.json``; if that folder is not
writable, ``<cache>/stats/``) when the files and the relevant parts of the
description are unchanged, or runs the scan and writes the cache. Statistics
given in the description (``stats:``) take precedence for normalisation. Run it
once (e.g. ``rest-ds data info scene.yaml`` or on global rank 0 before a barrier);
the other ranks then find the cache and read only their tiles.

For a scene too large for one pass on one machine, every rank can compute
:class:`BandMoments` of its own tile and the moments are merged (all-gather, then
:meth:`BandMoments.merge`); the merge is exact up to float64 rounding.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import DataError, DataWarning
from .readers import IOCounter, file_signature
from .scene import Scene, SceneReader

CACHE_FORMAT = "rest_ds-scene-stats/1"
BLOCK_BYTES = 64 << 20


@dataclass
class BandMoments:
    """Count, mean and sum of squared deviations (M2) per band over valid pixels."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, bands: int) -> "BandMoments":
        return cls(0, np.zeros(bands), np.zeros(bands))

    @classmethod
    def of(cls, image: np.ndarray, valid: np.ndarray) -> "BandMoments":
        """Moments of a ``C x h x w`` block over the pixels where ``valid`` (``h x w``)."""
        x = image[:, valid].astype(np.float64)
        n = x.shape[1]
        if n == 0:
            return cls.empty(image.shape[0])
        mean = x.mean(axis=1)
        return cls(n, mean, ((x - mean[:, None]) ** 2).sum(axis=1))

    def merge(self, other: "BandMoments") -> "BandMoments":
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / n)
        return BandMoments(n, mean, m2)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.count) if self.count else np.full_like(self.mean, np.nan)


@dataclass(frozen=True)
class BandStats:
    """Per-band ``mean`` and ``std`` used to normalise: ``(x - mean) / std``.
    ``source``: ``computed``, ``cache`` or ``config``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = "computed"

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """float32 ``(image - mean) / std`` of a ``C x h x w`` block."""
        if image.shape[0] != len(self.mean):
            raise DataError(None, f"stats are for {len(self.mean)} bands, the image block has {image.shape[0]}")
        m = np.asarray(self.mean, np.float32)[:, None, None]
        s = np.asarray(self.std, np.float32)[:, None, None]
        return ((image.astype(np.float32, copy=False) - m) / s).astype(np.float32, copy=False)


@dataclass
class SceneSummary:
    """Result of :func:`scan_scene` (also what the JSON cache holds)."""

    name: str
    bands: int
    height: int
    width: int
    valid_pixels: int
    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]
    class_values: list[float] = field(default_factory=list)
    class_counts: list[int] = field(default_factory=list)   # valid image and a class
    label_counts: list[int] = field(default_factory=list)   # the label file alone
    key: str = ""
    source: str = "computed"

    def band_stats(self) -> BandStats:
        std = []
        for b, s in enumerate(self.std):
            if not s > 0:
                warnings.warn(f"scene '{self.name}': band {b} is constant over the valid pixels (std 0); "
                              f"normalised with std 1", DataWarning, stacklevel=2)
                s = 1.0
            std.append(float(s))
        return BandStats(tuple(float(m) for m in self.mean), tuple(std), self.source)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return {"format": CACHE_FORMAT, **d}


def scan_scene(reader: SceneReader, *, block_rows: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> SceneSummary:
    """One streaming pass over the scene (see the module docstring). ``block_rows``:
    rows per read (default: about 64 MiB of image per block)."""
    C, H, W = reader.shape
    if block_rows is None:
        block_rows = max(1, BLOCK_BYTES // max(1, C * W * 4))
    moments = BandMoments.empty(C)
    lo = np.full(C, np.inf)
    hi = np.full(C, -np.inf)
    K = reader.num_classes if reader.label is not None else 0
    class_counts = np.zeros(K, dtype=np.int64)
    label_counts = np.zeros(K, dtype=np.int64)
    cols = slice(0, W)
    for r0 in range(0, H, block_rows):
        rows = slice(r0, min(H, r0 + block_rows))
        image, valid = reader.read_image(rows, cols)
        moments = moments.merge(BandMoments.of(image, valid))
        if valid.any():
            x = image[:, valid]
            lo = np.minimum(lo, x.min(axis=1))
            hi = np.maximum(hi, x.max(axis=1))
        if reader.label is not None:
            ids = reader.read_label(rows, cols)
            labelled = ids != reader.scene.ignore_index
            label_counts += np.bincount(ids[labelled], minlength=K)[:K]
            both = labelled & valid
            class_counts += np.bincount(ids[both], minlength=K)[:K]
        if progress is not None:
            progress(rows.stop, H)
    if moments.count == 0:
        raise DataError(reader.image.path, f"empty scene: none of the {H}x{W} pixels is valid (every pixel is nodata "
                                           f"in some band; nodata per band: {list(reader.image.nodata)})")
    return SceneSummary(
        name=reader.scene.name, bands=C, height=H, width=W, valid_pixels=int(moments.count),
        mean=[float(v) for v in moments.mean], std=[float(v) for v in moments.std],
        min=[float(v) for v in lo], max=[float(v) for v in hi],
        class_values=[float(c.value) for c in reader.scene.classes] if K else [],
        class_counts=[int(v) for v in class_counts], label_counts=[int(v) for v in label_counts],
    )


# --- cache -------------------------------------------------------------------------------------
def scene_key(scene: Scene) -> str:
    """sha256 over the files (path, size, mtime) and the description fields that change
    the scan (image/label sources, classes, ignore_index)."""
    payload = {
        "files": file_signature([p for p in scene.image.files() + (scene.label.files() if scene.label else [])
                                 if os.path.exists(p)]),
        "image": dataclasses.asdict(scene.image),
        "label": dataclasses.asdict(scene.label) if scene.label else None,
        "classes": [c.value for c in scene.classes],
        "ignore_index": scene.ignore_index,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "scene"


def stats_cache_paths(scene: Scene, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where the scan result is cached: next to the data first, then the user cache."""
    from .samples import default_cache_dir

    first = scene.image.files()[0]
    near = Path(first).resolve().parent / f"{_safe(scene.name)}.rest_ds-stats.json"
    far = Path(cache_dir or default_cache_dir()) / "stats" / f"{_safe(scene.name)}-{scene_key(scene)[:16]}.json"
    return [near, far]


def load_cached_summary(scene: Scene, cache_dir=None) -> SceneSummary | None:
    key = scene_key(scene)
    for p in stats_cache_paths(scene, cache_dir):
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if d.get("format") != CACHE_FORMAT or d.get("key") != key:
            continue
        d.pop("format")
        try:
            s = SceneSummary(**d)
        except TypeError:
            continue
        s.source = "cache"
        return s
    return None


def write_cached_summary(scene: Scene, summary: SceneSummary, cache_dir=None) -> Path | None:
    """Write next to the data, else to the user cache; returns the path (None if neither is writable)."""
    data = json.dumps(summary.to_json(), indent=1) + "\n"
    for p in stats_cache_paths(scene, cache_dir):
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
            tmp.write_text(data)
            os.replace(tmp, p)
            return p
        except OSError:
            continue
    warnings.warn(f"scene '{scene.name}': could not write the stats cache anywhere ({stats_cache_paths(scene, cache_dir)})",
                  DataWarning, stacklevel=2)
    return None


def prepare_scene(scene: Scene | str | os.PathLike, *, expected_bands: int | None = None, recompute: bool = False,
                  scan: bool = True, cache_dir=None, counter: IOCounter | None = None,
                  block_rows: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> tuple[SceneReader, SceneSummary | None, BandStats | None]:
    """Open, check and (once, cached) scan a scene; returns ``(reader, summary, stats)``.

    ``stats`` are the description's if given, else the scan's. ``scan=False`` skips
    the validation pass (then NaN/inf and unknown labels surface only when a tile
    holding them is read) and needs ``stats`` in the description or a cache."""
    if not isinstance(scene, Scene):
        scene = Scene.from_yaml(scene)
    reader = SceneReader(scene, expected_bands=expected_bands, counter=counter)
    try:
        summary = None if recompute else load_cached_summary(scene, cache_dir)
        if summary is None and scan:
            summary = scan_scene(reader, block_rows=block_rows, progress=progress)
            summary.key = scene_key(scene)
            write_cached_summary(scene, summary, cache_dir)
        if scene.stats is not None:
            stats = BandStats(tuple(scene.stats.mean), tuple(scene.stats.std), "config")
        elif summary is not None:
            if summary.bands != reader.shape[0]:
                raise DataError(reader.image.path, f"cached stats are for {summary.bands} bands, the image has {reader.shape[0]}")
            stats = summary.band_stats()
        else:
            stats = None
    except BaseException:
        reader.close()
        raise
    return reader, summary, stats
