"""Moving between whole tensors, local tiles and SpatialTensors."""
from __future__ import annotations

import torch

from .comm import all_gather_equal, all_reduce_
from .errors import SPIMError
from .mesh import SpatialMesh
from .tensor import SpatialTensor, Spec
from .tiling import Partition, TileLayout, check_aligned, partition_from_sizes
from .tokens import full_from_tiles, tile_of_full


def _norm_dims(dims, ndim):
    return tuple(d % ndim for d in dims)


def shard(x: torch.Tensor, mesh: SpatialMesh, layout: TileLayout | None = None,
          dims: tuple[int, int] = (-2, -1), align: int = 1) -> SpatialTensor:
    """This rank's tile of a whole tensor ``x`` that every sp rank holds (a
    contiguous copy).

    ``layout`` defaults to the even aligned split of ``x``'s ``dims`` over the
    mesh grid. Differentiable: the gradient reaching ``x`` is this tile's part
    (partial, see comm.py)."""
    dims = _norm_dims(dims, x.dim())
    if layout is None:
        layout = TileLayout.even(x.shape[dims[0]], x.shape[dims[1]], mesh.grid, align)
    if layout.shape != (x.shape[dims[0]], x.shape[dims[1]]):
        raise SPIMError(f"layout {layout.shape} does not match the tensor's spatial shape "
                        f"{(x.shape[dims[0]], x.shape[dims[1]])}")
    if layout.grid != mesh.grid:
        raise SPIMError(f"layout grid {layout.grid} does not match the mesh grid {mesh.grid}")
    rs, cs = layout.tile(*mesh.coord)
    # a contiguous copy, as a tile read by its own rank would be: the ops of a
    # whole network on a strided view of the scene run slower (oneDNN convs copy
    # or take slower paths)
    loc = x.narrow(dims[0], rs.start, rs.stop - rs.start).narrow(dims[1], cs.start, cs.stop - cs.start).contiguous()
    return SpatialTensor(loc, Spec(mesh, dims, layout.rows, layout.cols))


# torch tensors have at most 64 dims: a shape always fits one fixed-size record
_MAX_DIMS = 64


