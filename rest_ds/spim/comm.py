"""SPIM collectives over the sp group, with autograd and byte accounting.

Gradient convention (used by every SPIM op): a *replicated* tensor (the same on
all sp ranks, e.g. a pooled vector or a parameter) carries a *partial* gradient on
each rank; the true gradient is the sum over the sp ranks. Hence an all-reduce
that makes a replicated value from per-tile parts has an all-reduce as its
backward, and a gather of tiles has "all-reduce, then take my tile" as its
backward. A scalar loss computed through SPIM ops has the same value on every sp
rank; back-propagating it on every rank (seed 1 each) yields ``sp`` times the
true gradient on every parameter, so parameter gradients are *averaged* over the
sp group (``reduce_gradients``), exactly what DeepSpeed's data-parallel average
over all ``dp x sp`` ranks does.

Accounting: every collective records the bytes *this rank sends*, per kind, by
the standard algorithm volumes: halo and point-to-point = exact payload;
all_reduce = 2 (P-1)/P n (ring); all_gather = (P-1) n_local; all_to_all =
(P-1)/P n; broadcast = n on the root.

Transport: ranks of an sp group on one host exchange CPU tensors through a
shared-memory segment (:mod:`.shm`, ``mesh.shm``), everything else goes
through ``torch.distributed``; the accounting is the same either way.

Device: gloo moves host memory only, so a CUDA tensor that crosses a gloo group
is staged through a host copy (:func:`to_wire` / :func:`from_wire`). That lets
several ranks share one GPU on gloo, e.g. to verify a model on a one-GPU
workstation; NCCL groups move device memory directly.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .mesh import SpatialMesh


@dataclass
class CommStats:
    """Bytes sent and calls made by this rank, per collective kind and phase."""

    bytes: dict = field(default_factory=lambda: defaultdict(int))
    calls: dict = field(default_factory=lambda: defaultdict(int))
    by_phase: dict = field(default_factory=lambda: defaultdict(int))

    def record(self, kind: str, nbytes: float, phase: str) -> None:
        self.bytes[kind] += int(round(nbytes))
        self.calls[kind] += 1
        self.by_phase[(kind, phase)] += int(round(nbytes))

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()
        self.by_phase.clear()

    def as_dict(self) -> dict:
        return {
            "bytes": dict(self.bytes),
            "calls": dict(self.calls),
            "by_phase": {f"{k}/{p}": v for (k, p), v in self.by_phase.items()},
        }


_STATS = CommStats()

# tests set this to stage CPU tensors too, so the copy paths run without a GPU
_FORCE_STAGING = False


def _staged(t: torch.Tensor, group) -> bool:
    return _FORCE_STAGING or (t.device.type != "cpu" and dist.get_backend(group) == "gloo")


def to_wire(t: torch.Tensor, group) -> torch.Tensor:
    """``t`` as the backend of ``group`` can send it: a host copy for a device
    tensor on gloo, else ``t`` itself."""
    return t.to("cpu", copy=True) if _staged(t, group) else t


def wire_buffer(like: torch.Tensor, shape, group) -> torch.Tensor:
    """An empty receive buffer for ``group``'s backend (host memory on gloo)."""
    return torch.empty(shape, dtype=like.dtype, device="cpu") if _staged(like, group) else like.new_empty(shape)


