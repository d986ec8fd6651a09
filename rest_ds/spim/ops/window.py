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

The fast paths above stay behind a switch: with ``REST_DS_SPIM_REFERENCE=1``
(:func:`rest_ds.spim.set_reference_paths`) every window op takes its
reference path instead: the window through one all-to-all (the far plan),
torch's own op on it without padding and torch's autograd through both.
The geometry (partitions, windows, strips) is :mod:`rest_ds.spim.geometry`.

Memory: the window (tile + halos + scene padding) is a transient. Convs keep
the tile and the received halos for backward (and rebuild the window there
when they need it); pooling keeps what torch keeps (max: the argmax indices;
average: nothing).
With one rank (sp = 1) the tile is the scene and torch's own op runs.
"""
from __future__ import annotations

import functools
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import context
from ..errors import SPIMError
from ..halo import (WindowGrads, assemble, box_view, dense_grad, fetch, halo_exchange, make_plan, reference_paths,
                    return_grads, start_fetch, window_part)
from .. import geometry
# the window arithmetic is geometry.py's; conv_out, needs, pool_out stay importable from here
from ..geometry import Partition, axis_term, conv_out, halo_strips, needs, padded_fit, pool_out  # noqa: F401
from ..tensor import SpatialTensor, Spec, register, wrap


def _pair(v, name="") -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(a) for a in v)
    if len(v) == 1:
        return v[0], v[0]
    return v


def output_partition(part: Partition, n_out: int, ke: int, s: int, p: int, op: str, axis: str) -> Partition:
    """:func:`geometry.output_partition`, its error naming the module."""
    return geometry.output_partition(part, n_out, ke, s, p, op, axis, context.where())


def _check_nchw(x: SpatialTensor, op: str) -> None:
    _check_nchw_dims(x._spec, x.dim(), op)


def _check_nchw_dims(spec: Spec, ndim: int, op: str) -> None:
    if spec.dims != (ndim - 2, ndim - 1):
        raise context.unsupported(op, f"sharded dims {spec.dims} are not the last two (NCHW layout expected)")


def per_sample(x: SpatialTensor) -> bool:
    """An (N, C, h, w) tensor sharded on N only: windows or patches moved into the batch
    dim, each sample whole on its rank (TNT's inner pixels, EfficientViT-M's and SAM 2's
    window attention). A window op over (h, w) then runs per sample, locally."""
    return x._spec.is_tokens and x.dim() == 4 and x._spec.dims == (0,)


def check_pool_padding(k, p, op: str) -> None:
    """torch's own rule, checked up front so the sharded op refuses what torch refuses."""
    if any(p[i] > k[i] // 2 for i in range(2)):
        raise SPIMError(f"{context.where()}: {op}: padding {p} must be at most half of the kernel size {k}")


def window_plan(x: SpatialTensor, op: str, ke, s, p, n_out):
    """Output partition, this rank's exchange plan and scene-border pads (l, r, t, b)."""
    _check_nchw(x, op)
    return _window_plan(x._spec, id(x._spec.mesh), op, tuple(ke), tuple(s), tuple(p), tuple(n_out))


# A pure function of its arguments (Spec and the results are immutable; plans are shared
# already, halo.make_plan), asked for by every conv and pool of every step with the same
# few arguments. A call that raises is not cached (lru_cache), so errors come as before,
# naming the module where they happen. ``mesh_id``: the output Spec holds the mesh object
# itself, and equal meshes (equal fields) may hold different process groups; the entry
# keeps its mesh alive, so the id cannot be reused while it is cached.
@functools.lru_cache(maxsize=1024)
def _window_plan(spec: Spec, mesh_id: int, op: str, ke, s, p, n_out):
    outs = [output_partition(part, n_out[a], ke[a], s[a], p[a], op, ("row", "col")[a])
            for a, part in enumerate((spec.rows, spec.cols))]
    need_r, need_c = needs(outs[0], ke[0], s[0], p[0]), needs(outs[1], ke[1], s[1], p[1])
    plan = make_plan(spec.mesh, spec.rows, spec.cols, need_r, need_c, op)
    r, c = spec.mesh.coord
    H, W = spec.global_hw
    pads = geometry.scene_pads(need_c[c], W) + geometry.scene_pads(need_r[r], H)  # (left, right, top, bottom)
    out_spec = Spec(spec.mesh, spec.dims, outs[0], outs[1])
    ranges = ((outs[0][r], outs[0][r + 1]), (outs[1][c], outs[1][c + 1]))
    return plan, pads, out_spec, ranges


def windowed(x: SpatialTensor, op: str, ke, s, p, n_out, pad_mode="constant", pad_value=0.0, far: bool = False):
    """Fetch each rank's input window and pad at the scene border (``far``:
    through one all-to-all, on every rank alike: the reference path).

    Returns (extended local input, output Spec, per-axis (o0, o1))."""
    plan, pads, out_spec, ranges = window_plan(x, op, ke, s, p, n_out)
    spec = x._spec
    ext = halo_exchange(x._local, spec.mesh, spec.rows, spec.cols,
                        needs(out_spec.rows, ke[0], s[0], p[0]), needs(out_spec.cols, ke[1], s[1], p[1]),
                        spec.dims, op, far)
    if any(pads):
        if pad_mode == "constant":
            ext = F.pad(ext, pads, value=pad_value)
        else:
            for side, n_have in ((pads[:2], ext.shape[-1]), (pads[2:], ext.shape[-2])):
                if max(side) >= n_have and pad_mode == "reflect":
                    raise SPIMError(f"{context.where()}: {op}: reflect padding of {max(side)} needs a tile larger than that")
            ext = F.pad(ext, pads, mode=pad_mode)
    return ext, out_spec, ranges


def tile_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of a tile ``x`` (channels-last when it is laid out so and
    not also NCHW-contiguous, the test torch's layout-dependent kernels and
    :class:`~rest_ds.spim.ops.norm._GroupNormScene` use), for the windows
    assembled from it. torch's conv and pooling keep their input's layout, so
    an op over a window in this format returns what the op on the tile itself
    returns (the padded-tile paths, one process). A window op must do so on
    every path: the path is chosen per rank (the tile's position decides), and
    an op after it may choose its own collective by layout (group norm gathers
    per-group moments of an NCHW tile, per-channel ones of a channels-last
    tile): ranks that disagree mix unlike buffers, silently."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _rebuild(x: torch.Tensor, halos, plan, dims, pads) -> torch.Tensor:
    """The padded window again, from the saved tile and received halos."""
    pieces = {(rr, cc): h for (_, rr, cc), h in zip(plan.recv, halos)}
    if plan.own is not None:
        pieces[plan.own] = _slice_own(x, plan, dims)
    return assemble(pieces, dims, pads, memory_format=tile_format(x))


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
    a plain conv on the tile. The window has the tile's memory format, so the
    output has the layout of the padded-tile path and of one process
    (:func:`tile_format`; an NCHW window gave an NCHW output for a
    channels-last tile, and a group norm after a conv that took this path on
    some ranks only mixed unlike statistics)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mesh, plan, pads, stride, dilation, groups):
        dims = (x.dim() - 2, x.dim() - 1)
        pieces = fetch(x, mesh, plan, dims)
        out = F.conv2d(assemble(pieces, dims, pads, memory_format=tile_format(x)), weight, bias, stride, 0, dilation,
                       groups)
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
        g = dense_grad(g, x)
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


class _PieceTerm(NamedTuple):
    """What one received halo piece adds to the padded-tile conv: ``key`` is the
    piece's global (rows, cols); the outputs ``out`` (local [start, end) per
    axis) read it through the kernel taps ``taps`` ([start, end) per axis);
    ``pads`` (left, right, top, bottom; negative crops) turn the piece into the
    input region those taps read, zeros elsewhere."""
    key: tuple
    out: tuple
    taps: tuple
    pads: tuple


class _BorderGeometry:
    """How a conv over the halo-extended window differs from the conv over the
    tile with torch's own zero padding ``pad``. Per axis: window start ``lo``
    (global input read by local output 0, tap 0), stride ``s``, kernel size
    ``k``, dilation ``d`` (extent ``ke``), local output count ``n``.

    ``strips``: the outputs that read a neighbour's halo (see
    :func:`_halo_strips`), which the forward recomputes over their windows.
    ``terms``: for the backward, one :class:`_PieceTerm` per received piece;
    the conv is linear in its input and the window is the padded tile plus
    each piece alone (zeros elsewhere), so a piece's share of the gradients
    needs only the outputs that read it and the kernel taps that reach it
    (one kernel column for the side piece of a 3x3 conv)."""

    def __init__(self, plan, x_shape, dims, lo, s, k, d, ke, n, pad):
        self.pad = pad
        self.strips = _halo_strips(plan, x_shape, dims, lo, s, ke, n)
        self.terms = []
        for _, rr, cc in plan.recv:
            axes = [axis_term(*r, lo[a], s[a], k[a], d[a], n[a]) for a, r in enumerate((rr, cc))]
            if None not in axes:
                (orow, trow, prow), (ocol, tcol, pcol) = axes
                self.terms.append(_PieceTerm((rr, cc), (orow, ocol), (trow, tcol), pcol + prow))


def _taps(weight: torch.Tensor, taps) -> torch.Tensor:
    (r0, r1), (c0, c1) = taps
    return weight[..., r0:r1, c0:c1]


def _thin_axis(region: torch.Tensor, w: torch.Tensor) -> int | None:
    """The axis (0 rows, 1 cols) along which a piece's region and taps are one
    element (so its term has one output there), or None."""
    for a in (0, 1):
        if region.shape[2 + a] == 1 and w.shape[2 + a] == 1:
            return a
    return None


def _term_conv_backward(g, region, w, stride, dilation, groups, mask):
    """(region gradient, taps' weight gradient) of a piece's term, the conv of
    its ``region`` by its taps ``w``; ``g`` is the gradient of the term's
    outputs, ``mask`` says which of the two to compute. A region one element
    thin (the side piece of a "same" conv) runs as conv1d along its length,
    which oneDNN runs 2-4x faster than the equivalent thin conv2d."""
    a = _thin_axis(region, w)
    if a is None:
        gi, gw, _ = torch.ops.aten.convolution_backward(
            g.contiguous(), region, w, None, list(stride), [0, 0], list(dilation), False, [0, 0], groups, mask + [False])
        return gi, gw
    b = 1 - a
    gi, gw, _ = torch.ops.aten.convolution_backward(
        g.squeeze(2 + a).contiguous(), region.squeeze(2 + a), w.squeeze(2 + a), None, [stride[b]], [0],
        [dilation[b]], False, [0], groups, mask + [False])
    return (None if gi is None else gi.unsqueeze(2 + a)), (None if gw is None else gw.unsqueeze(2 + a))


def _strip_conv(region, weight, bias, stride, dilation, groups) -> torch.Tensor:
    """conv2d of a strip's window (no padding), with torch's own conv: the same
    kernel as the tile's conv and the one-process conv, so each border output
    is summed in the same order and rounds to the same bits as on one device
    (checked bitwise on oneDNN for 1- and 2-output strips, grouped, strided
    and dilated convs). A GEMM over the im2col columns or a conv1d with a
    kernel axis folded into the channels is 1.3-2x faster on these thin
    shapes but sums in another order: a last-bit difference at a tile border
    then flips a max-pool near-tie or a ReLU in fp32 (ViTDet pyramid + UPerNet
    input grad off by 3.6e-2 vs one process), which exactness forbids."""
    return F.conv2d(region, weight, bias, stride, 0, dilation, groups)


class _BorderConv2d(torch.autograd.Function):
    """conv2d of a tile with torch's own zero padding, then the border strips
    that read neighbours' halos recomputed over their windows (each output one
    sum over its whole window, as on one device). Used where the padded tile's
    outputs line up with the tile's share of the global output (see
    :func:`_border_geometry`): no window-size copy in forward or backward, and
    one fused native backward for the tile. Saves the tile and the received
    halos, like :class:`_HaloConv2d`.

    Backward: the native backward of the padded-tile conv gives the tile
    gradient, the bias gradient and the weight gradient with zeros in place of
    the halos; each piece's term (:class:`_BorderGeometry`) adds its taps'
    share of the weight gradient and gives the piece's gradient, which goes
    back to its owner."""

    @staticmethod
    def forward(ctx, x, weight, bias, mesh, plan, geo, stride, dilation, groups):
        dims = (x.dim() - 2, x.dim() - 1)
        pieces, wait = start_fetch(x, mesh, plan, dims)
        out = F.conv2d(x, weight, bias, stride, geo.pad, dilation, groups)  # overlaps the halo transfer
        wait()
        for orows, ocols, irows, icols in geo.strips:
            region = window_part(pieces, dims, irows, icols)
            box_view(out, dims, orows, ocols).copy_(_strip_conv(region, weight, bias, stride, dilation, groups))
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
        g = dense_grad(g, x)
        pieces = {(rr, cc): h for (_, rr, cc), h in zip(plan.recv, halos)}
        grads = WindowGrads(x, x.shape, plan, dims) if need_x else None
        gw_terms = []
        for t in geo.terms if (need_x or need_w) else ():
            gi, gw_t = _term_conv_backward(box_view(g, dims, *t.out), F.pad(pieces[t.key], t.pads),
                                           _taps(weight, t.taps), stride, dilation, groups, [need_x, need_w])
            if need_w:
                gw_terms.append((t.taps, gw_t))
            if need_x:  # the region's gradient, cropped (or zero-extended) back to the piece
                grads.add_piece(t.key, F.pad(gi, tuple(-p for p in t.pads)))
        if need_x:  # the halos' gradients travel while the tile's backward runs
            grads.send(mesh)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, weight, [weight.shape[0]] if has_bias else None, list(stride), list(geo.pad), list(dilation),
            False, [0, 0], groups, [need_x, need_w, need_b])
        for taps, gw_t in gw_terms:
            _taps(gw, taps).add_(gw_t)
        if need_x:
            gx = grads.finish(gx)
        return gx, gw, gb, None, None, None, None, None, None


