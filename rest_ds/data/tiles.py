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


def read_tile(reader: SceneReader, rows: slice, cols: slice, *, stats: BandStats | None = None,
              plan: AugmentPlan | None = None, region: str | None = None, fill: float = 0.0,
              with_label: bool = True) -> SceneTile:
    """Read the global window ``rows x cols`` of the augmented scene: only its source
    window is read from disk. ``region``: labels outside it become ``ignore_index``."""
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

    raw, valid = reader.read_image(src_rows, src_cols)
    image = stats.normalize(raw) if stats is not None else raw
    image = plan.geometric(image)
    valid = plan.geometric(valid)
    if plan.photometric:
        image = plan.photometric_apply(image, valid, rows, cols)
    image[:, ~valid] = np.float32(fill)

    label = None
    if with_label and reader.label is not None:
        ids = reader.read_label(src_rows, src_cols)
        if region is not None:
            ids[~reader.read_region(region, src_rows, src_cols)] = reader.scene.ignore_index
        label = plan.geometric(ids)
        label[~valid] = reader.scene.ignore_index
    elif region is not None and reader.label is None:
        raise DataError(reader.scene.source_file, f"region '{region}' given but scene '{reader.scene.name}' has no label")
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
