"""Tile layouts: how a scene is split across the ranks of a ``ph x pw`` grid.

A *partition* of an extent ``n`` over ``parts`` ranks is the tuple of
``parts + 1`` global boundaries ``(0, b1, ..., n)``; rank ``i`` owns
``[b_i, b_{i+1})``. Interior boundaries of a scene partition lie on multiples of
the alignment ``A``; only the last tile takes the remainder (docs/design.md section 1).
The arithmetic of partitions and windows is in :mod:`rest_ds.spim.geometry`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import SPIMError
# the partition arithmetic lives in geometry.py; these names stay importable from here
from .geometry import (Partition, check_aligned, lcm, partition_from_sizes, split_extent,  # noqa: F401
                       tile_sizes)


@dataclass(frozen=True)
class TileLayout:
    """Row and column partitions of a 2-D extent over a ``ph x pw`` grid."""

    rows: Partition
    cols: Partition

    @property
    def grid(self) -> tuple[int, int]:
        return len(self.rows) - 1, len(self.cols) - 1

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows[-1], self.cols[-1]

    def tile(self, row: int, col: int) -> tuple[slice, slice]:
        """Global row and column slices of the tile at grid position (row, col)."""
        return slice(self.rows[row], self.rows[row + 1]), slice(self.cols[col], self.cols[col + 1])

    @classmethod
    def even(cls, height: int, width: int, grid: tuple[int, int], align: int = 1) -> "TileLayout":
        return cls(split_extent(height, grid[0], align), split_extent(width, grid[1], align))


def factorisations(sp: int) -> list[tuple[int, int]]:
    return [(ph, sp // ph) for ph in range(1, sp + 1) if sp % ph == 0]


def grid_cost(height: int, width: int, grid: tuple[int, int], align: int = 1,
              halo: int = 1) -> tuple[int, int, int] | None:
    """How :func:`choose_grid` ranks ``grid`` on a ``height x width`` scene (smaller
    is better), or None where its tiles cannot be aligned or are thinner than ``halo``:
    ``(largest tile area, interior border length, -rows)``.

    The largest tile comes first: every rank waits for it at each collective, so it
    bounds the step, while halo traffic per layer (proportional to the interior border
    length, ``(ph - 1) * width + (pw - 1) * height``; corners are O(halo^2) and ignored)
    is small against a tile's compute. Ties go to more rows (row-major tiles are
    contiguous in memory order of a C x H x W raster, which readers prefer)."""
    ph, pw = grid
    try:
        layout = TileLayout.even(height, width, (ph, pw), align)
    except SPIMError:
        return None
    rows, cols = tile_sizes(layout.rows), tile_sizes(layout.cols)
    if min(rows) < halo or min(cols) < halo:
        return None
    return max(rows) * max(cols), (ph - 1) * width + (pw - 1) * height, -ph


def choose_grid(height: int, width: int, sp: int, align: int = 1, halo: int = 1) -> tuple[int, int]:
    """The ``ph x pw`` grid for ``sp`` ranks with the smallest largest tile, then the
    fewest halo pixels (:func:`grid_cost`). Alignment can leave tiles uneven (a 672 px
    side in 224 px units splits 224 / 448): then a grid that splits evenly wins even
    with a longer interior border."""
    best = None
    for g in factorisations(sp):
        key = grid_cost(height, width, g, align, halo)
        if key is not None and (best is None or key < best[0]):
            best = (key, g)
    if best is None:
        raise SPIMError(
            f"no grid of {sp} ranks fits a {height}x{width} scene with alignment {align}: "
            f"every factorisation gives tiles smaller than one alignment unit"
        )
    return best[1]