def _padded_fit(plan, x_shape, dims, need, out_ranges, ke, s):
    """:func:`geometry.padded_fit` of this rank's tile: per axis (pad, window
    start, output count) when the op on the tile with torch's own padding has
    exactly this rank's outputs, else None."""
    return padded_fit(plan.origin, (x_shape[dims[0]], x_shape[dims[1]]), need, out_ranges, ke, s)


@functools.lru_cache(maxsize=1024)  # pure (plans are immutable and cached): the same few convs every step
def _border_geometry(plan, x_shape, dims, need, out_ranges, k, d, ke, s):
    """A :class:`_BorderGeometry` when the conv can run as :class:`_BorderConv2d`
    (see :func:`_padded_fit`), else None. Shared between calls: never modified."""
    fit = _padded_fit(plan, x_shape, dims, need, out_ranges, ke, s)
    if fit is None:
        return None
    pad, lo, n = fit
    return _BorderGeometry(plan, x_shape, dims, lo, tuple(s), tuple(k), tuple(d), tuple(ke), n, pad)


def _halo_strips(plan, x_shape, dims, lo, s, ke, n):
    """:func:`geometry.halo_strips` of this rank's tile and ``plan``'s halo pieces."""
    return halo_strips(plan.origin, (x_shape[dims[0]], x_shape[dims[1]]), [(rr, cc) for _, rr, cc in plan.recv],
                       lo, s, ke, n)


