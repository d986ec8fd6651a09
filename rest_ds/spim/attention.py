"""Sequence-parallel attention over the tokens of a scene split across the sp group.

Each rank holds the tokens of its tile: ``q, k, v`` of shape ``(B, heads, n_i, d)``
with ``n_i`` this rank's token count (tiles may be uneven). Attention without a
mask is invariant to the order of the keys, so ranks can exchange whole tiles
of tokens in sp order.

* **Ulysses** (``heads % sp == 0``): an all-to-all turns "my tokens, all heads"
  into "all tokens, my heads"; each rank runs ``F.scaled_dot_product_attention``
  (flash / memory-efficient kernels on GPU) over the whole scene for
  ``heads / sp`` heads; a second all-to-all brings the outputs home. Per layer a
  rank sends ``4 (P-1)/P n_i h d`` elements (q, k, v out; o back).
* **All-gather K/V** (any head count): every rank gathers the keys and values of
  the whole scene and attends with its own queries. The backward sends each
  rank's key/value gradient contributions to their owners with one all-to-all.

Both are exact: the result equals attention over the whole sequence on one device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .comm import all_to_all
from .errors import SPIMError
from .mesh import SpatialMesh
from .tokens import full_from_tiles


def _a2a(flat_chunks: list[torch.Tensor], recv_numels: list[int], mesh: SpatialMesh) -> list[torch.Tensor]:
    """all-to-all of chunks: chunk j goes to sp rank j; returns the flat chunks received (:func:`.comm.all_to_all`)."""
    return all_to_all(flat_chunks, recv_numels, mesh)


def _seq_to_heads(x: torch.Tensor, counts: list[int], mesh: SpatialMesh) -> torch.Tensor:
    """(B, h, n_me, d) -> (B, h/P, N, d): tokens of all ranks (sp order), my head group."""
    B, h, n, d = x.shape
    P = mesh.sp
    hp = h // P
    chunks = [x[:, j * hp:(j + 1) * hp].contiguous() for j in range(P)]
    got = _a2a(chunks, [B * hp * c * d for c in counts], mesh)
    return torch.cat([g.view(B, hp, c, d) for g, c in zip(got, counts)], dim=2)


def _heads_to_seq(y: torch.Tensor, counts: list[int], mesh: SpatialMesh) -> torch.Tensor:
    """(B, h/P, N, d) -> (B, h, n_me, d): inverse of :func:`_seq_to_heads`."""
    B, hp, N, d = y.shape
    me = counts[mesh.sp_index]
    chunks = [c.contiguous() for c in y.split(counts, dim=2)]
    got = _a2a(chunks, [B * hp * me * d] * mesh.sp, mesh)
    return torch.cat([g.view(B, hp, me, d) for g in got], dim=1)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, mesh):
        ctx.counts, ctx.mesh = counts, mesh
        return _seq_to_heads(x, counts, mesh)

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g, ctx.counts, ctx.mesh), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, counts, mesh):
        ctx.counts, ctx.mesh = counts, mesh
        return _heads_to_seq(y, counts, mesh)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g, ctx.counts, ctx.mesh), None, None


class _GatherSeqs(torch.autograd.Function):
    """``ts``: tensors of one shape (B, h, prefix + n_me, d): ``prefix`` replicated
    tokens, then this rank's tile tokens -> one (B, h, prefix + N, d) tensor per
    ``t`` on every rank: the prefix, then every sp rank's tile tokens in sp
    order. All of them travel in one exchange.

    The outputs are views of one token-major buffer (prefix + N, len(ts), B, h,
    d), the layout of a fused qkv projection (timm's ``(B, N, 3, h, d)``),
    which the attention kernels read as it is: each rank's tokens of every
    ``t`` are one contiguous block of it, sent from and received into its
    place. No stacking of the tensors, no concatenation of the pieces or of
    the prefix. Backward: every rank's gradient for each rank's tokens goes to
    their owner (one all-to-all, the tensors' gradients in one block per rank)
    and is summed there in sp order; the prefix keeps this rank's own gradient
    (convention P)."""

    @staticmethod
    def forward(ctx, counts, mesh, prefix, *ts):
        B, h, _, d = ts[0].shape
        me = mesh.sp_index
        starts = [prefix + sum(counts[:j]) for j in range(len(counts))]
        buf = ts[0].new_empty(starts[-1] + counts[-1], len(ts), B, h, d)
        outs = _token_major(buf)
        for o, t in zip(outs, ts):
            o.narrow(2, starts[me], counts[me]).copy_(t.narrow(2, prefix, counts[me]))
            if prefix:
                o.narrow(2, 0, prefix).copy_(t.narrow(2, 0, prefix))
        blocks = [buf.narrow(0, s, c) for s, c in zip(starts, counts)]
        all_to_all([blocks[me]] * mesh.sp, None, mesh, out=blocks)
        ctx.cfg = (counts, mesh, prefix, starts)
        return outs

    @staticmethod
    def backward(ctx, *gs):
        counts, mesh, prefix, starts = ctx.cfg
        B, h, _, d = gs[0].shape
        me, n = mesh.sp_index, counts[mesh.sp_index]
        sends, recvs = [None] * mesh.sp, [None] * mesh.sp
        for j in range(mesh.sp):
            if j != me:
                sends[j] = gs[0].new_empty(counts[j], len(gs), B, h, d)
                for o, g in zip(_token_major(sends[j]), gs):
                    o.copy_(g.narrow(2, starts[j], counts[j]))
                recvs[j] = gs[0].new_empty(n, len(gs), B, h, d)
        all_to_all(sends, None, mesh, out=recvs)
        grads = _token_major(gs[0].new_empty(prefix + n, len(gs), B, h, d))
        for i, (gx, g) in enumerate(zip(grads, gs)):
            if prefix:
                gx.narrow(2, 0, prefix).copy_(g.narrow(2, 0, prefix))
            parts = [g.narrow(2, starts[me], n) if j == me else _token_major(recvs[j])[i] for j in range(mesh.sp)]
            acc = torch.add(parts[0], parts[1], out=gx.narrow(2, prefix, n))
            for p in parts[2:]:
                acc.add_(p)
        return (None, None, None) + tuple(grads)


def _token_major(buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The (B, h, n, d) views of a token-major (n, T, B, h, d) buffer, one per T."""
    return tuple(buf.select(1, i).permute(1, 2, 0, 3) for i in range(buf.shape[1]))


def choose_algorithm(heads: int, mesh: SpatialMesh, requested: str = "auto") -> str:
    if requested not in ("auto", "ulysses", "allgather"):
        raise SPIMError(f"attention algorithm must be 'auto', 'ulysses' or 'allgather', not {requested!r}")
    if requested == "ulysses" and heads % mesh.sp:
        raise SPIMError(f"Ulysses attention needs heads ({heads}) divisible by sp ({mesh.sp}); use 'allgather' or 'auto'")
    if requested != "auto":
        return requested
    return "ulysses" if heads % mesh.sp == 0 else "allgather"


def sequence_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: list[int],
                                mesh: SpatialMesh, scale: float | None = None, algorithm: str = "auto",
                                enable_gqa: bool = False, prefix: int = 0) -> torch.Tensor:
    """Exact attention of this rank's queries over the tokens of all sp ranks.

    ``q, k, v``: ``(B, heads, prefix + n_me, d)``: ``prefix`` replicated tokens
    (class/register tokens, identical on every rank) then this rank's tile
    tokens; ``counts[i]``: tile token count of sp rank i. Returns
    ``(B, heads, prefix + n_me, d_v)``. With prefix tokens the all-gather
    algorithm is used (the prefix is small and every rank already holds it)."""
    if mesh.sp == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=enable_gqa)
    algo = choose_algorithm(q.shape[1], mesh, algorithm)
    if algo == "ulysses" and not prefix and k.shape[1] == q.shape[1]:
        qh, kh, vh = (_SeqToHeads.apply(t, counts, mesh) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
        return _HeadsToSeq.apply(out, counts, mesh)
    kf, vf = _gather_kv(k, v, counts, mesh, prefix)
    return F.scaled_dot_product_attention(q, kf, vf, scale=scale, enable_gqa=enable_gqa)


def _gather_kv(k: torch.Tensor, v: torch.Tensor, counts: list[int], mesh: SpatialMesh, prefix: int = 0):
    """The ``prefix`` tokens and every rank's tile tokens of the keys and of the
    values, (B, h, prefix + N, d) each: one exchange for both when their shapes
    allow, halving the synchronisations of an attention layer (and of its backward)."""
    if k.shape == v.shape:
        return _GatherSeqs.apply(counts, mesh, prefix, k, v)
    return _GatherSeqs.apply(counts, mesh, prefix, k)[0], _GatherSeqs.apply(counts, mesh, prefix, v)[0]


class _GatherTiles(torch.autograd.Function):
    """(n_me, R) -> list of every sp rank's (n_i, R), sp order; backward sums every
    rank's gradient for my tokens (one all-to-all)."""

    @staticmethod
    def forward(ctx, x, counts, mesh):
        ctx.counts, ctx.mesh = counts, mesh
        R = x.shape[1]
        got = _a2a([x.contiguous()] * mesh.sp, [c * R for c in counts], mesh)
        return torch.cat([g.view(c, R) for g, c in zip(got, counts)])

    @staticmethod
    def backward(ctx, g):
        counts, mesh = ctx.counts, ctx.mesh
        R = g.shape[1]
        me = counts[mesh.sp_index]
        got = _a2a([c.contiguous() for c in g.split(counts)], [me * R] * mesh.sp, mesh)
        return torch.stack([t.view(me, R) for t in got]).sum(0), None, None


def gather_tokens(x: torch.Tensor, dim: int, spec) -> torch.Tensor:
    """Every rank's tokens along ``dim`` in the scene's global row-major order.

    ``x`` is this rank's local tensor of a token-layout SpatialTensor with spec
    ``spec``. Differentiable (gradients go back to the owning ranks)."""
    mesh = spec.mesh
    moved = x.movedim(dim, 0)
    rest = moved.shape[1:]
    flat = moved.reshape(moved.shape[0], -1)
    head, flat = flat[:spec.prefix], flat[spec.prefix:]
    if mesh.sp > 1:
        flat = _GatherTiles.apply(flat, spec.token_counts(), mesh)
    tiles = list(flat.split(spec.token_counts()))
    full = full_from_tiles(head, tiles, 0, spec).reshape(-1, *rest)
    return full.movedim(0, dim)