def _tile_shapes(t: torch.Tensor, mesh: SpatialMesh) -> list[tuple[int, ...]]:
    """Every sp rank's ``tuple(t.shape)``, in sp order: one all-gather of a fixed-size
    int64 record ([ndim, sizes..., 0 padding]) that every rank sends whatever its
    tile, through the shared-memory channel where there is one (``from_local``
    without a layout runs at every forward of a model called on plain tiles: a
    pickled ``all_gather_object`` over gloo cost ~1 ms of CPU and 4-6 ms of wall
    per call on a loaded 2-core host)."""
    if mesh.sp == 1:
        return [tuple(t.shape)]
    rec = torch.zeros(1 + _MAX_DIMS, dtype=torch.int64)
    rec[0] = t.dim()
    if t.dim():
        rec[1:1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    got = all_gather_equal(rec.to(t.device), mesh).cpu().tolist()
    return [tuple(r[1:1 + r[0]]) for r in got]


def from_local(t: torch.Tensor, mesh: SpatialMesh, dims: tuple[int, int] = (-2, -1), align: int = 1,
               layout: TileLayout | None = None) -> SpatialTensor:
    """Wrap this rank's tile ``t`` (any dtype: images ``(B, C, h, w)`` with the
    default ``dims``, integer label tiles ``(B, h, w)`` with ``dims=(1, 2)``).

    Without ``layout``, tile sizes are exchanged over the sp group: all ranks
    must call it, and it raises the same :class:`SPIMError` on every rank when
    the tiles do not form a grid (ranks of one grid row must share a height,
    ranks of one grid column a width, and every other dim must be equal).
    With the global ``layout`` (a :class:`TileLayout` of the mesh's grid) nothing
    is exchanged; a tile whose size is not this rank's tile of ``layout`` raises."""
    dims = _norm_dims(dims, t.dim())
    if layout is not None:
        if len(dims) != 2 or dims[0] == dims[1]:
            raise SPIMError(f"from_local: dims {dims} must name two different dims of the {t.dim()}-d tile")
        if layout.grid != mesh.grid:
            raise SPIMError(f"from_local: layout grid {layout.grid} does not match the mesh grid {mesh.grid}")
        rs, cs = layout.tile(*mesh.coord)
        if (t.shape[dims[0]], t.shape[dims[1]]) != (rs.stop - rs.start, cs.stop - cs.start):
            raise SPIMError(f"from_local: sp rank {mesh.sp_index} (grid {mesh.coord[0]},{mesh.coord[1]}) has a "
                            f"{t.shape[dims[0]]}x{t.shape[dims[1]]} tile on dims {dims}, but the layout gives it "
                            f"{rs.stop - rs.start}x{cs.stop - cs.start}")
        return SpatialTensor(t, Spec(mesh, dims, layout.rows, layout.cols))
    shapes = _tile_shapes(t, mesh)
    ph, pw = mesh.grid
    problems = []
    for i, s in enumerate(shapes):
        if len(s) != len(shapes[0]):
            problems.append(f"sp rank {i} has a {len(s)}-d tile, sp rank 0 a {len(shapes[0])}-d tile")
            continue
        for d in range(len(s)):
            if d not in dims and s[d] != shapes[0][d]:
                problems.append(f"sp rank {i} has size {s[d]} on dim {d}, sp rank 0 has {shapes[0][d]}")
    if not problems:
        heights = [shapes[r * pw][dims[0]] for r in range(ph)]
        widths = [shapes[c][dims[1]] for c in range(pw)]
        for i, s in enumerate(shapes):
            r, c = divmod(i, pw)
            if s[dims[0]] != heights[r] or s[dims[1]] != widths[c]:
                problems.append(f"sp rank {i} (grid {r},{c}) has a {s[dims[0]]}x{s[dims[1]]} tile, but its row "
                                f"has height {heights[r]} and its column width {widths[c]}")
        if min(heights + widths) < 1:
            problems.append("a tile is empty")
    if problems:
        raise SPIMError("local tiles do not form a grid: " + "; ".join(problems[:4]))
    rows, cols = partition_from_sizes(heights), partition_from_sizes(widths)
    if align > 1:
        check_aligned(rows, align, "row tile")
        check_aligned(cols, align, "column tile")
    return SpatialTensor(t, Spec(mesh, dims, rows, cols))


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loc, spec: Spec):
        from .comm import all_gather_padded

        ctx.spec = spec
        mesh = spec.mesh
        tiles = all_gather_padded(loc, mesh)
        ph, pw = mesh.grid
        if spec.is_tokens:
            t, k = spec.dims[0], spec.prefix
            return full_from_tiles(loc.narrow(t, 0, k), [x.narrow(t, k, x.shape[t] - k) for x in tiles], t, spec)
        rows = [torch.cat(tiles[r * pw:(r + 1) * pw], dim=spec.dims[1]) for r in range(ph)]
        return torch.cat(rows, dim=spec.dims[0])

    @staticmethod
    def backward(ctx, g):
        spec = ctx.spec
        partial = g
        g = all_reduce_(g.contiguous().clone(), spec.mesh)
        (r0, r1), (c0, c1) = spec.row_range, spec.col_range
        if spec.is_tokens:
            t, k = spec.dims[0], spec.prefix
            tile = tile_of_full(g, t, spec).narrow(t, k, spec.local_sizes()[0] - k)
            # prefix tokens are replicated: they keep their partial gradient (comm.py)
            return torch.cat([partial.narrow(t, 0, k), tile], dim=t), None
        return g.narrow(spec.dims[0], r0, r1 - r0).narrow(spec.dims[1], c0, c1 - c0), None


def gather(x: SpatialTensor) -> torch.Tensor:
    """The whole tensor on every sp rank (differentiable). Needs memory for the
    whole tensor: for checks and small outputs, not for whole-scene features."""
    if not isinstance(x, SpatialTensor):
        return x
    if x.mesh.sp == 1:
        return x._local
    return _Gather.apply(x._local.contiguous(), x._spec)


def to_local(x):
    """The local tile of a SpatialTensor (plain tensors are returned as they are)."""
    return x._local if isinstance(x, SpatialTensor) else x


__all__ = ["shard", "from_local", "gather", "to_local", "Partition"]