class _BorderMaxPool2d(torch.autograd.Function):
    """max_pool2d of a tile with torch's own padding (-inf), then the output
    strips that read a neighbour's halo recomputed over their whole windows
    (assembled from the tile and the received halos), so that ties resolve in
    the same scan order as on one device. Saves only argmax indices, as torch
    does: the tile's for its outputs, each strip's for its window."""

    @staticmethod
    def forward(ctx, x, mesh, plan, strips, kernel, stride, pad, dilation):
        dims = (x.dim() - 2, x.dim() - 1)
        pieces, wait = start_fetch(x, mesh, plan, dims)
        out, idx = torch.ops.aten.max_pool2d_with_indices(x, list(kernel), list(stride), list(pad), list(dilation),
                                                          False)
        wait()
        strip_idx, shapes = [], []
        for orows, ocols, irows, icols in strips:
            region = window_part(pieces, dims, irows, icols, float("-inf"))
            o, i = torch.ops.aten.max_pool2d_with_indices(region, list(kernel), list(stride), [0, 0], list(dilation),
                                                          False)
            box_view(out, dims, orows, ocols).copy_(o)
            strip_idx.append(i)
            shapes.append(tuple(region.shape))
        ctx.save_for_backward(idx, *strip_idx)
        ctx.cfg = (mesh, plan, strips, shapes, dims, x.shape)
        return out

    @staticmethod
    def backward(ctx, g):
        idx, *strip_idx = ctx.saved_tensors
        mesh, plan, strips, shapes, dims, x_shape = ctx.cfg
        g = g.contiguous()
        # the strips first, so that the halos' gradients travel during the tile's scatter
        grads = WindowGrads(g, x_shape, plan, dims)
        for (orows, ocols, irows, icols), i, shape in zip(strips, strip_idx, shapes):
            rg = g.new_zeros(shape)
            rg.flatten(-2).scatter_add_(-1, i.flatten(-2), box_view(g, dims, orows, ocols).contiguous().flatten(-2))
            grads.add(rg, irows, icols)
        grads.send(mesh)
        g_tile = g.clone()
        for orows, ocols, _, _ in strips:
            box_view(g_tile, dims, orows, ocols).zero_()
        # indices are flat positions in each (N, C) plane of the tile or strip window
        gx = g.new_zeros(x_shape)
        gx.flatten(-2).scatter_add_(-1, idx.flatten(-2), g_tile.flatten(-2))
        del g_tile
        gx = grads.finish(gx)
        return gx, None, None, None, None, None, None, None


