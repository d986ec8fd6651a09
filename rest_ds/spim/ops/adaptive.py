"""Adaptive average pooling (PPM, ASPP image pooling, global pooling).

Bins are global, by PyTorch's rule: output ``i`` of ``o`` over an extent ``n``
averages ``[floor(i n / o), ceil((i + 1) n / o))``. Each rank sums its overlap
with every bin (two small 0/1 matrices for its global row and column range),
one autograd all-reduce over the sp group adds the tiles, and the division by
the bin areas happens after it. The small result is a plain replicated tensor.

``None`` in ``output_size`` keeps that axis whole, so the result stays sharded
along it; that is exact without communication when the *other* axis is not
split over the grid, and refused otherwise.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import context
from ..comm import all_reduce_sum
from ..tensor import SpatialTensor, Spec, register, wrap
from .norm import bind_args


def bins(n: int, o: int) -> tuple[list[int], list[int]]:
    """Global bin starts and ends for pooling an extent ``n`` to ``o`` outputs."""
    return [(i * n) // o for i in range(o)], [-((-(i + 1) * n) // o) for i in range(o)]


def overlap_matrix(n: int, o: int, lo: int, hi: int, dtype, device) -> torch.Tensor:
    """(o, hi - lo) 0/1 matrix: entry (i, j) is 1 when global index lo + j lies in bin i."""
    start, end = bins(n, o)
    j = torch.arange(lo, hi, device=device)
    s = torch.tensor(start, device=device).unsqueeze(1)
    e = torch.tensor(end, device=device).unsqueeze(1)
    return ((j >= s) & (j < e)).to(dtype)


@functools.lru_cache(maxsize=256)
def _bin_weights(H: int, W: int, o_h: int, o_w: int, rows: tuple[int, int], cols: tuple[int, int], dtype,
                 device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row overlaps (o_h, r1 - r0), column overlaps transposed (c1 - c0, o_w), bin
    areas (o_h, o_w)) of a tile's global ``rows`` / ``cols`` range: constants, built
    once (~20 small ops) for the pools of every step and never written to."""
    mr = overlap_matrix(H, o_h, rows[0], rows[1], dtype, device)
    mc = overlap_matrix(W, o_w, cols[0], cols[1], dtype, device)
    (sh, eh), (sw, ew) = bins(H, o_h), bins(W, o_w)
    area = (torch.tensor([e - s for s, e in zip(sh, eh)], dtype=dtype, device=device).unsqueeze(1)
            * torch.tensor([e - s for s, e in zip(sw, ew)], dtype=dtype, device=device).unsqueeze(0))
    return mr, mc.t(), area


def _output_size(output_size, shape) -> list:
    if isinstance(output_size, int):
        return [output_size, output_size]
    out = list(output_size)
    if len(out) == 1:
        out = out * 2
    if len(out) != 2:
        raise ValueError(f"adaptive_avg_pool2d: output_size must be 2 (got {output_size})")
    return out


@register(F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d)
def _adaptive_avg_pool2d(func, args, kwargs):
    a = bind_args("adaptive_avg_pool2d", ("input", "output_size"), {}, args, kwargs)
    x = a["input"]
    if not isinstance(x, SpatialTensor):
        raise context.unsupported("adaptive_avg_pool2d", "a sharded tensor as a secondary argument")
    nd = x.dim()
    if nd not in (3, 4) or x._spec.dims != (nd - 2, nd - 1):
        raise context.unsupported("adaptive_avg_pool2d", f"sharded dims {x._spec.dims} of a {nd}-D tensor "
                                                         f"((N,) C, H, W sharded over H and W expected)")
    spec, loc = x._spec, x._local
    H, W = spec.global_hw
    out = _output_size(a["output_size"], (H, W))
    if any(o is not None and int(o) < 1 for o in out):
        raise ValueError(f"adaptive_avg_pool2d: output size {tuple(out)} must be positive")
    (r0, r1), (c0, c1) = spec.row_range, spec.col_range
    ph, pw = spec.mesh.grid
    if None in out:
        # None keeps that axis (sharded); exact locally only if the other axis is whole on every rank
        keep_rows, keep_cols = out[0] is None, out[1] is None
        if (keep_rows and not keep_cols and pw > 1) or (keep_cols and not keep_rows and ph > 1):
            raise context.unsupported(
                "adaptive_avg_pool2d", f"output_size {tuple(out)} keeps one sharded axis and pools the other, "
                f"which is split over the {ph}x{pw} grid")
        o_h = r1 - r0 if keep_rows else int(out[0])
        o_w = c1 - c0 if keep_cols else int(out[1])
        y = F.adaptive_avg_pool2d(loc, (o_h, o_w))
        rows = spec.rows if keep_rows else (0, o_h)
        cols = spec.cols if keep_cols else (0, o_w)
        return wrap(y, Spec(spec.mesh, spec.dims, rows, cols))
    o_h, o_w = int(out[0]), int(out[1])
    # Sum in float64 below double precision: torch's CPU kernel accumulates fp32 bins in double, and a
    # BatchNorm over a few 1x1 pooled values (ASPP image pooling at small batch) amplifies any difference.
    acc = torch.float64 if loc.dtype in (torch.float16, torch.bfloat16, torch.float32) else loc.dtype
    mr, mc_t, area = _bin_weights(H, W, o_h, o_w, (r0, r1), (c0, c1), acc, loc.device)
    part = torch.matmul(mr, torch.matmul(loc.to(acc), mc_t))  # (..., o_h, o_w) sums of my overlaps
    total = all_reduce_sum(part, spec.mesh)
    return (total / area).to(loc.dtype)


@register(F.adaptive_avg_pool1d, torch.adaptive_avg_pool1d)
def _adaptive_avg_pool1d(func, args, kwargs):
    """``adaptive_avg_pool1d(x, 1)`` of an (N, C, L) sequence token-sharded on L (a
    pooler's global average over the tokens, ``nn.AdaptiveAvgPool1d(1)``) is the mean
    over the tokens: that rule (a sum all-reduced over the sp group; refused with
    prefix tokens). Other output sizes would bin the raster token order: refused."""
    a = bind_args("adaptive_avg_pool1d", ("input", "output_size"), {}, args, kwargs)
    x, o = a["input"], a["output_size"]
    o = o[0] if isinstance(o, (tuple, list)) and len(o) == 1 else o
    if not isinstance(x, SpatialTensor) or x.dim() not in (2, 3) or x._spec.dims != (x.dim() - 1,):
        raise context.unsupported("adaptive_avg_pool1d", "only an ((N,) C, L) sequence token-sharded on L")
    if o != 1:
        raise context.unsupported("adaptive_avg_pool1d", f"output_size {o} over the tokens bins their raster "
                                  "order across tiles; only output_size 1 (the mean over the tokens) is exact")
    return x.mean(dim=-1, keepdim=True)
