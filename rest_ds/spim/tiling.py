"""Tile geometry: how a global extent is split across the ranks of a grid.

A *partition* of an extent ``n`` over ``parts`` ranks is the tuple of
``parts + 1`` global boundaries ``(0, b1, ..., n)``; rank ``i`` owns
``[b_i, b_{i+1})``. Interior boundaries of a scene partition lie on multiples of
the alignment ``A``; only the last tile takes the remainder (docs/design.md section 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import SPIMError

Partition = tuple[int, ...]


def split_extent(n: int, parts: int, align: int = 1) -> Partition:
    """Split ``n`` into ``parts`` tiles with interior boundaries on multiples of
    ``align``; tiles are as even as the alignment allows, the last one takes the
    remainder. Raises :class:`SPIMError` when a tile would be empty."""
    if parts < 1 or align < 1:
        raise SPIMError(f"split_extent: parts ({parts}) and align ({align}) must be >= 1")
    units = n // align  # whole alignment units; the remainder joins the last tile
    if units < parts:
        raise SPIMError(
            f"cannot split an extent of {n} px into {parts} tiles aligned to {align} px: "
            f"only {units} whole units of {align} px; use fewer ranks along this axis "
            f"or a smaller alignment"
        )
    base, extra = divmod(units, parts)
    bounds = [0]
    for i in range(parts - 1):
        bounds.append(bounds[-1] + (base + (1 if i < extra else 0)) * align)
    bounds.append(n)
    return tuple(bounds)


def partition_from_sizes(sizes: list[int] | tuple[int, ...]) -> Partition:
    out = [0]
    for s in sizes:
        out.append(out[-1] + int(s))
    return tuple(out)


def tile_sizes(part: Partition) -> tuple[int, ...]:
    return tuple(b - a for a, b in zip(part[:-1], part[1:]))


def check_aligned(part: Partition, align: int, what: str = "tile") -> None:
    """Interior boundaries must be multiples of ``align``."""
    bad = [b for b in part[1:-1] if b % align]
    if bad:
        raise SPIMError(
            f"{what} boundaries {list(part)} are not aligned: {bad} are not multiples "
            f"of the alignment {align} (the lcm of the network's stride products); "
            f"use rest_ds.spim.split_extent(n, parts, align={align})"
        )


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


def lcm(*values: int) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out