class _HaloMaxPool2d(torch.autograd.Function):
    """max_pool2d over the halo-extended tile (-inf at the scene border) that
    saves only the argmax indices, as torch does, and neither the window nor
    the tile: the backward scatters the output gradient into a window-size
    buffer, which becomes the tile gradient in place."""

    @staticmethod
    def forward(ctx, x, mesh, plan, pads, kernel, stride, dilation):
        dims = (x.dim() - 2, x.dim() - 1)
        ext = assemble(fetch(x, mesh, plan, dims), dims, pads, float("-inf"), tile_format(x))  # x's layout
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
        ext = assemble(fetch(x, mesh, plan, dims), dims, pads, memory_format=tile_format(x))  # x's layout
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


@functools.lru_cache(maxsize=1024)
def _conv_geometry(spec: Spec, mesh_id: int, ndim: int, x_shape, k, s, d, padding):
    """Everything a conv on a tile of ``spec`` (local shape ``x_shape``) works out
    before it computes: (kernel extent, padding before, global output sizes,
    :func:`window_plan`, the :class:`_BorderGeometry` or None). A pure function of
    its arguments, cached like :func:`_window_plan` (the same convs run every
    step; what raises is not cached, and raises in the order of the checks below)."""
    ke = tuple(d[i] * (k[i] - 1) + 1 for i in range(2))
    if padding == "same" and s != (1, 1):
        raise context.unsupported("conv2d", "padding='same' with stride > 1")
    pb, pt = zip(*(geometry.conv_padding(v, ke[i])
                   for i, v in enumerate((padding, padding) if isinstance(padding, str) else padding)))
    H, W = spec.global_hw
    n_out = (conv_out(H, ke[0], s[0], pt[0]), conv_out(W, ke[1], s[1], pt[1]))
    if min(n_out) < 1:
        raise SPIMError(f"{context.where()}: conv2d: the kernel is larger than the padded scene {H}x{W}")
    _check_nchw_dims(spec, ndim, "conv2d")
    wp = _window_plan(spec, mesh_id, "conv2d", ke, s, pb, n_out)
    geo = None
    if spec.mesh.sp > 1:
        plan, _, out_spec, ranges = wp
        r, c = spec.mesh.coord
        need = (needs(out_spec.rows, ke[0], s[0], pb[0])[r], needs(out_spec.cols, ke[1], s[1], pb[1])[c])
        geo = _border_geometry(plan, x_shape, (ndim - 2, ndim - 1), need, ranges, k, d, ke, s)
    return ke, pb, n_out, wp, geo


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
    padding = a.get("padding", 0)
    if (x._spec.is_tokens and x.dim() == 4 and x._spec.dims[0] != 1 and k == (1, 1) and s == (1, 1)
            and padding in (0, (0, 0), [0, 0], "valid", "same")):
        # a 1x1 conv mixes channels per position: local on a tensor sharded on any other dim
        # (EfficientFormerV2's talking heads: a conv over the heads of a (B, heads, Nq, Nk) map)
        return wrap(F.conv2d(x._local, weight, a.get("bias"), 1, 0, 1, a.get("groups", 1)), x._spec)
    if per_sample(x):
        return wrap(F.conv2d(x._local, weight, a.get("bias"), s, padding, d, a.get("groups", 1)), x._spec)
    ke, pb, n_out, (plan, pads, spec, ranges), geo = _conv_geometry(
        x._spec, id(x._spec.mesh), x.dim(), x._local.shape, k, s, d,
        padding if isinstance(padding, str) else _pair(padding))
    reference = reference_paths()
    if isinstance(a.get("bias"), SpatialTensor) or reference:
        # the window, then torch's conv on it and torch's autograd (halo.reference_paths)
        ext, spec, _ = windowed(x, "conv2d", ke, s, pb, n_out, far=reference)
        return wrap(F.conv2d(ext, weight, a.get("bias"), s, 0, d, a.get("groups", 1)), spec)
    if x.mesh.sp == 1:  # the tile is the scene: torch's own conv, its padding included
        return wrap(F.conv2d(x._local, weight, a.get("bias"), s, padding, d, a.get("groups", 1)), spec)
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
    if per_sample(x):
        return wrap(F.max_pool2d(x._local, k, s, p, d, ceil), x._spec)
    H, W = x._spec.global_hw
    n_out = (pool_out(H, k[0], s[0], p[0], d[0], ceil), pool_out(W, k[1], s[1], p[1], d[1], ceil))
    ke = tuple(d[i] * (k[i] - 1) + 1 for i in range(2))
    plan, pads, spec, ranges = window_plan(x, "max_pool2d", ke, s, p, n_out)
    if x.mesh.sp == 1:  # the tile is the scene: torch's own pooling
        return wrap(F.max_pool2d(x._local, k, s, p, d, ceil), spec)
    if reference_paths():  # the window (-inf at the scene border), torch's pooling and autograd
        ext, spec, _ = windowed(x, "max_pool2d", ke, s, p, n_out, pad_value=float("-inf"), far=True)
        return wrap(F.max_pool2d(ext, k, s, 0, d), spec)
    r, c = x.mesh.coord
    need = (needs(spec.rows, ke[0], s[0], p[0])[r], needs(spec.cols, ke[1], s[1], p[1])[c])
    dims = (x.dim() - 2, x.dim() - 1)
    fit = None if ceil else _padded_fit(plan, x._local.shape, dims, need, ranges, ke, s)
    if fit is not None and all(fit[0][a] <= k[a] // 2 for a in (0, 1)):  # torch's padding rule on the tile
        pad, lo, n = fit
        strips = _halo_strips(plan, x._local.shape, dims, lo, s, ke, n)
        return wrap(_BorderMaxPool2d.apply(x._local, x.mesh, plan, strips, k, s, pad, d), spec)
    return wrap(_HaloMaxPool2d.apply(x._local, x.mesh, plan, pads, k, s, d), spec)


def _avg_divisor(o0, o1, n, k, s, p, include_pad, device, dtype):
    """:func:`geometry.pool_divisors` as a tensor."""
    return torch.tensor(geometry.pool_divisors(o0, o1, n, k, s, p, include_pad), device=device, dtype=dtype)


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
    if per_sample(x):
        return wrap(F.avg_pool2d(x._local, k, s, p, ceil, include_pad, a.get("divisor_override")), x._spec)
    H, W = x._spec.global_hw
    n_out = (pool_out(H, k[0], s[0], p[0], 1, ceil), pool_out(W, k[1], s[1], p[1], 1, ceil))
    plan, pads, spec, ((r0, r1), (c0, c1)) = window_plan(x, "avg_pool2d", k, s, p, n_out)
    loc = x._local
    if x.mesh.sp == 1:  # the tile is the scene: torch's own pooling
        return wrap(F.avg_pool2d(loc, k, s, p, ceil, include_pad, a.get("divisor_override")), spec)
    # window sums, then torch's divisor for each global output position
    if reference_paths():  # the window, torch's pooling and autograd
        total = F.avg_pool2d(windowed(x, "avg_pool2d", k, s, p, n_out, far=True)[0], k, s, 0, False, True, 1)
    else:
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
    if spec.is_tokens:
        # token layout: padding other dims is local (EfficientViT's linear attention pads v's
        # channels with ones); the flattened token dim has no scene border to pad at
        before, after = per_dim.get(spec.dims[0], (0, 0))
        if after or (before and mode != "constant"):
            raise context.unsupported("pad", f"padding the token dim {spec.dims[0]} of a token-layout tensor "
                                      "(only constant padding in front: replicated prefix tokens)")
        out = F.pad(x._local, pad, mode=mode, value=value) if mode == "constant" else F.pad(x._local, pad, mode=mode)
        # constant tokens in front (CoaT's zero row for the class token): replicated prefix tokens
        return wrap(out, replace(spec, prefix=spec.prefix + before) if before else spec)
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

    rows = geometry.pad_partition(spec.rows, *per_dim.get(spec.dims[0], (0, 0)))
    cols = geometry.pad_partition(spec.cols, *per_dim.get(spec.dims[1], (0, 0)))
    loc = x._local
    if mode == "reflect" and any(local_pad):
        for dim, (b, e) in ((spec.dims[0], local_pad[2 * (nd - 1 - spec.dims[0]):][:2]),
                            (spec.dims[1], local_pad[2 * (nd - 1 - spec.dims[1]):][:2])):
            if max(b, e) >= loc.shape[dim]:
                raise SPIMError(f"{context.where()}: pad: reflect padding of {max(b, e)} needs a tile larger than that")
    out = F.pad(loc, local_pad, mode=mode, value=value) if mode == "constant" else F.pad(loc, local_pad, mode=mode)
    return wrap(out, Spec(spec.mesh, spec.dims, rows, cols))


@register(torch.Tensor.unfold)
def _unfold(func, args, kwargs):
    """``x.unfold(dim, size, step)``: the windows ``[o step, o step + size)``
    along ``dim`` as a new last dim (HaloNet's key/value blocks with a halo:
    a padded map unfolded by ``block + 2 halo`` with step ``block``).

    Along an unsharded dim: local. Along a grid dim: a window op with extent
    ``size``, stride ``step`` and no padding (module docstring): output window
    ``o`` belongs to the tile holding its centre, each rank fetches the rows
    (cols) its windows read from its neighbours (the halo exchange, corners
    not needed: the other grid dim is its own tile) and unfolds locally, so
    every rank holds exactly its windows; the halo's gradient goes back to its
    owner. A tile that owns no window is refused (geometry.output_partition);
    a token dim is refused."""
    a = dict(zip(("self", "dimension", "size", "step"), args))
    a.update(kwargs)
    x, size, step = a["self"], int(a["size"]), int(a["step"])
    dim = int(a["dimension"]) % max(x.dim(), 1)
    spec = x._spec
    if dim not in spec.dims:
        return wrap(x._local.unfold(dim, size, step), spec)
    if spec.is_tokens:
        raise context.unsupported("Tensor.unfold", f"windows along the token dim {dim} (flattened grid) of a "
                                  f"tensor of global shape {tuple(x.shape)}")
    n = x.shape[dim]
    if size < 1 or step < 1 or size > n:
        raise SPIMError(f"{context.where()}: Tensor.unfold: size {size} and step {step} do not fit the global "
                        f"extent {n} of dim {dim}")
    axis = spec.dims.index(dim)
    part = (spec.rows, spec.cols)[axis]
    out = output_partition(part, (n - size) // step + 1, size, step, 0, "Tensor.unfold", ("row", "col")[axis])
    need = [needs(out, size, step, 0), needs((spec.rows, spec.cols)[1 - axis], 1, 1, 0)]
    if axis == 1:
        need.reverse()
    ext = halo_exchange(x._local, spec.mesh, spec.rows, spec.cols, need[0], need[1], spec.dims, "Tensor.unfold",
                        reference_paths())
    new = Spec(spec.mesh, spec.dims, out, spec.cols) if axis == 0 else Spec(spec.mesh, spec.dims, spec.rows, out)
    return wrap(ext.unfold(dim, size, step), new)
