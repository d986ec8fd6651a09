"""Sliding-window ops: conv2d, max/avg pooling, transposed conv, pad.

Per axis, with kernel extent ``ke = d (k - 1) + 1``, stride ``s`` and padding
``p`` before: global output ``o`` reads inputs ``[o s - p, o s - p + ke)``.
Output ownership follows the window centre: the rank whose input tile holds
input ``o s - p + (ke - 1) // 2`` owns output ``o``. So a "same" conv keeps the
partition, a stride-s layer divides it by s, and a pad followed by a valid conv
gives the same partition as the padded conv (a residual add lines up).

Each rank fetches exactly its window ``[o0 s - p, (o1 - 1) s - p + ke)`` through
the halo exchange, pads only where that window leaves the *scene*, and runs the
op locally with zero padding. Local output count is then exactly ``o1 - o0``.

Convs whose window starts at most ``p`` before the tile and ends at most ``p``
after it (every "same" conv and the usual strided ones) run on the tile with
torch's own zero padding ``p`` and recompute only the output strips that read
a neighbour's halo (:class:`_BorderConv2d`): no window-size copy, and the
tile's backward is torch's fused one. Other convs run on the assembled window
(:class:`_HaloConv2d`).

Memory: the window (tile + halos + scene padding) is a transient. Convs keep
the tile and the received halos for backward (and rebuild the window there
when they need it); pooling keeps what torch keeps (max: the argmax indices;
average: nothing).
With one rank (sp = 1) the tile is the scene and torch's own op runs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import context
from ..errors import SPIMError
from ..halo import assemble, fetch, halo_exchange, make_plan, return_grads, start_exchange, start_fetch
from ..tensor import SpatialTensor, Spec, register, wrap
from ..tiling import Partition


def _pair(v, name="") -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(a) for a in v)
    if len(v) == 1:
        return v[0], v[0]
    return v


def output_partition(part: Partition, n_out: int, ke: int, s: int, p: int, op: str, axis: str) -> Partition:
    c = (ke - 1) // 2
    bounds = [0] + [min(max(math.ceil((b + p - c) / s), 0), n_out) for b in part[1:-1]] + [n_out]
    for i in range(len(bounds) - 1):
        if bounds[i + 1] <= bounds[i]:
            raise SPIMError(
                f"{context.where()}: {op}: the tile in grid {axis} {i} (input {axis}s {part[i]}:{part[i + 1]}) "
                f"owns no output {axis}s (output size {n_out}, stride {s}); tiles are too small for this "
                f"network: use fewer ranks along this axis or a larger scene"
            )
    return tuple(bounds)


def needs(out_part: Partition, ke: int, s: int, p: int) -> tuple[tuple[int, int], ...]:
    return tuple((o0 * s - p, (o1 - 1) * s - p + ke) for o0, o1 in zip(out_part[:-1], out_part[1:]))


def conv_out(n: int, ke: int, s: int, p_total: int) -> int:
    return (n + p_total - ke) // s + 1


def pool_out(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    ke = d * (k - 1) + 1
    num = n + 2 * p - ke + ((s - 1) if ceil_mode else 0)
    out = num // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def _check_nchw(x: SpatialTensor, op: str) -> None:
    if x._spec.dims != (x.dim() - 2, x.dim() - 1):
        raise context.unsupported(op, f"sharded dims {x._spec.dims} are not the last two (NCHW layout expected)")


def check_pool_padding(k, p, op: str) -> None:
    """torch's own rule, checked up front so the sharded op refuses what torch refuses."""
    if any(p[i] > k[i] // 2 for i in range(2)):
        raise SPIMError(f"{context.where()}: {op}: padding {p} must be at most half of the kernel size {k}")


def window_plan(x: SpatialTensor, op: str, ke, s, p, n_out):
    """Output partition, this rank's exchange plan and scene-border pads (l, r, t, b)."""
    _check_nchw(x, op)
    spec = x._spec
    outs = [output_partition(part, n_out[a], ke[a], s[a], p[a], op, ("row", "col")[a])
            for a, part in enumerate((spec.rows, spec.cols))]
    need_r, need_c = needs(outs[0], ke[0], s[0], p[0]), needs(outs[1], ke[1], s[1], p[1])
    plan = make_plan(spec.mesh, spec.rows, spec.cols, need_r, need_c, op)
    r, c = spec.mesh.coord
    (lo_r, hi_r), (lo_c, hi_c) = need_r[r], need_c[c]
    H, W = spec.global_hw
    pads = (max(0, -lo_c), max(0, hi_c - W), max(0, -lo_r), max(0, hi_r - H))
    out_spec = Spec(spec.mesh, spec.dims, outs[0], outs[1])
    ranges = ((outs[0][r], outs[0][r + 1]), (outs[1][c], outs[1][c + 1]))
    return plan, pads, out_spec, ranges


def windowed(x: SpatialTensor, op: str, ke, s, p, n_out, pad_mode="constant", pad_value=0.0):
    """Fetch each rank's input window and pad at the scene border.

    Returns (extended local input, output Spec, per-axis (o0, o1))."""
    plan, pads, out_spec, ranges = window_plan(x, op, ke, s, p, n_out)
    spec = x._spec
    ext = halo_exchange(x._local, spec.mesh, spec.rows, spec.cols,
                        needs(out_spec.rows, ke[0], s[0], p[0]), needs(out_spec.cols, ke[1], s[1], p[1]),
                        spec.dims, op)
    if any(pads):
        if pad_mode == "constant":
            ext = F.pad(ext, pads, value=pad_value)
        else:
            for side, n_have in ((pads[:2], ext.shape[-1]), (pads[2:], ext.shape[-2])):
                if max(side) >= n_have and pad_mode == "reflect":
                    raise SPIMError(f"{context.where()}: {op}: reflect padding of {max(side)} needs a tile larger than that")
            ext = F.pad(ext, pads, mode=pad_mode)
    return ext, out_spec, ranges


def _rebuild(x: torch.Tensor, halos, plan, dims, pads) -> torch.Tensor:
    """The padded window again, from the saved tile and received halos."""
    pieces = {(rr, cc): h for (_, rr, cc), h in zip(plan.recv, halos)}
    if plan.own is not None:
        pieces[plan.own] = _slice_own(x, plan, dims)
    return assemble(pieces, dims, pads)


def _slice_own(x: torch.Tensor, plan, dims) -> torch.Tensor:
    (r0, r1), (c0, c1) = plan.own
    return x.narrow(dims[0], r0 - plan.origin[0], r1 - r0).narrow(dims[1], c0 - plan.origin[1], c1 - c0)


def _window_grad(gi: torch.Tensor, mesh, plan, dims, pads, x_shape) -> torch.Tensor:
    """Tile gradient from the gradient ``gi`` of the padded window (a buffer of ours)."""
    l, r, t, b = pads
    gi = gi.narrow(dims[0], t, gi.shape[dims[0]] - t - b).narrow(dims[1], l, gi.shape[dims[1]] - l - r)
    return return_grads(gi, mesh, plan, dims, x_shape, reuse=True)


class _HaloConv2d(torch.autograd.Function):
    """conv2d over the halo-extended tile that does not keep the extended copy:
    it saves the tile (usually alive anyway as the previous op's output) and the
    small received halos, and rebuilds the window in backward. The backward
    computes the weight gradient from the rebuilt window, frees it, and only
    then the window gradient (a transposed conv of the output gradient), which
    becomes the tile gradient in place. Peak memory per rank then stays that of
    a plain conv on the tile."""

    @staticmethod
    def forward(ctx, x, weight, bias, mesh, plan, pads, stride, dilation, groups):
        dims = (x.dim() - 2, x.dim() - 1)
        pieces = fetch(x, mesh, plan, dims)
        out = F.conv2d(assemble(pieces, dims, pads), weight, bias, stride, 0, dilation, groups)
        halos = [pieces[(rr, cc)] for _, rr, cc in plan.recv]
        ctx.save_for_backward(x, weight, *halos)
        ctx.cfg = (mesh, plan, pads, stride, dilation, groups, bias is not None, dims)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, *halos = ctx.saved_tensors
        mesh, plan, pads, stride, dilation, groups, has_bias, dims = ctx.cfg
        need_x, need_w = ctx.needs_input_grad[:2]
        need_b = has_bias and ctx.needs_input_grad[2]
        g = g.contiguous()
        gw = gb = gx = None
        if need_w or need_b:
            ext = _rebuild(x, halos, plan, dims, pads)
            _, gw, gb = torch.ops.aten.convolution_backward(
                g, ext, weight, [weight.shape[0]] if has_bias else None, list(stride), [0, 0], list(dilation),
                False, [0, 0], groups, [False, need_w, need_b])
            del ext
        if need_x:
            # the window is exactly (o - 1) s + d (k - 1) + 1 long per axis: no output padding
            gi = F.conv_transpose2d(g, weight, None, stride, 0, 0, groups, dilation)
            gx = _window_grad(gi, mesh, plan, dims, pads, x.shape)
        return gx, gw, gb, None, None, None, None, None, None


def _region(pieces: dict, dims, rows: tuple[int, int], cols: tuple[int, int], skip=None) -> torch.Tensor:
    """Global rows x cols of the window from its pieces ({(rows, cols): tensor});
    zeros where no piece lies (the scene border) and for the piece keyed ``skip``."""
    ref = next(iter(pieces.values()))
    shape = list(ref.shape)
    shape[dims[0]], shape[dims[1]] = rows[1] - rows[0], cols[1] - cols[0]
    out = ref.new_zeros(shape)
    for key, t in pieces.items():
        (r0, r1), (c0, c1) = key
        a, b = max(rows[0], r0), min(rows[1], r1)
        c, e = max(cols[0], c0), min(cols[1], c1)
        if key == skip or a >= b or c >= e:
            continue
        out.narrow(dims[0], a - rows[0], b - a).narrow(dims[1], c - cols[0], e - c).copy_(
            t.narrow(dims[0], a - r0, b - a).narrow(dims[1], c - c0, e - c))
    return out


class _BorderGeometry:
    """Where a conv over the zero-padded tile (torch's own padding) differs from
    the conv over the halo-extended window: the output strips whose inputs reach
    into a neighbour's halo. Per axis: window start ``lo``, stride, kernel
    extent, output count ``n``; ``first``/``last`` = output indices [0, first)
    and [last, n) read the halo before / after the tile (empty without a
    neighbour on that side). Strips: the top and bottom ones span all columns,
    the left and right ones the rows in between, so each output is in at most one."""

    def __init__(self, plan, x_shape, dims, lo, s, ke, n, pad):
        self.lo, self.s, self.ke, self.n, self.pad = lo, s, ke, n, pad
        t0 = plan.origin
        t1 = (t0[0] + x_shape[dims[0]], t0[1] + x_shape[dims[1]])
        before = [any(rc[a][0] < t0[a] for _, *rc in plan.recv) for a in (0, 1)]
        after = [any(rc[a][1] > t1[a] for _, *rc in plan.recv) for a in (0, 1)]
        self.first = [min(n[a], -(-(t0[a] - lo[a]) // s[a])) if before[a] else 0 for a in (0, 1)]
        self.last = [max(self.first[a], (t1[a] - lo[a] - ke[a]) // s[a] + 1) if after[a] else n[a] for a in (0, 1)]

    def strips(self):
        """(output rows, output cols) of each strip, as [start, end) pairs."""
        (nr, nc), (fr, fc), (lr, lc) = self.n, self.first, self.last
        out = [((0, fr), (0, nc)), ((lr, nr), (0, nc)), ((fr, lr), (0, fc)), ((fr, lr), (lc, nc))]
        return [(r, c) for r, c in out if r[1] > r[0] and c[1] > c[0]]

    def inputs(self, out_rows, out_cols):
        """Global input rows and cols that outputs [rows) x [cols) read."""
        return tuple((self.lo[a] + o[0] * self.s[a], self.lo[a] + (o[1] - 1) * self.s[a] + self.ke[a])
                     for a, o in enumerate((out_rows, out_cols)))


class _BorderConv2d(torch.autograd.Function):
    """conv2d of a tile with torch's own zero padding, then the border strips
    that read neighbours' halos recomputed from small windows. Used where the
    padded tile's outputs line up with the tile's share of the global output
    (see :func:`_border_geometry`): no window-size copy in forward or
    backward, and one fused native backward for the tile. Saves the tile and
    the received halos, like :class:`_HaloConv2d`.

    Backward: the native backward of the padded-tile conv gives the tile
    gradient, the bias gradient and the weight gradient with zeros in place of
    the halos; per strip, one backward over its window with the tile zeroed
    adds the halos' share of the weight gradient and gives the halos'
    gradients, which go back to their owners."""

    @staticmethod
    def forward(ctx, x, weight, bias, mesh, plan, geo, stride, dilation, groups):
        dims = (x.dim() - 2, x.dim() - 1)
        pieces, wait = start_fetch(x, mesh, plan, dims)
        out = F.conv2d(x, weight, bias, stride, geo.pad, dilation, groups)  # overlaps the halo transfer
        wait()
        for orows, ocols in geo.strips():
            region = _region(pieces, dims, *geo.inputs(orows, ocols))
            out.narrow(dims[0], orows[0], orows[1] - orows[0]).narrow(dims[1], ocols[0], ocols[1] - ocols[0]).copy_(
                F.conv2d(region, weight, bias, stride, 0, dilation, groups))
        halos = [pieces[(rr, cc)] for _, rr, cc in plan.recv]
        ctx.save_for_backward(x, weight, *halos)
        ctx.cfg = (mesh, plan, geo, stride, dilation, groups, bias is not None, dims)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, *halos = ctx.saved_tensors
        mesh, plan, geo, stride, dilation, groups, has_bias, dims = ctx.cfg
        need_x, need_w = ctx.needs_input_grad[:2]
        need_b = has_bias and ctx.needs_input_grad[2]
        g = g.contiguous()
        own = ((plan.origin[0], plan.origin[0] + x.shape[dims[0]]), (plan.origin[1], plan.origin[1] + x.shape[dims[1]]))
        pieces = {(rr, cc): h for (_, rr, cc), h in zip(plan.recv, halos)}
        pieces[own] = x
        halo_grads = {(rr, cc): torch.zeros_like(h) for (_, rr, cc), h in zip(plan.recv, halos)} if need_x else {}
        gw_strips = []
        for orows, ocols in geo.strips():
            if not (need_x or need_w):
                break
            rows, cols = geo.inputs(orows, ocols)
            gs = g.narrow(dims[0], orows[0], orows[1] - orows[0]).narrow(dims[1], ocols[0], ocols[1] - ocols[0])
            # the window with the tile zeroed: the weight gradient the padded-tile conv missed
            halo_only = _region(pieces, dims, rows, cols, skip=own)
            gi, gw_strip, _ = torch.ops.aten.convolution_backward(
                gs.contiguous(), halo_only, weight, None, list(stride), [0, 0], list(dilation), False, [0, 0],
                groups, [need_x, need_w, False])
            del halo_only
            if need_w:
                gw_strips.append(gw_strip)
            for (r0, r1), (c0, c1) in halo_grads:
                a, b, c, e = max(rows[0], r0), min(rows[1], r1), max(cols[0], c0), min(cols[1], c1)
                if a < b and c < e:
                    halo_grads[((r0, r1), (c0, c1))].narrow(dims[0], a - r0, b - a).narrow(dims[1], c - c0, e - c).add_(
                        gi.narrow(dims[0], a - rows[0], b - a).narrow(dims[1], c - cols[0], e - c))
        recvs, wait = [], None
        if need_x:  # the halos' gradients travel while the tile's backward runs
            for dst, rr, cc in plan.send:
                shape = list(x.shape)
                shape[dims[0]], shape[dims[1]] = rr[1] - rr[0], cc[1] - cc[0]
                recvs.append((dst, x.new_empty(shape), rr, cc))
            wait = start_exchange([(src, halo_grads[(rr, cc)]) for src, rr, cc in plan.recv],
                                  [(r, b) for r, b, _, _ in recvs], mesh, "backward")
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, weight, [weight.shape[0]] if has_bias else None, list(stride), list(geo.pad), list(dilation),
            False, [0, 0], groups, [need_x, need_w, need_b])
        for gw_strip in gw_strips:
            gw.add_(gw_strip)
        if need_x:
            wait()
            for _, buf, rr, cc in recvs:
                gx.narrow(dims[0], rr[0] - plan.origin[0], rr[1] - rr[0]).narrow(
                    dims[1], cc[0] - plan.origin[1], cc[1] - cc[0]).add_(buf)
        return gx, gw, gb, None, None, None, None, None, None


def _border_geometry(plan, x_shape, dims, need, out_ranges, ke, s):
    """A :class:`_BorderGeometry` when the conv can run as :class:`_BorderConv2d`:
    per axis the window starts at or before the tile (``pad = tile start - window
    start`` >= 0), reaches at most ``pad`` beyond its end, and the padded tile
    has exactly this rank's outputs. Else None."""
    pad, lo, n = [], [], []
    for a in (0, 1):
        t0, h = plan.origin[a], x_shape[dims[a]]
        w0, w1 = need[a]
        n_out = out_ranges[a][1] - out_ranges[a][0]
        p = t0 - w0
        if p < 0 or w1 - (t0 + h) > p or (h + 2 * p - ke[a]) // s[a] + 1 != n_out:
            return None
        pad.append(p)
        lo.append(w0)
        n.append(n_out)
    return _BorderGeometry(plan, x_shape, dims, tuple(lo), tuple(s), tuple(ke), tuple(n), tuple(pad))


class _HaloMaxPool2d(torch.autograd.Function):
    """max_pool2d over the halo-extended tile (-inf at the scene border) that
    saves only the argmax indices, as torch does, and neither the window nor
    the tile: the backward scatters the output gradient into a window-size
    buffer, which becomes the tile gradient in place."""

    @staticmethod
    def forward(ctx, x, mesh, plan, pads, kernel, stride, dilation):
        dims = (x.dim() - 2, x.dim() - 1)
        ext = assemble(fetch(x, mesh, plan, dims), dims, pads, float("-inf"))
        out, idx = torch.ops.aten.max_pool2d_with_indices(ext, list(kernel), list(stride), [0, 0], list(dilation),
                                                          False)
        ctx.save_for_backward(idx)
        ctx.cfg = (mesh, plan, pads, dims, tuple(ext.shape), x.shape)
        return out

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        mesh, plan, pads, dims, ext_shape, x_shape = ctx.cfg
        # indices are flat positions in each (N, C) plane of the window
        gi = g.new_zeros(ext_shape)
        gi.flatten(-2).scatter_add_(-1, idx.flatten(-2), g.reshape(idx.shape).flatten(-2))
        return _window_grad(gi, mesh, plan, dims, pads, x_shape), None, None, None, None, None, None


class _HaloSumPool2d(torch.autograd.Function):
    """Window sums (avg_pool2d with divisor 1) over the halo-extended tile (zeros
    at the scene border); saves nothing: the backward spreads each output
    gradient over its window (a transposed depthwise conv with a ones kernel)."""

    @staticmethod
    def forward(ctx, x, mesh, plan, pads, kernel, stride):
        dims = (x.dim() - 2, x.dim() - 1)
        ext = assemble(fetch(x, mesh, plan, dims), dims, pads)
        out = F.avg_pool2d(ext, kernel, stride, 0, False, True, 1)
        ctx.cfg = (mesh, plan, pads, dims, x.shape, kernel, stride)
        return out

    @staticmethod
    def backward(ctx, g):
        mesh, plan, pads, dims, x_shape, kernel, stride = ctx.cfg
        c = g.shape[-3]
        ones = g.new_ones((c, 1) + tuple(kernel))
        # the window is exactly (o - 1) s + k long per axis: no output padding
        gi = F.conv_transpose2d(g, ones, None, stride, 0, 0, c, 1)
        return _window_grad(gi, mesh, plan, dims, pads, x_shape), None, None, None, None, None


@register(F.conv2d)
def _conv2d(func, args, kwargs):
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    a = dict(zip(names, args))
    a.update(kwargs)
    x, weight = a["input"], a["weight"]
    if not isinstance(x, SpatialTensor) or isinstance(weight, SpatialTensor):
        raise context.unsupported("conv2d", "a sharded weight")
    s, d = _pair(a.get("stride", 1)), _pair(a.get("dilation", 1))
    k = tuple(weight.shape[-2:])
    ke = tuple(d[i] * (k[i] - 1) + 1 for i in range(2))
    padding = a.get("padding", 0)
    if padding == "valid":
        pb, pt = (0, 0), (0, 0)
    elif padding == "same":
        if s != (1, 1):
            raise context.unsupported("conv2d", "padding='same' with stride > 1")
        pb = tuple((ke[i] - 1) // 2 for i in range(2))
        pt = tuple(ke[i] - 1 for i in range(2))
    else:
        pb = _pair(padding)
        pt = (2 * pb[0], 2 * pb[1])
    H, W = x._spec.global_hw
    n_out = (conv_out(H, ke[0], s[0], pt[0]), conv_out(W, ke[1], s[1], pt[1]))
    if min(n_out) < 1:
        raise SPIMError(f"{context.where()}: conv2d: the kernel is larger than the padded scene {H}x{W}")
    plan, pads, spec, ranges = window_plan(x, "conv2d", ke, s, pb, n_out)
    if isinstance(a.get("bias"), SpatialTensor):
        ext, spec, _ = windowed(x, "conv2d", ke, s, pb, n_out)
        return wrap(F.conv2d(ext, weight, a.get("bias"), s, 0, d, a.get("groups", 1)), spec)
    if x.mesh.sp == 1:  # the tile is the scene: torch's own conv, its padding included
        return wrap(F.conv2d(x._local, weight, a.get("bias"), s, padding, d, a.get("groups", 1)), spec)
    r, c = x.mesh.coord
    need = (needs(spec.rows, ke[0], s[0], pb[0])[r], needs(spec.cols, ke[1], s[1], pb[1])[c])
    geo = _border_geometry(plan, x._local.shape, (x.dim() - 2, x.dim() - 1), need, ranges, ke, s)
    if geo is not None:
        out = _BorderConv2d.apply(x._local, weight, a.get("bias"), x.mesh, plan, geo, s, d, a.get("groups", 1))
    else:
        out = _HaloConv2d.apply(x._local, weight, a.get("bias"), x.mesh, plan, pads, s, d, a.get("groups", 1))
    return wrap(out, spec)


@register(F.max_pool2d, torch.max_pool2d, getattr(F, "max_pool2d_with_indices", None))
def _max_pool2d(func, args, kwargs):
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    a = dict(zip(names, args))
    a.update(kwargs)
    if a.get("return_indices") or func is getattr(F, "max_pool2d_with_indices", None):
        raise context.unsupported("max_pool2d", "return_indices=True (indices would be tile-local)")
    x = a["input"]
    k = _pair(a["kernel_size"])
    s = _pair(a.get("stride") or k)
    p, d = _pair(a.get("padding", 0)), _pair(a.get("dilation", 1))
    ceil = bool(a.get("ceil_mode", False))
    check_pool_padding(k, p, "max_pool2d")
    H, W = x._spec.global_hw
    n_out = (pool_out(H, k[0], s[0], p[0], d[0], ceil), pool_out(W, k[1], s[1], p[1], d[1], ceil))
    ke = tuple(d[i] * (k[i] - 1) + 1 for i in range(2))
    plan, pads, spec, _ = window_plan(x, "max_pool2d", ke, s, p, n_out)
    if x.mesh.sp == 1:  # the tile is the scene: torch's own pooling
        return wrap(F.max_pool2d(x._local, k, s, p, d, ceil), spec)
    return wrap(_HaloMaxPool2d.apply(x._local, x.mesh, plan, pads, k, s, d), spec)


def _avg_divisor(o0, o1, n, k, s, p, include_pad, device, dtype):
    o = torch.arange(o0, o1, device=device, dtype=torch.float64)
    start = o * s - p
    end = torch.clamp(start + k, max=n + p)
    if include_pad:
        cnt = end - start
    else:
        cnt = torch.clamp(end, max=n) - torch.clamp(start, min=0)
    return cnt.to(dtype)


@register(F.avg_pool2d, torch._C._nn.avg_pool2d)
def _avg_pool2d(func, args, kwargs):
    names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    a = dict(zip(names, args))
    a.update(kwargs)
    x = a["input"]
    k = _pair(a["kernel_size"])
    s = _pair(a.get("stride") or k)
    p = _pair(a.get("padding", 0))
    ceil = bool(a.get("ceil_mode", False))
    include_pad = a.get("count_include_pad", True)
    check_pool_padding(k, p, "avg_pool2d")
    H, W = x._spec.global_hw
    n_out = (pool_out(H, k[0], s[0], p[0], 1, ceil), pool_out(W, k[1], s[1], p[1], 1, ceil))
    plan, pads, spec, ((r0, r1), (c0, c1)) = window_plan(x, "avg_pool2d", k, s, p, n_out)
    loc = x._local
    if x.mesh.sp == 1:  # the tile is the scene: torch's own pooling
        return wrap(F.avg_pool2d(loc, k, s, p, ceil, include_pad, a.get("divisor_override")), spec)
    # window sums, then torch's divisor for each global output position
    total = _HaloSumPool2d.apply(loc, x.mesh, plan, pads, k, s)
    if a.get("divisor_override"):
        return wrap(total / a["divisor_override"], spec)
    dh = _avg_divisor(r0, r1, H, k[0], s[0], p[0], include_pad, loc.device, loc.dtype)
    dw = _avg_divisor(c0, c1, W, k[1], s[1], p[1], include_pad, loc.device, loc.dtype)
    return wrap(total / (dh[:, None] * dw[None, :]), spec)


@register(F.conv_transpose2d)
def _conv_transpose2d(func, args, kwargs):
    names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
    a = dict(zip(names, args))
    a.update(kwargs)
    x, w = a["input"], a["weight"]
    k = tuple(w.shape[-2:])
    s = _pair(a.get("stride", 1))
    if (s != k or _pair(a.get("padding", 0)) != (0, 0) or _pair(a.get("output_padding", 0)) != (0, 0)
            or _pair(a.get("dilation", 1)) != (1, 1)):
        raise context.unsupported(
            "conv_transpose2d", f"only stride == kernel, padding 0, output_padding 0, dilation 1 is exact "
            f"without overlap (got kernel {k}, stride {s})"
        )
    _check_nchw(x, "conv_transpose2d")
    out = F.conv_transpose2d(x._local, w, a.get("bias"), s, 0, 0, a.get("groups", 1), 1)
    spec = x._spec
    return wrap(out, Spec(spec.mesh, spec.dims, tuple(b * s[0] for b in spec.rows), tuple(b * s[1] for b in spec.cols)))


@register(F.pad, torch._C._nn.pad if hasattr(torch._C._nn, "pad") else None)
def _pad(func, args, kwargs):
    names = ("input", "pad", "mode", "value")
    a = dict(zip(names, args))
    a.update(kwargs)
    x, pad = a["input"], list(a["pad"])
    mode = a.get("mode", "constant") or "constant"
    value = a.get("value", None)
    if mode == "circular":
        raise context.unsupported("pad", "mode 'circular' (the scene does not wrap around)")
    spec = x._spec
    nd = x.dim()
    # pad lists pairs from the last dim backwards
    per_dim = {nd - 1 - i: (pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)}
    if any(v < 0 for pr in per_dim.values() for v in pr):
        raise context.unsupported("pad", "negative padding (cropping) of a sharded tensor")
    r, c = spec.mesh.coord
    ph, pw = spec.mesh.grid
    local_pad = []
    for i in range(len(pad) // 2):
        dim = nd - 1 - i
        before, after = per_dim[dim]
        if dim == spec.dims[0]:
            before, after = (before if r == 0 else 0), (after if r == ph - 1 else 0)
        elif dim == spec.dims[1]:
            before, after = (before if c == 0 else 0), (after if c == pw - 1 else 0)
        elif mode != "constant":
            raise context.unsupported("pad", f"mode '{mode}' on a non-sharded dim")
        local_pad += [before, after]

    def shifted(part, before, after):
        return (0,) + tuple(b + before for b in part[1:-1]) + (part[-1] + before + after,)

    rows = shifted(spec.rows, *per_dim.get(spec.dims[0], (0, 0)))
    cols = shifted(spec.cols, *per_dim.get(spec.dims[1], (0, 0)))
    loc = x._local
    if mode == "reflect" and any(local_pad):
        for dim, (b, e) in ((spec.dims[0], local_pad[2 * (nd - 1 - spec.dims[0]):][:2]),
                            (spec.dims[1], local_pad[2 * (nd - 1 - spec.dims[1]):][:2])):
            if max(b, e) >= loc.shape[dim]:
                raise SPIMError(f"{context.where()}: pad: reflect padding of {max(b, e)} needs a tile larger than that")
    out = F.pad(loc, local_pad, mode=mode, value=value) if mode == "constant" else F.pad(loc, local_pad, mode=mode)
    return wrap(out, Spec(spec.mesh, spec.dims, rows, cols))
