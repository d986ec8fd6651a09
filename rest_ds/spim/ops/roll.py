"""``torch.roll`` / ``Tensor.roll``: a cyclic shift over the *whole scene*.

Swin's shifted windows roll the feature map by half a window before the window
partition and back after it. On one device the strip that leaves the
bottom/right of the scene re-enters at the top/left; under SPIM every tile's
output is a cyclic window of the global axis, so a tile receives the strips
its output needs from whichever tiles hold them: its neighbour for a shift
smaller than a tile, and across the grid for the wrap-around (the first and
last tiles of a row or column of the grid exchange with each other). A shift
of any size is exact: the geometry (:func:`rest_ds.spim.geometry.roll_pieces`) cuts each tile's
source range at the tile borders, however far away they are.

A roll over both grid dims runs as two one-axis rolls (rows, then columns):
each moves only strips within one column / row of the grid, and a strip
between two different tiles is always one contiguous piece (two arcs of a
circle whose lengths sum to at most its circumference meet in at most one
arc), so every pair of ranks exchanges at most one message per axis. The
backward of a roll by ``s`` is the roll of the gradient by ``-s``.

Dims that are not sharded roll locally. A roll without ``dims`` (over the
flattened tensor) and a roll of a sharded token dim are refused.
"""
from __future__ import annotations

import torch

from .. import context
from ..comm import _phase
from ..geometry import roll_pieces
from ..halo import start_exchange
from ..mesh import SpatialMesh
from ..tensor import SpatialTensor, funcs_named, register, wrap
from ..tiling import Partition


def _roll_axis(x: torch.Tensor, mesh: SpatialMesh, part: Partition, axis: int, dim: int, shift: int) -> torch.Tensor:
    """This rank's tile of the roll by ``shift`` of local tile ``x`` along its
    sharded ``dim`` (grid axis ``axis``: 0 rows, 1 columns). No autograd."""
    me = mesh.coord[axis]
    other = mesh.coord[1 - axis]

    def rank_of(j: int) -> int:
        return mesh.rank_at(j, other) if axis == 0 else mesh.rank_at(other, j)

    base = part[me]
    out = torch.empty_like(x)
    own, sends, recvs = [], [], []
    for src, dst, lo, hi, dlo in roll_pieces(part, shift):
        if src == me and dst == me:
            own.append((lo, hi, dlo))
        elif src == me:
            sends.append((rank_of(dst), x.narrow(dim, lo - base, hi - lo)))
        elif dst == me:
            shape = list(x.shape)
            shape[dim] = hi - lo
            recvs.append((rank_of(src), x.new_empty(shape), dlo - base))
    wait = start_exchange(sends, [(r, b) for r, b, _ in recvs], mesh, _phase(), kind="roll")
    for lo, hi, dlo in own:  # the tile's own part moves while the strips travel
        out.narrow(dim, dlo - base, hi - lo).copy_(x.narrow(dim, lo - base, hi - lo))
    wait()
    for _, buf, at in recvs:
        out.narrow(dim, at, buf.shape[dim]).copy_(buf)
    return out


class _Roll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, part, axis, dim, shift):
        ctx.args = (mesh, part, axis, dim)
        ctx.shift = shift
        return _roll_axis(x, mesh, part, axis, dim, shift)

    @staticmethod
    def backward(ctx, g):
        return _roll_axis(g.contiguous(), *ctx.args, -ctx.shift), None, None, None, None, None


def _as_tuple(v) -> tuple:
    if isinstance(v, (list, tuple, torch.Size)):
        return tuple(int(i) for i in v)
    return (int(v),)


@register(*funcs_named("roll", owners=(torch, torch.Tensor)))
def _roll(func, args, kwargs):
    """``roll(x, shifts, dims)``: sharded grid dims by :func:`_roll_axis`, others locally."""
    x = args[0]
    shifts = args[1] if len(args) > 1 else kwargs.get("shifts")
    dims = args[2] if len(args) > 2 else kwargs.get("dims")
    if shifts is None:
        raise context.unsupported("roll", "no shifts given")
    spec = x._spec
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        raise context.unsupported("roll", "a roll without dims shifts the flattened tensor, which mixes the "
                                          f"sharded dims {spec.dims} with the others")
    shifts, dims = _as_tuple(shifts), _as_tuple(dims)
    if len(shifts) != len(dims):
        raise context.unsupported("roll", f"shifts {shifts} and dims {dims} must have the same length")
    out = x._local
    for s, d in zip(shifts, dims):
        d = d % x.dim()
        if d not in spec.dims:
            out = torch.roll(out, s, d)
            continue
        if spec.is_tokens:
            raise context.unsupported("roll", f"rolling the sharded token dim {d} (reshape it to (B, H, W, C) first)")
        axis = spec.dims.index(d)
        part = spec.rows if axis == 0 else spec.cols
        if s % part[-1] == 0:
            continue
        if len(part) == 2:  # one tile along this axis: it holds the whole cycle
            out = torch.roll(out, s, d)
        else:
            out = _Roll.apply(out, spec.mesh, part, axis, d, s)
    return wrap(out, spec)
