"""Halo exchange: give each rank the global window its next op needs.

A sharded op states, for every grid row ``i``, the global row range
``need_rows[i] = (lo, hi)`` that the ranks of that row need as input (and the same
for columns). The range may reach into the neighbouring tiles (a halo) or beyond
the scene (scene padding, added by the caller, never at a tile border); it may
also stop short of the own tile (a rank's last rows can belong to its
neighbour's first output, e.g. a stride that does not divide the tile).

The exchange talks to the 8 neighbours (corners included) with one batch of
point-to-point sends. Its backward sends the halo gradients back to their owners,
which add them to their tile gradient.

Halos that reach past the adjacent tiles (a dilated conv wider than a tile,
e.g. DeepLab's rate-36 ASPP branch on a small map or a 3-way split): the plan
is then *far* on every rank alike (it depends only on the global partitions
and needs). Each rank works out from that geometry which part of its tile
every other rank's window holds, and the pieces travel in one
``all_to_all_single`` over the sp group (gloo cannot all-gather unequal
sizes), as do their gradients in the backward. Only those ops take the
collective; every other exchange stays neighbour-to-neighbour.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist

from .comm import _STATS, _phase, from_wire, to_wire, wire_buffer
from . import context
from .errors import SPIMError
from . import geometry
from .geometry import Partition, Range, reaches_far  # noqa: F401  (reaches_far: importable from here)
from .mesh import SpatialMesh

# the range arithmetic is geometry.py's; these short names are used below
_clip, _inter, _box = geometry.clip, geometry.intersect, geometry.box_intersect

REFERENCE_ENV = "REST_DS_SPIM_REFERENCE"


def reference_paths() -> bool:
    """Whether sharded ops take their reference paths (environment variable
    ``REST_DS_SPIM_REFERENCE`` set and not ``0``): the simplest exact route,
    every window exchanged in one all-to-all over sp (the far plan, which
    serves any geometry), torch's own op on the assembled window and torch's
    autograd through both, instead of the neighbour exchange and the
    padded-tile / hand-written-backward fast paths (window ops in
    ops/window.py; resampling in ops/resample.py takes the global taps on the
    window instead of torch's kernel and the border strips). For testing the fast paths
    against it; it must be set alike on every rank of an sp group (they would
    otherwise wait in different collectives). Read at every op, so it may be
    switched between forwards."""
    return os.environ.get(REFERENCE_ENV, "0") not in ("", "0")


def set_reference_paths(enabled: bool) -> bool:
    """Select the reference paths (True) or the fast paths (False) for this
    process and the processes it starts afterwards (:func:`reference_paths`);
    returns the previous setting."""
    before = reference_paths()
    os.environ[REFERENCE_ENV] = "1" if enabled else "0"
    return before


def check_nonempty(needs: tuple[Range, ...], n: int, axis: str, op: str) -> None:
    """Every grid row's (col's) need must hold some input of the scene."""
    for i, need in enumerate(needs):
        lo, hi = _clip(need, n)
        if hi <= lo:
            raise SPIMError(f"{context.where()}: {op}: the tile in grid {axis} {i} needs an empty input range "
                            f"{need} of a scene of {n} {axis}s")


def check_needs(part: Partition, needs: tuple[Range, ...], axis: str, op: str) -> None:
    """Every grid row's need must lie within its own and the adjacent tiles
    (the neighbour exchange; :func:`make_plan` takes a far plan instead)."""
    i = geometry.far_tile(part, needs)
    if i is not None:
        lo, hi = _clip(needs[i], part[-1])
        sizes = list(geometry.tile_sizes(part))
        raise SPIMError(
            f"{context.where()}: {op}: the tile in grid {axis} {i} (global {axis}s {part[i]}:{part[i + 1]}) needs "
            f"{axis}s {lo}:{hi}, which reach past its neighbouring tiles (tile sizes {sizes}); "
            f"tiles are smaller than the op's halo: use fewer ranks along this axis or a larger scene"
        )
    check_nonempty(needs, part[-1], axis, op)


def _slice(t: torch.Tensor, dims, base: tuple[int, int], rows: Range, cols: Range) -> torch.Tensor:
    return t.narrow(dims[0], rows[0] - base[0], rows[1] - rows[0]).narrow(dims[1], cols[0] - base[1], cols[1] - cols[0])


def _box_shape(shape, dims, rows: Range, cols: Range) -> list[int]:
    out = list(shape)
    out[dims[0]], out[dims[1]] = rows[1] - rows[0], cols[1] - cols[0]
    return out


class _Plan:
    """Who sends what to whom for one exchange on this rank (global ranges):
    :func:`geometry.exchange_plan` of this rank's tile, with grid coordinates
    turned into global ranks. ``far``: some rank's window reaches past its
    adjacent tiles (the same on every rank); pieces then come from any tile,
    in one all-to-all."""

    def __init__(self, mesh, rows, cols, need_rows, need_cols, far: bool = False):
        g = geometry.exchange_plan(rows, cols, need_rows, need_cols, mesh.coord, far)
        self.far, self.origin, self.ext, self.own = g.far, g.origin, g.ext, g.own
        # pieces I assemble: (src rank, rows, cols); pieces others need from me: (dst rank, rows, cols)
        self.recv = tuple((mesh.rank_at(*ij), rr, cc) for ij, rr, cc in g.recv)
        self.send = tuple((mesh.rank_at(*ij), rr, cc) for ij, rr, cc in g.send)


def start_exchange(send_items, recv_items, mesh, kind_bytes_phase, kind: str = "halo"):
    """Post batched p2p: send_items [(dst, tensor)], recv_items [(src, buffer)];
    the tensors may be strided views. Returns ``wait()``, which completes it
    (the buffers hold the data after it, the sent tensors may change after it);
    work done in between overlaps the transfer. ``kind``: the comm_stats
    entry the bytes are counted under (``kind_bytes_phase``: the phase).

    A pair of grid neighbours on one host goes through the shared-memory
    channel (CPU tensors), anything else through gloo/NCCL point-to-point."""
    ops, g, ch, me = [], mesh.sp_group, mesh.shm, mesh.rank
    shm_sends, shm_recvs = [], []
    for dst, t in send_items:
        _STATS.record(kind, t.numel() * t.element_size(), kind_bytes_phase)
        if ch is not None and t.device.type == "cpu" and ch.has_mailbox(me, dst):
            shm_sends.append((dst, t))
        else:
            ops.append(dist.P2POp(dist.isend, to_wire(t.contiguous(), g), dst, group=g))
    wires = []
    for src, buf in recv_items:
        if ch is not None and buf.device.type == "cpu" and ch.has_mailbox(src, me):
            shm_recvs.append((src, buf))
            continue
        wires.append((buf, wire_buffer(buf, buf.shape, g)))
        ops.append(dist.P2POp(dist.irecv, wires[-1][1], src, group=g))
    reqs = dist.batch_isend_irecv(ops) if ops else []
    finish = ch.start_exchange(shm_sends, shm_recvs) if shm_sends or shm_recvs else None

    def wait():
        if finish is not None:
            finish()
        for req in reqs:
            req.wait()
        del ops[:]  # the sent tensors may go now
        for buf, w in wires:
            from_wire(w, buf)

    return wait


def start_all_to_all(send_items, recv_items, like: torch.Tensor, mesh: SpatialMesh, phase: str,
                     kind: str = "halo"):
    """:func:`start_exchange` as one ``all_to_all_single`` over the sp group
    (every sp rank must call it, with or without items: a far plan's exchange).
    ``send_items`` [(dst global rank, tensor)], ``recv_items`` [(src, buffer)],
    at most one of each per peer; ``like`` gives dtype and device. Returns
    ``wait()``, after which the buffers hold the data."""
    g, P = mesh.sp_group, mesh.sp
    at = {rank: i for i, rank in enumerate(mesh.sp_ranks)}
    sends, recvs = [None] * P, [None] * P
    for dst, t in send_items:
        sends[at[dst]] = t
    for src, buf in recv_items:
        recvs[at[src]] = buf
    in_splits = [0 if t is None else t.numel() for t in sends]
    out_splits = [0 if b is None else b.numel() for b in recvs]
    flat = [t.reshape(-1) for t in sends if t is not None]
    send = torch.cat(flat) if flat else like.new_empty(0)
    _STATS.record(kind, sum(n for i, n in enumerate(in_splits) if i != mesh.sp_index) * like.element_size(), phase)
    recv = wire_buffer(like, (sum(out_splits),), g)
    work = dist.all_to_all_single(recv, to_wire(send, g), out_splits, in_splits, group=g, async_op=True)

    def wait():
        work.wait()
        got = recv.to(like.device).split(out_splits)
        for buf, part in zip(recvs, got):
            if buf is not None:
                buf.copy_(part.view(buf.shape))

    return wait


def _start_plan_exchange(plan: "_Plan", send_items, recv_items, like: torch.Tensor, mesh: SpatialMesh, phase: str):
    """The exchange of ``plan``: neighbour p2p, or one all-to-all for a far plan."""
    if plan.far:
        return start_all_to_all(send_items, recv_items, like, mesh, phase)
    return start_exchange(send_items, recv_items, mesh, phase)


def assemble(pieces: dict, dims, pads: tuple[int, int, int, int] = (0, 0, 0, 0), fill: float = 0.0,
             memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """The window from its pieces (keyed by global (rows, cols)), with ``pads``
    = (left, right, top, bottom) elements of ``fill`` added at the scene border
    (:func:`window_part` of the pieces' box so extended, in ``memory_format``);
    a lone piece without padding is returned as is (a view of the tile)."""
    keys = list(pieces)
    if len(keys) == 1 and not any(pads):
        return pieces[keys[0]]
    left, right, top, bottom = pads
    rows = (min(k[0][0] for k in keys) - top, max(k[0][1] for k in keys) + bottom)
    cols = (min(k[1][0] for k in keys) - left, max(k[1][1] for k in keys) + right)
    return window_part(pieces, dims, rows, cols, fill, memory_format)


def fetch(x: torch.Tensor, mesh: SpatialMesh, plan: _Plan, dims) -> dict:
    """Send my pieces to the neighbours that need them, receive theirs.
    Returns {(rows, cols): tensor} covering this rank's window (own piece included)."""
    pieces, wait = start_fetch(x, mesh, plan, dims)
    wait()
    return pieces


def start_fetch(x: torch.Tensor, mesh: SpatialMesh, plan: _Plan, dims):
    """:func:`fetch`, posted: returns (pieces, wait); the received pieces hold
    their data once ``wait()`` has returned."""
    sends = [(dst, _slice(x, dims, plan.origin, rr, cc)) for dst, rr, cc in plan.send]
    pieces, recvs = {}, []
    for src, rr, cc in plan.recv:
        buf = x.new_empty(_box_shape(x.shape, dims, rr, cc))
        pieces[(rr, cc)] = buf
        recvs.append((src, buf))
    wait = _start_plan_exchange(plan, sends, recvs, x, mesh, "forward")
    if plan.own is not None:
        pieces[plan.own] = _slice(x, dims, plan.origin, *plan.own)
    return pieces, wait


def return_grads(g: torch.Tensor, mesh: SpatialMesh, plan: _Plan, dims, x_shape, reuse: bool = False) -> torch.Tensor:
    """Backward of :func:`fetch` + assembly: ``g`` is the gradient of the window;
    halo parts go back to their owners, which add them to their tile gradient.

    ``reuse``: ``g`` is a buffer the caller owns and no longer needs; when the
    window holds the whole tile, the tile gradient is then a view of ``g`` (the
    returned halo gradients are added into it in place) instead of a new
    tile-size tensor."""
    base = (plan.ext[0][0], plan.ext[1][0])
    sends = [(src, _slice(g, dims, base, rr, cc)) for src, rr, cc in plan.recv]
    recvs = [(dst, g.new_empty(_box_shape(g.shape, dims, rr, cc)), rr, cc) for dst, rr, cc in plan.send]
    _start_plan_exchange(plan, sends, [(r, b) for r, b, _, _ in recvs], g, mesh, "backward")()
    del sends
    whole = ((plan.origin[0], plan.origin[0] + x_shape[dims[0]]), (plan.origin[1], plan.origin[1] + x_shape[dims[1]]))
    if reuse and plan.own == whole:
        # the sent halo parts lie outside the own tile, so writing into it is safe
        gx = _slice(g, dims, base, *plan.own)
    else:
        gx = g.new_zeros(x_shape)
        if plan.own is not None:
            _slice(gx, dims, plan.origin, *plan.own).add_(_slice(g, dims, base, *plan.own))
    for _, buf, rr, cc in recvs:
        _slice(gx, dims, plan.origin, rr, cc).add_(buf)
    return gx


def window_part(pieces: dict, dims, rows: Range, cols: Range, fill: float = 0.0,
                memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """Global rows x cols of a window from its pieces ({(rows, cols): tensor},
    e.g. from :func:`start_fetch`, which tile the window's part inside the
    scene), ``fill`` where no piece lies (the scene border). One allocation,
    in ``memory_format`` (default: contiguous); only the bands outside the
    pieces are filled."""
    ref = next(iter(pieces.values()))
    shape = _box_shape(ref.shape, dims, rows, cols)
    out = ref.new_empty(shape) if memory_format is None else \
        torch.empty(shape, dtype=ref.dtype, device=ref.device, memory_format=memory_format)
    parts = [(box, key, t) for key, t in pieces.items() if (box := _box(key, rows, cols)) is not None]
    if not parts:
        return out.fill_(fill)
    covered = [(min(b[a][0] for b, _, _ in parts), max(b[a][1] for b, _, _ in parts)) for a in (0, 1)]
    for a, (lo, hi), (c0, c1) in zip((0, 1), (rows, cols), covered):
        if c0 > lo:
            out.narrow(dims[a], 0, c0 - lo).fill_(fill)
        if hi > c1:
            out.narrow(dims[a], c1 - lo, hi - c1).fill_(fill)
    for box, key, t in parts:
        _slice(out, dims, (rows[0], cols[0]), *box).copy_(_slice(t, dims, (key[0][0], key[1][0]), *box))
    return out


class WindowGrads:
    """A tile's gradient from the gradients of windows over it (global boxes
    that may reach into the halos of ``plan``). :meth:`add` splits a window's
    gradient into the tile's part (kept) and the halos' parts (gathered per
    piece); :meth:`send` posts the halos' parts to their owners, so that they
    travel while the caller computes the rest of the tile gradient;
    :meth:`finish` adds the kept parts and what the neighbours sent for this
    tile into that gradient."""

    def __init__(self, like: torch.Tensor, tile_shape, plan: _Plan, dims):
        self.like, self.shape, self.plan, self.dims = like, list(tile_shape), plan, dims
        o = plan.origin
        self.own = ((o[0], o[0] + tile_shape[dims[0]]), (o[1], o[1] + tile_shape[dims[1]]))
        self.halos = {(rr, cc): like.new_zeros(_box_shape(tile_shape, dims, rr, cc)) for _, rr, cc in plan.recv}
        self.kept = []  # (box, gradient part) for the tile
        self.recvs, self.wait = [], None

    def add(self, g: torch.Tensor, rows: Range, cols: Range) -> None:
        """Add ``g``, the gradient of the window rows x cols (kept by reference until :meth:`finish`)."""
        box = _box(self.own, rows, cols)
        if box is not None:
            self.kept.append((box, _slice(g, self.dims, (rows[0], cols[0]), *box)))
        for key, t in self.halos.items():
            box = _box(key, rows, cols)
            if box is not None:
                _slice(t, self.dims, (key[0][0], key[1][0]), *box).add_(_slice(g, self.dims, (rows[0], cols[0]), *box))

    def add_piece(self, key, g: torch.Tensor) -> None:
        """Add ``g``, a gradient of exactly the received piece ``key`` = (rows, cols)."""
        self.halos[key].add_(g)

    def send(self, mesh: SpatialMesh) -> None:
        self.recvs = [(dst, self.like.new_empty(_box_shape(self.shape, self.dims, rr, cc)), rr, cc)
                      for dst, rr, cc in self.plan.send]
        self.wait = _start_plan_exchange(self.plan, [(src, self.halos[(rr, cc)]) for src, rr, cc in self.plan.recv],
                                         [(r, b) for r, b, _, _ in self.recvs], self.like, mesh, "backward")

    def finish(self, gx: torch.Tensor) -> torch.Tensor:
        """``gx``: the rest of this rank's tile gradient, written in place and returned."""
        for box, part in self.kept:
            _slice(gx, self.dims, self.plan.origin, *box).add_(part)
        self.wait()
        for _, buf, rr, cc in self.recvs:
            _slice(gx, self.dims, self.plan.origin, rr, cc).add_(buf)
        return gx


def dense_grad(g: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient ``g`` of a 4-D map, dense in memory: ``g`` itself when it is
    contiguous in NCHW or channels-last order, else a copy, channels-last when
    ``like`` (default ``g``) has its channels innermost (a map made from tokens,
    ``x.transpose(1, 2).view(B, C, H, W)``, or a channel slice of one: the
    gradient of a ``torch.cat`` over channels), else NCHW. Native backward
    kernels then see the layout torch's own autograd gives them on one device:
    an NCHW copy of a channels-last gradient costs more than a bilinear backward
    itself (SegFormer's head at 1024 px: 0.13 s against 0.01 s per level)."""
    if g.is_contiguous() or g.is_contiguous(memory_format=torch.channels_last):
        return g
    ref = g if like is None else like
    cl = ref.dim() == 4 and ref.shape[1] > 1 and ref.stride(1) == 1
    return g.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def box_view(t: torch.Tensor, dims, rows: Range, cols: Range) -> torch.Tensor:
    """Local rows x cols of ``t`` (``dims`` its row and column dims), a view."""
    return _slice(t, dims, (0, 0), rows, cols)


def border_strips(plan: _Plan, tile_shape, dims, n, first, last_from_end):
    """:func:`geometry.border_strips` of this rank's tile (``tile_shape`` with
    row and column dims ``dims``) and the halo pieces of ``plan``."""
    return geometry.border_strips(plan.origin, (tile_shape[dims[0]], tile_shape[dims[1]]),
                                  [(rr, cc) for _, rr, cc in plan.recv], n, first, last_from_end)


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, plan, dims):
        ctx.mesh, ctx.plan, ctx.dims, ctx.shape = mesh, plan, dims, x.shape
        return assemble(fetch(x, mesh, plan, dims), dims).contiguous()  # a lone piece is a view of x

    @staticmethod
    def backward(ctx, g):
        return return_grads(g, ctx.mesh, ctx.plan, ctx.dims, ctx.shape), None, None, None


def make_plan(mesh: SpatialMesh, rows: Partition, cols: Partition, need_rows: tuple[Range, ...],
              need_cols: tuple[Range, ...], op: str, far: bool = False) -> _Plan:
    """Validate the needs (same error on every rank) and plan this rank's
    exchange: with the neighbours, or a far plan (one all-to-all) when some
    rank's window reaches past its adjacent tiles or ``far`` asks for one
    (the reference path: then on every rank)."""
    return _cached_plan(mesh, tuple(rows), tuple(cols), tuple(map(tuple, need_rows)), tuple(map(tuple, need_cols)),
                        bool(far), op)


# A model exchanges the same halos every step, and a plan is a pure function of the mesh's grid
# fields, the partitions and the needs, never modified (its pieces are tuples). What raises is
# not cached (lru_cache), so a bad window fails with the same error every time.
@functools.lru_cache(maxsize=1024)
def _cached_plan(mesh, rows, cols, need_rows, need_cols, far: bool, op: str) -> "_Plan":
    check_nonempty(need_rows, rows[-1], "row", op)
    check_nonempty(need_cols, cols[-1], "col", op)
    far = far or reaches_far(rows, need_rows) or reaches_far(cols, need_cols)
    return _Plan(mesh, rows, cols, need_rows, need_cols, far)


def relayout(x: torch.Tensor, mesh: SpatialMesh, rows: Partition, cols: Partition, to_rows: Partition,
             to_cols: Partition, dims: tuple[int, int], op: str = "relayout") -> torch.Tensor:
    """This rank's tile of the same global map under the partitions ``to_rows`` /
    ``to_cols`` (same grid, same scene size): the lines that move to a neighbour go
    there, by one halo exchange whose needs are the new tiles (a need may stop short
    of the own tile). Two branches of one residual block can partition their common
    output differently (a stride-2 conv with TF 'same' padding, whose window centres
    sit one line later than a 2 x 2 average pool's: NFNets); an element-wise op over
    both then takes this. Differentiable."""
    return halo_exchange(x, mesh, rows, cols, tuple(zip(to_rows[:-1], to_rows[1:])),
                         tuple(zip(to_cols[:-1], to_cols[1:])), dims, op)


def halo_exchange(
    x: torch.Tensor,
    mesh: SpatialMesh,
    rows: Partition,
    cols: Partition,
    need_rows: tuple[Range, ...],
    need_cols: tuple[Range, ...],
    dims: tuple[int, int],
    op: str = "halo exchange",
    far: bool = False,
) -> torch.Tensor:
    """Return this rank's input window ``need ∩ scene`` (global rows x cols).

    ``x`` is this rank's local tile (``dims`` are its row and column dims,
    laid out by ``rows``/``cols``). The caller pads the parts of ``need`` that lie
    outside the scene. Differentiable. ``far``: through one all-to-all even
    where the neighbours would do (every rank of the sp group alike)."""
    dims = tuple(d % x.dim() for d in dims)
    plan = make_plan(mesh, rows, cols, need_rows, need_cols, op, far)
    if mesh.sp == 1 or (not plan.send and not plan.recv and not plan.far):  # a far plan's collective needs every rank
        return _slice(x, dims, plan.origin, *plan.own)
    return _HaloExchange.apply(x, mesh, plan, dims)
