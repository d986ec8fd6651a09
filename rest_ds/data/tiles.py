"""A rank's tile of a (possibly augmented) scene, read from disk window by window.

::

    reader, summary, stats = prepare_scene("scene.yaml", expected_bands=6)
    plan = plan_augmentation(AugmentConfig(crop=(0.7, 1.0)), reader.shape,
                             seed=0, epoch=epoch, scene=reader.scene.name, dp_rank=dp_rank)
    layout = scene_layout(plan, grid=(ph, pw), align=32)      # on the augmented scene
    tile = read_rank_tile(reader, layout, row, col, stats=stats, plan=plan, region="train")
    x, y = tile.to_torch()          # 1 x C x h x w float32, 1 x h x w int64 (this rank's tile)

The tile's arrays are exactly the slice ``layout.tile(row, col)`` of what
:func:`read_tile` returns for the whole augmented scene.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .augment import AugmentPlan
from .errors import DataError
from .readers import window_bounds
from .scene import SceneReader
from .stats import BandStats


@dataclass
class SceneTile:
    """One window of the augmented scene.

    ``image``: float32 ``C x h x w``, normalised with the stats (raw values without
    them), augmented, invalid pixels set to ``fill``. ``label``: int64 ``h x w``
    class ids with ``ignore_index`` on invalid, unlabeled and out-of-region
    pixels (None for an unlabeled scene). ``valid``: bool ``h x w``, the image's
    validity. ``rows``/``cols``: global window in the augmented scene;
    ``source_rows``/``source_cols``: the window read from the files."""

    image: np.ndarray
    label: np.ndarray | None
    valid: np.ndarray
    rows: slice
    cols: slice
    source_rows: slice
    source_cols: slice

    def to_torch(self):
        """``(image 1 x C x h x w float32, label 1 x h x w int64 or None)`` torch tensors."""
        import torch

        x = torch.from_numpy(self.image).unsqueeze(0)
        y = None if self.label is None else torch.from_numpy(self.label).unsqueeze(0)
        return x, y


def scene_layout(plan_or_shape, grid: tuple[int, int], align: int = 1):
    """The :class:`~rest_ds.spim.tiling.TileLayout` of the augmented scene (an
    :class:`AugmentPlan`) or of a shape ``(H, W)`` / ``(C, H, W)`` over a grid."""
    from rest_ds.spim.tiling import TileLayout

    shape = plan_or_shape.out_shape if isinstance(plan_or_shape, AugmentPlan) else tuple(plan_or_shape)[-2:]
    return TileLayout.even(shape[0], shape[1], grid, align)


class WindowCache:
    """Source windows already read by :func:`read_tile`: the image normalised, its
    validity and the labels with the region applied, before augmentation, for up to
    ``max_mb`` MiB (least recently used out first; a window larger than that is not
    kept). Whole-scene training reads every rank's same tile at every step (only its
    flips and rotations change, and they map to a few source windows), so a kept
    window saves the disk read, the band normalisation and the label mapping. Kept
    arrays are never handed out: :func:`read_tile` copies them. Host memory, per
    process; safe to share between threads."""

    def __init__(self, max_mb: float):
        self.max_bytes = int(max_mb * 2 ** 20)
        self._entries: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def _key(reader, stats, src_rows: slice, src_cols: slice, region, with_label: bool) -> tuple:
        # the objects themselves are held in the entry, so their ids are not reused while it lives
        return (id(reader), id(stats), src_rows.start, src_rows.stop, src_cols.start, src_cols.stop, region,
                with_label)

    def get(self, key: tuple):
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return hit[0]

    def put(self, key: tuple, arrays: tuple, pin: tuple) -> None:
        n = sum(a.nbytes for a in arrays if a is not None)
        if n > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            while self._bytes + n > self.max_bytes:
                _, (old, _) = self._entries.popitem(last=False)
                self._bytes -= sum(a.nbytes for a in old if a is not None)
            for a in arrays:
                if a is not None:
                    a.flags.writeable = False  # a bug that writes into a kept window fails loudly
            self._entries[key] = (arrays, pin)
            self._bytes += n

    @property
    def nbytes(self) -> int:
        return self._bytes


def _unshared(a: np.ndarray, kept: np.ndarray, cached: bool) -> np.ndarray:
    """``a`` (a transform of ``kept``) as an array of its own where ``kept`` is in a cache."""
    return a.copy() if cached and (a is kept or np.shares_memory(a, kept)) else a


def read_tile(reader: SceneReader, rows: slice, cols: slice, *, stats: BandStats | None = None,
              plan: AugmentPlan | None = None, region: str | None = None, fill: float = 0.0,
              with_label: bool = True, cache: WindowCache | None = None) -> SceneTile:
    """Read the global window ``rows x cols`` of the augmented scene: only its source
    window is read from disk. ``region``: labels outside it become ``ignore_index``.
    ``cache``: source windows read before are taken from it (the same values)."""
    C, H, W = reader.shape
    if plan is None:
        plan = AugmentPlan.identity(H, W)
    elif plan.src_shape != (H, W):
        raise DataError(reader.image.path, f"augmentation plan is for a {plan.src_shape[0]}x{plan.src_shape[1]} "
                                           f"scene, the image is {H}x{W}")
    Ho, Wo = plan.out_shape
    i0, i1, j0, j1 = window_bounds(rows, cols, Ho, Wo, what=f"{reader.scene.name}: tile")
    rows, cols = slice(i0, i1), slice(j0, j1)
    src_rows, src_cols = plan.source_window(rows, cols)

    if region is not None and reader.label is None:
        raise DataError(reader.scene.source_file, f"region '{region}' given but scene '{reader.scene.name}' has no label")
    labelled = with_label and reader.label is not None
    key = WindowCache._key(reader, stats, src_rows, src_cols, region, labelled) if cache is not None else None
    kept = cache.get(key) if cache is not None else None
    if kept is None:
        raw, src_valid = reader.read_image(src_rows, src_cols)
        src_image = stats.normalize(raw) if stats is not None else raw
        ids = None
        if labelled:
            ids = reader.read_label(src_rows, src_cols)
            if region is not None:
                ids[~reader.read_region(region, src_rows, src_cols)] = reader.scene.ignore_index
        if cache is not None:
            cache.put(key, (src_image, src_valid, ids), pin=(reader, stats))
    else:
        src_image, src_valid, ids = kept

    image = _unshared(plan.geometric(src_image), src_image, cache is not None)
    valid = _unshared(plan.geometric(src_valid), src_valid, cache is not None)
    if plan.photometric:
        image = plan.photometric_apply(image, valid, rows, cols)
    invalid = ~valid
    np.copyto(image, np.float32(fill), where=invalid)  # broadcast over bands: faster than image[:, invalid]

    label = None
    if labelled:
        label = _unshared(plan.geometric(ids), ids, cache is not None)
        np.copyto(label, label.dtype.type(reader.scene.ignore_index), where=invalid)
    return SceneTile(image, label, valid, rows, cols, src_rows, src_cols)


def read_rank_tile(reader: SceneReader, layout, row: int, col: int, **kwargs) -> SceneTile:
    """The tile of grid position ``(row, col)`` of ``layout`` (see :func:`read_tile`)."""
    if tuple(layout.shape) != (read_shape := _out_shape(reader, kwargs.get("plan"))):
        raise DataError(reader.image.path, f"tile layout is for a {layout.shape[0]}x{layout.shape[1]} scene, the "
                                           f"{'augmented ' if kwargs.get('plan') is not None else ''}scene is "
                                           f"{read_shape[0]}x{read_shape[1]}")
    rows, cols = layout.tile(row, col)
    return read_tile(reader, rows, cols, **kwargs)


def _out_shape(reader: SceneReader, plan: AugmentPlan | None) -> tuple[int, int]:
    return plan.out_shape if plan is not None else tuple(reader.shape[1:])
