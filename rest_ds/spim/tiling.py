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


def choose_grid(height: int, width: int, sp: int, align: int = 1, halo: int = 1) -> tuple[int, int]:
    """The ``ph x pw`` grid for ``sp`` ranks that moves the fewest halo pixels.

    Halo traffic per layer is proportional to the total interior border length,
    ``(ph - 1) * width + (pw - 1) * height`` (corners are O(halo^2) and ignored).
    Grids whose tiles cannot be aligned or are thinner than ``halo`` are skipped;
    ties go to the grid with more rows (row-major tiles are contiguous in memory
    order of a C x H x W raster, which readers prefer)."""
    best = None
    for ph, pw in factorisations(sp):
        try:
            layout = TileLayout.even(height, width, (ph, pw), align)
        except SPIMError:
            continue
        if min(tile_sizes(layout.rows)) < halo or min(tile_sizes(layout.cols)) < halo:
            continue
        cost = (ph - 1) * width + (pw - 1) * height
        key = (cost, -ph)
        if best is None or key < best[0]:
            best = (key, (ph, pw))
    if best is None:
        raise SPIMError(
            f"no grid of {sp} ranks fits a {height}x{width} scene with alignment {align}: "
            f"every factorisation gives tiles smaller than one alignment unit"
        )
    return best[1]