def from_wire(buf: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """Copy a received buffer into ``into`` unless it already is ``into``."""
    if buf is not into:
        into.copy_(buf)
    return into


def comm_stats() -> CommStats:
    """The process-wide accounting object (reset it with ``.reset()``)."""
    return _STATS


@contextlib.contextmanager
def track_comm():
    """Reset the counters, yield them, keep counting until the block ends."""
    _STATS.reset()
    yield _STATS


def _phase() -> str:
    return "backward" if torch._C._current_autograd_node() is not None else "forward"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce_(t: torch.Tensor, mesh: SpatialMesh, op=dist.ReduceOp.SUM, kind: str = "all_reduce",
                record: bool = True) -> torch.Tensor:
    """In-place all-reduce over the sp group, no autograd. Returns ``t``.
    ``record=False``: not counted (checks around a measured run)."""
    return start_all_reduce_(t, mesh, op, kind, record)()


_SHM_OPS = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max", dist.ReduceOp.MIN: "min"}


def start_all_reduce_(t: torch.Tensor, mesh: SpatialMesh, op=dist.ReduceOp.SUM, kind: str = "all_reduce",
                      record: bool = True):
    """:func:`all_reduce_` posted: returns ``wait()``, which completes it and
    returns ``t`` (reduced in place); work done in between overlaps the peers'
    arrival. ``t`` must not change before ``wait()``."""
    if mesh.sp == 1:
        return lambda: t
    if record:
        _STATS.record(kind, 2 * (mesh.sp - 1) / mesh.sp * _nbytes(t), _phase())
    w = to_wire(t, mesh.sp_group)
    ch, name = mesh.shm, _SHM_OPS.get(op)
    if ch is not None and name is not None and w.device.type == "cpu" and ch.fits_collective(w):
        done = ch.start_all_reduce_(w, name)
    else:
        done = dist.all_reduce(w, op=op, group=mesh.sp_group, async_op=True).wait

    def wait() -> torch.Tensor:
        done()
        return from_wire(w, t)

    return wait


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        return all_reduce_(x.clone(), mesh)

    @staticmethod
    def backward(ctx, g):
        return all_reduce_(g.contiguous().clone(), ctx.mesh), None


def all_reduce_sum(x: torch.Tensor, mesh: SpatialMesh) -> torch.Tensor:
    """Sum of per-rank parts over the sp group (replicated result; backward all-reduces)."""
    if mesh.sp == 1:
        return x
    return _AllReduceSum.apply(x.contiguous(), mesh)


def all_gather_padded(t: torch.Tensor, mesh: SpatialMesh) -> list[torch.Tensor]:
    """All-gather tensors whose shapes may differ per rank (gloo's all_gather needs
    equal sizes): shapes are exchanged first, payloads padded to the largest.
    Returns one tensor per sp rank, in sp order. No autograd."""
    if mesh.sp == 1:
        return [t]
    t = t.contiguous()
    g = mesh.sp_group
    shape = to_wire(torch.tensor(list(t.shape), dtype=torch.int64, device=t.device), g)
    shapes = [torch.empty_like(shape) for _ in range(mesh.sp)]
    dist.all_gather(shapes, shape, group=g)
    shapes = [tuple(int(v) for v in s.tolist()) for s in shapes]
    numel = max(int(torch.Size(s).numel()) for s in shapes)
    flat = torch.zeros(numel, dtype=t.dtype, device=t.device)
    flat[: t.numel()] = t.reshape(-1)
    flat = to_wire(flat, g)
    bufs = [torch.empty_like(flat) for _ in range(mesh.sp)]
    _STATS.record("all_gather", (mesh.sp - 1) * _nbytes(flat), _phase())
    dist.all_gather(bufs, flat, group=g)
    return [b[: torch.Size(s).numel()].view(s).to(t.device) for b, s in zip(bufs, shapes)]


def all_gather_equal(t: torch.Tensor, mesh: SpatialMesh) -> torch.Tensor:
    """``(sp, *t.shape)``: every sp rank's ``t`` (the same shape on all ranks),
    in sp order; one collective, no autograd."""
    if mesh.sp == 1:
        return t.unsqueeze(0)
    g = mesh.sp_group
    w = to_wire(t.contiguous(), g)
    _STATS.record("all_gather", (mesh.sp - 1) * _nbytes(w), _phase())
    ch = mesh.shm
    if ch is not None and w.device.type == "cpu" and ch.fits_collective(w):
        return ch.all_gather(w).to(t.device)
    parts = [torch.empty_like(w) for _ in range(mesh.sp)]
    dist.all_gather(parts, w, group=g)
    return torch.stack(parts).to(t.device)


def all_to_all(chunks: list[torch.Tensor | None], recv_numels: list[int] | None, mesh: SpatialMesh,
               kind: str = "all_to_all", out: list[torch.Tensor | None] | None = None) -> list:
    """Chunk ``j`` (any shape, one dtype) goes to sp rank ``j``; returns the flat
    chunks received from every sp rank, in sp order (``recv_numels[j]``
    elements from rank ``j``; the own one is ``chunks[me]`` flattened, not a
    copy). With ``out`` (a tensor per sp rank, any shape and strides;
    ``recv_numels``, ``chunks[me]`` and ``out[me]`` are not used and may be
    None) rank ``j``'s chunk is written into ``out[j]``, with no flat buffer in
    between on the shared-memory route, and ``out`` is returned. No autograd.
    Same-host groups whose ranks are all grid neighbours exchange through the
    shared-memory mailboxes (gloo's all-to-all costs ~1.5 ms of wall time per
    call on a loaded CPU host), others use one ``all_to_all_single``; the
    choice depends only on the group."""
    me = mesh.sp_index
    like = next(c for c in chunks if c is not None)
    if out is not None:  # nothing travels to or from this rank itself
        chunks = [like.new_empty(0) if j == me else c for j, c in enumerate(chunks)]
        recv_numels = [0 if j == me else t.numel() for j, t in enumerate(out)]
    sent_away = sum(c.numel() for j, c in enumerate(chunks) if j != me)
    _STATS.record(kind, sent_away * like.element_size(), _phase())
    ch = mesh.shm
    if ch is not None and ch.all_pairs and like.device.type == "cpu":
        got = list(out) if out is not None else \
            [like.new_empty(n) if j != me else chunks[me].reshape(-1) for j, n in enumerate(recv_numels)]
        ch.all_to_all([(mesh.sp_ranks[j], c) for j, c in enumerate(chunks) if j != me],
                      [(mesh.sp_ranks[j], b) for j, b in enumerate(got) if j != me])
        return got
    send = torch.cat([c.reshape(-1) for c in chunks])
    g = mesh.sp_group
    recv = wire_buffer(send, (sum(recv_numels),), g)
    dist.all_to_all_single(recv, to_wire(send, g), recv_numels, [c.numel() for c in chunks], group=g)
    parts = list(recv.to(send.device).split(recv_numels))
    if out is None:
        return parts
    for j, t in enumerate(out):
        if j != me:
            t.copy_(parts[j].view(t.shape))
    return list(out)


def all_gather_object(obj, mesh: SpatialMesh) -> list:
    if mesh.sp == 1:
        return [obj]
    out = [None] * mesh.sp
    dist.all_gather_object(out, obj, group=mesh.sp_group)
    return out


def broadcast_(t: torch.Tensor, mesh: SpatialMesh, src_index: int = 0, record: bool = True) -> torch.Tensor:
    """Broadcast in place from sp rank ``src_index`` to its sp group (``record`` as in :func:`all_reduce_`)."""
    if mesh.sp > 1:
        if record and mesh.sp_index == src_index:
            _STATS.record("broadcast", _nbytes(t), _phase())
        w = to_wire(t, mesh.sp_group)
        dist.broadcast(w, src=mesh.sp_ranks[src_index], group=mesh.sp_group)
        from_wire(w, t)
    return t
