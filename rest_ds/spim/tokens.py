"""Moving token-layout data between the whole scene's order and the tiles' order.

A token dim holds ``prefix`` replicated tokens, then ``(lead, H, W, trail)``
row-major (tensor.Spec). A tile holds ``(lead, h, w, trail)`` of its own rows and
columns. These helpers convert between the two orders along one dim.
"""
from __future__ import annotations

import torch

from .tensor import Spec


def _tile_hw(spec: Spec, sp_index: int) -> tuple[int, int]:
    r, c = divmod(sp_index, spec.mesh.grid[1])
    return spec.rows[r + 1] - spec.rows[r], spec.cols[c + 1] - spec.cols[c]


def tile_of_full(p: torch.Tensor, dim: int, spec: Spec) -> torch.Tensor:
    """This rank's tokens (prefix, then its tile) of a whole-scene tensor ``p``
    whose ``dim`` has the global token size. Differentiable (a slice)."""
    H, W = spec.global_hw
    (r0, r1), (c0, c1) = spec.row_range, spec.col_range
    k = spec.prefix
    grid = p.narrow(dim, k, p.shape[dim] - k).unflatten(dim, (spec.lead, H, W, spec.trail))
    tile = grid.narrow(dim + 1, r0, r1 - r0).narrow(dim + 2, c0, c1 - c0).flatten(dim, dim + 3)
    return torch.cat([p.narrow(dim, 0, k), tile], dim=dim) if k else tile


def full_from_tiles(head: torch.Tensor, tiles: list[torch.Tensor], dim: int, spec: Spec) -> torch.Tensor:
    """Whole-scene order from the prefix tokens ``head`` and every sp rank's tile
    tokens (prefix excluded), in sp order. Differentiable (cat/reshape)."""
    ph, pw = spec.mesh.grid
    grids = []
    for i, t in enumerate(tiles):
        h, w = _tile_hw(spec, i)
        grids.append(t.unflatten(dim, (spec.lead, h, w, spec.trail)))
    rows = [torch.cat(grids[r * pw:(r + 1) * pw], dim=dim + 2) for r in range(ph)]
    full = torch.cat(rows, dim=dim + 1).flatten(dim, dim + 3)
    return torch.cat([head, full], dim=dim) if spec.prefix else full
