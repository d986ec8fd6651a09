"""Resampling: ``F.interpolate`` (and ``nn.Upsample``) on sharded and replicated inputs.

Every mode SPIM runs is separable: output pixel ``o`` along an axis is
``sum_k w[k, o] * x[idx[k, o]]`` with ``T`` taps (nearest 1, bilinear 2, bicubic
4, area = the adaptive-pooling bin). The tap vectors are computed for the whole
*global* axis, exactly as ATen computes them (``UpSample.h``:
``area_pixel_compute_scale`` / ``area_pixel_compute_source_index``, ``1 /
scale_factor`` when a scale factor is given and not recomputed, index clamping,
cubic coefficients with ``A = -0.75``; the CPU kernels' arithmetic in the
kernels' "opmath" precision). Nearest modes take their indices from torch
itself (one interpolate of an ``arange`` probe per axis on the input's device),
so the floor of a float product can never come out differently.

A rank then needs the input window ``[min idx, max idx + 1)`` of its output
range; since every rank can compute every grid row's window from the global
tap vectors, the halo exchange knows who needs what. The taps are applied with
``index_select`` and weights, so autograd gives the backward (halo gradients go
back through the exchange). Bilinear upsampling by powers of two (FPN, UPerNet)
runs torch's own kernel instead, which computes the same taps
(:func:`_native_factors`): on the tile, with the strips next to a neighbour
recomputed from small windows (:class:`_BorderUpsample`), or on the window.

Output partition: the partition of a sharded tensor of the same global size
seen earlier in this forward (``context.layout_for``), so an upsampled map lines
up with the map it is added to or concatenated with (FPN, U-Net, UPerNet);
otherwise the input partition scaled by ``n_out / n_in`` (floor).

Replicated inputs: a plain tensor resampled to the global size of a sharded
map (UPerNet's PPM and DeepLab's image pooling upsample their pooled bins with
``size=x.shape[2:]``) must come out sharded like that map so that it can be
concatenated with it. ``F.interpolate`` on plain tensors never reaches
``SpatialTensor.__torch_function__``, so :func:`route_replicated` rides on the
torch function mode that ``parallelize`` keeps entered while the model computes
(rng's :class:`~rest_ds.spim.rng.GridInvariantRandom`: its forward and checkpoint
recomputes, ``rng.register_plain_route``) and sees the ``F.interpolate`` calls
whose inputs are all plain; when both requested output
sizes equal the global sizes of sharded tensors seen in this forward, each rank
computes just its tile of the result (its taps index the replicated input
directly, or, when the whole result is at most twice the tile's, torch's own
call runs and is narrowed to the tile; the input's gradient is then this tile's
part, convention P in comm.py). Any other plain call runs unchanged. The routed result has the same
values as the plain one, only distributed, so a later op either runs exactly or
refuses by name.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import context, geometry, rng
from ..errors import SPIMError
from ..halo import (WindowGrads, border_strips, box_view, check_needs, dense_grad, halo_exchange, make_plan,
                    reference_paths, start_fetch, window_part)
from ..tensor import SpatialTensor, Spec, register, wrap
from ..tiling import Partition
from .norm import bind_args

_NAMES = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
_DEFAULTS = {"size": None, "scale_factor": None, "mode": "nearest", "align_corners": None,
             "recompute_scale_factor": None, "antialias": False}
MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


# --- per-axis taps (global) --------------------------------------------------
def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _area_scale(n_in: int, n_out: int, align_corners: bool, scale: float | None, dt, device) -> torch.Tensor:
    if align_corners:
        if n_out > 1:
            return torch.tensor(n_in - 1, dtype=dt, device=device) / (n_out - 1)
        return torch.zeros((), dtype=dt, device=device)
    if scale is not None and scale > 0:
        return torch.tensor(1.0 / scale, dtype=torch.float64, device=device).to(dt)
    return torch.tensor(n_in, dtype=dt, device=device) / n_out


def _source_index(scale, n_out, align_corners, cubic, dt, device) -> torch.Tensor:
    o = torch.arange(n_out, dtype=dt, device=device)
    if align_corners:
        return scale * o
    src = scale * (o + 0.5) - 0.5
    return src if cubic else torch.clamp(src, min=0)


def _cubic_coeffs(t: torch.Tensor) -> list[torch.Tensor]:
    A = -0.75

    def conv1(x):
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def conv2(x):
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    return [conv2(t + 1.0), conv1(t), conv1(1.0 - t), conv2((1.0 - t) + 1.0)]


def axis_taps(n_in: int, n_out: int, mode: str, align_corners: bool, scale: float | None,
              dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Global taps of one axis: ``idx`` (T, n_out) int64 input indices in
    ``[0, n_in)`` and ``w`` (T, n_out) weights (None for the nearest modes).
    ``scale`` is the scale factor handed to ATen (None when the output size is
    given or the scale is recomputed)."""
    dt = _opmath(dtype)
    if mode in ("nearest", "nearest-exact"):
        probe = torch.arange(n_in, dtype=dt, device=device).view(1, 1, n_in, 1)
        if scale is not None:
            out = F.interpolate(probe, scale_factor=(scale, 1.0), mode=mode)
        else:
            out = F.interpolate(probe, size=(n_out, 1), mode=mode)
        idx = out.reshape(1, -1).round().long()
        if idx.shape[1] != n_out:
            raise SPIMError(f"internal: nearest probe gave {idx.shape[1]} outputs, expected {n_out}")
        return idx, None
    if mode == "area":
        i = torch.arange(n_out, device=device)
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        length = end - start
        T = int(length.max().item())
        k = torch.arange(T, device=device).unsqueeze(1)
        idx = torch.minimum(start.unsqueeze(0) + k, (end - 1).unsqueeze(0))
        w = torch.where(k < length.unsqueeze(0), 1.0 / length.to(dt).unsqueeze(0), torch.zeros((), dtype=dt,
                                                                                                device=device))
        return idx, w
    cubic = mode == "bicubic"
    s = _area_scale(n_in, n_out, align_corners, scale, dt, device)
    src = _source_index(s, n_out, align_corners, cubic, dt, device)
    if not cubic:
        if n_in == n_out:  # ATen copies when the sizes agree, whatever the scale
            i0 = torch.arange(n_out, device=device)
            return torch.stack([i0, i0]), torch.stack([torch.ones(n_out, dtype=dt, device=device),
                                                       torch.zeros(n_out, dtype=dt, device=device)])
        i0 = torch.clamp(torch.floor(src).long(), max=n_in - 1)
        lam1 = torch.clamp(src - i0.to(dt), 0, 1)
        i1 = i0 + (i0 < n_in - 1).long()
        return torch.stack([i0, i1]), torch.stack([1.0 - lam1, lam1])
    i0 = torch.floor(src).long()
    coeffs = _cubic_coeffs(src - i0.to(dt))
    idx = torch.stack([torch.clamp(i0 - 1 + j, 0, n_in - 1) for j in range(4)])
    return idx, torch.stack(coeffs)


# --- argument parsing (mirrors F.interpolate) -------------------------------
def parse(shape: tuple[int, ...], a: dict) -> tuple[str, bool, tuple[int, int], tuple[float | None, float | None]]:
    """(mode, align_corners, global output (H, W), scale per axis handed to ATen)
    for a 4-D input of global ``shape``; raises torch's ValueError for bad
    arguments and a refusal for what SPIM does not run."""
    mode, ac = a["mode"], a["align_corners"]
    if len(shape) != 4:
        raise context.unsupported("interpolate", f"a {len(shape)}-D input (only 4-D N, C, H, W is sharded)")
    if a["antialias"]:
        raise context.unsupported("interpolate", "antialias=True (its filter support is not implemented exactly)")
    if mode not in MODES:
        raise context.unsupported("interpolate", f"mode '{mode}' (SPIM runs {', '.join(MODES)} on 4-D inputs)")
    if mode in ("nearest", "area", "nearest-exact"):
        if ac is not None:
            raise ValueError("align_corners option can only be set with the interpolating modes: "
                             "linear | bilinear | bicubic | trilinear")
        ac = False
    elif ac is None:
        ac = False
    size, sf, rsf = a["size"], a["scale_factor"], a["recompute_scale_factor"]
    n_in = shape[2:]
    if size is not None and sf is not None:
        raise ValueError("only one of size or scale_factor should be defined")
    if size is not None:
        out = tuple(int(v) for v in size) if isinstance(size, (list, tuple, torch.Size)) else (int(size),) * 2
        if len(out) != 2:
            raise ValueError(f"Input and output must have the same number of spatial dimensions, but got input "
                             f"with spatial dimensions of {list(n_in)} and output size of {size}.")
        if rsf:
            raise ValueError("recompute_scale_factor is not meaningful with an explicit size.")
        scales = (None, None)
    elif sf is not None:
        sfs = tuple(float(v) for v in sf) if isinstance(sf, (list, tuple)) else (float(sf),) * 2
        if len(sfs) != 2:
            raise ValueError(f"Input and scale_factor must have the same number of spatial dimensions, but got "
                             f"input with spatial dimensions of {list(n_in)} and scale_factor of shape {sf}.")
        out = tuple(int(n * s) for n, s in zip(n_in, sfs))  # ATen: int64(input * scale), in double
        scales = (None, None) if (rsf or mode == "area") else sfs
    else:
        raise ValueError("either size or scale_factor should be defined")
    if min(out) < 1:
        raise SPIMError(f"{context.where()}: interpolate: output size {out} is empty")
    return mode, bool(ac), out, scales


# --- applying taps ------------------------------------------------------------
def _apply_taps(t: torch.Tensor, dim: int, taps) -> torch.Tensor:
    """Separable taps along ``dim`` of ``t``, as :func:`_resample_plan` prepares them: per tap
    (indices into ``t`` along ``dim``, weights viewed along ``dim`` in ``t``'s dtype
    or None for the nearest modes)."""
    out = None
    for idx, w in taps:
        if w is None:
            return t.index_select(dim, idx)
        # in place: neither index_select nor a product with a constant saves its
        # output, so at most one tap's term exists besides the result
        term = t.index_select(dim, idx).mul_(w)
        out = term if out is None else out.add_(term)
        del term
    return out


def parse_call(args: tuple, kwargs: dict) -> tuple[str, bool, tuple[int, int], tuple[float | None, float | None]]:
    """:func:`parse` of the call ``F.interpolate(*args, **kwargs)`` (``args[0]``: the
    4-D input, plain or sharded). For analytic volumes outside spim (rest_ds.train.bench)."""
    a = bind_args("interpolate", _NAMES, _DEFAULTS, args, kwargs)
    return parse(tuple(a["input"].shape), a)


def proportional(part: Partition, n_in: int, n_out: int, axis: str) -> Partition:
    """The output partition of resampling ``n_in`` -> ``n_out`` lines along ``axis`` for the
    input partition ``part``: each tile owns the outputs proportional to its inputs
    (raises when a tile would own none)."""
    return _proportional(part, n_in, n_out, axis)


def _proportional(part: Partition, n_in: int, n_out: int, axis: str) -> Partition:
    bounds = geometry.proportional(part, n_in, n_out)
    i = geometry.empty_tile(bounds)
    if i is not None:
        raise SPIMError(
            f"{context.where()}: interpolate: the tile in grid {axis} {i} (input {axis}s {part[i]}:{part[i + 1]}) "
            f"owns no output {axis}s when {n_in} {axis}s are resampled to {n_out}; use fewer ranks along "
            f"this axis or a larger scene")
    return bounds


@functools.lru_cache(maxsize=256)
def _cached_taps(n_in: int, n_out: int, mode: str, align_corners: bool, scale: float | None, dtype: torch.dtype,
                 device: torch.device):
    """:func:`axis_taps` plus the first and last input index of each output (as
    tuples), computed once per distinct axis: a model resamples the same sizes
    every step, and the taps cost ~10 small tensor ops (~0.1 ms) per axis and
    call. Callers must not modify the returned tensors."""
    idx, w = axis_taps(n_in, n_out, mode, align_corners, scale, dtype, device)
    return idx, w, tuple(idx.min(0).values.tolist()), tuple(idx.max(0).values.tolist())


def _axis_plan(axis: int, parts: int, in_part: Partition | None, n_in: int, n_out: int, lo, hi, reg):
    """(output partition, needs per grid index) for one axis (``lo``/``hi``: first
    and last input index of each output). The registered partition ``reg`` of size
    ``n_out`` (context.layout_for, or None) is preferred when its windows fit the halo rule."""
    name = ("row", "col")[axis]
    if in_part is None:  # replicated input: any partition works, nothing to exchange
        return reg, None
    if reg is not None:
        needs = geometry.tap_needs(reg, lo, hi)
        try:
            check_needs(in_part, needs, name, "interpolate")
            return reg, needs
        except SPIMError:
            pass  # e.g. a coincidental size: fall back to the proportional split
    out_part = _proportional(in_part, n_in, n_out, name)
    return out_part, geometry.tap_needs(out_part, lo, hi)


def _native_factors(mode: str, ac: bool, n_in, out_hw, scales) -> tuple[int, int] | None:
    """Per-axis upsampling factors ``k`` (powers of two) when torch's own bilinear
    kernel, run on a rank's window, computes exactly the global taps: the
    source coordinate ``(o + 0.5) / k - 0.5`` is then exact in floating point,
    so window output ``o - k * start`` has the same two taps and weights as
    global output ``o`` (shifted by ``start``), and clamping happens only at
    the scene border (the window holds every tap of the rank's outputs)."""
    if mode != "bilinear" or ac:
        return None
    ks = []
    for n, o, s in zip(n_in, out_hw, scales):
        k = o // n
        if o % n or k < 2 or k & (k - 1) or (s is not None and s != k):
            return None
        ks.append(k)
    return tuple(ks)


def _upsample_strips(plan, x_shape, ks, global_hw):
    """:func:`halo.border_strips` of a ``ks`` upsampling of the tile (the ``k //
    2`` outputs next to each side with a neighbour), each as ``(out rows, out
    cols, in rows, in cols)`` with the global inputs it reads, clipped to the scene."""
    def window(a, o0, o1):  # global inputs of local outputs [o0, o1): floor of (o + 0.5) / k - 0.5, and + 1
        k, g0 = ks[a], ks[a] * plan.origin[a]
        return (max(0, (2 * (g0 + o0) + 1 - k) // (2 * k)),
                min(global_hw[a], (2 * (g0 + o1 - 1) + 1 - k) // (2 * k) + 2))

    n = [ks[a] * x_shape[2 + a] for a in (0, 1)]
    half = [k // 2 for k in ks]
    return [(orows, ocols, window(0, *orows), window(1, *ocols))
            for orows, ocols in border_strips(plan, x_shape, (2, 3), n, half, half)]


class _UpGeometry:
    """What :class:`_BorderUpsample` works out from the geometry alone (a pure
    function of the input Spec, local tile size and factors; cached with the rest
    of the call's plan, :func:`_resample_plan`). ``strips``: per strip (output
    rows, output cols, input rows, input cols, the strip's box in its region's
    output, the region's output size); ``lines``: per :func:`_clamped_lines` line
    (axis, window start, window end, line, the strips' boxes in the window's
    output of ``g``)."""

    __slots__ = ("plan", "ks", "scales", "out_hw", "strips", "lines")

    def __init__(self, plan, ks, x_hw, n_in):
        self.plan, self.ks = plan, ks
        self.scales = [float(k) for k in ks]
        self.out_hw = [ks[0] * x_hw[0], ks[1] * x_hw[1]]
        shape = (1, 1) + tuple(x_hw)
        raw = _upsample_strips(plan, shape, ks, n_in)
        self.strips = tuple((orows, ocols, irows, icols, _region_outputs(plan, ks, orows, ocols, irows, icols),
                             [ks[0] * (irows[1] - irows[0]), ks[1] * (icols[1] - icols[0])])
                            for orows, ocols, irows, icols in raw)
        lines = []
        for a, lo, hi, line in _clamped_lines(raw, ks, self.out_hw, shape):
            k, boxes = ks[a], []
            for orows, ocols, _, _ in raw:
                box = [orows, ocols]
                box[a] = (max(box[a][0], k * lo) - k * lo, min(box[a][1], k * hi) - k * lo)
                if box[a][1] > box[a][0]:
                    boxes.append(tuple(box))
            lines.append((a, lo, hi, line, tuple(boxes)))
        self.lines = tuple(lines)


class _BorderUpsample(torch.autograd.Function):
    """Bilinear upsampling by powers of two ``ks`` (align_corners False) of a
    tile whose outputs are ``k`` times its inputs on each axis: torch's kernel
    on the tile is exact except in the ``k // 2`` outputs next to a side with a
    neighbour (where torch clamps at the tile's edge and the scene goes on);
    those strips are recomputed by the same kernel on small windows that hold
    the neighbour's halo (a window gives the global taps: see
    :func:`_native_factors`). No window-size copy; the output is contiguous.
    Saves nothing: the backward is torch's on the tile plus the strips' own.
    ``geo``: the call's :class:`_UpGeometry`."""

    @staticmethod
    def forward(ctx, x, mesh, geo):
        dims = (2, 3)
        pieces, wait = start_fetch(x, mesh, geo.plan, dims)
        scales = geo.scales
        y = torch.ops.aten.upsample_bilinear2d(x, geo.out_hw, False, *scales)
        wait()
        for orows, ocols, irows, icols, strip, region_out in geo.strips:
            # channels-last: a region is 2-3 lines wide, where torch's NCHW kernel runs
            # 3-6x slower than on channels innermost (the main model's x8: 0.30 -> 0.05 ms)
            region = window_part(pieces, dims, irows, icols, 0.0).contiguous(memory_format=torch.channels_last)
            yr = torch.ops.aten.upsample_bilinear2d(region, region_out, False, *scales)
            box_view(y, dims, orows, ocols).copy_(box_view(yr, dims, *strip))
        ctx.cfg = (mesh, geo, tuple(x.shape))
        return y

    @staticmethod
    def backward(ctx, g):
        mesh, geo, x_shape = ctx.cfg
        scales, ks, nc = geo.scales, geo.ks, list(x_shape[:2])
        g = dense_grad(g)  # kept channels-last (the head's maps come from tokens): torch's fast backward
        # the strips first, so that the halos' gradients travel during the tile's backward
        grads = WindowGrads(g, x_shape, geo.plan, (2, 3))
        for orows, ocols, irows, icols, strip, region_out in geo.strips:
            in_shape = nc + [irows[1] - irows[0], icols[1] - icols[0]]
            gr = torch.empty(nc + region_out, dtype=g.dtype, device=g.device,
                             memory_format=torch.channels_last).zero_()  # channels-last: see forward
            box_view(gr, (2, 3), *strip).copy_(box_view(g, (2, 3), orows, ocols))
            grads.add(torch.ops.aten.upsample_bilinear2d_backward(gr, region_out, in_shape, False, *scales),
                      irows, icols)
        grads.send(mesh)
        # the tile's backward with the strips' gradient left out, without a copy of g (autograd may
        # hand the same tensor to other ops, so g is never written): torch's backward of all of g
        # differs from it only in the input lines the strips' clamped outputs feed, and those are
        # recomputed from a window of g (see _clamped_lines)
        gx = torch.ops.aten.upsample_bilinear2d_backward(g, geo.out_hw, list(x_shape), False, *scales)
        for a, lo, hi, line, boxes in geo.lines:
            k = ks[a]
            gw = g.narrow(2 + a, k * lo, k * (hi - lo)).clone(memory_format=torch.channels_last)
            for box in boxes:
                box_view(gw, (2, 3), *box).zero_()
            in_shape = list(x_shape)
            in_shape[2 + a] = hi - lo
            gxw = torch.ops.aten.upsample_bilinear2d_backward(gw, list(gw.shape[2:]), in_shape, False, *scales)
            gx.narrow(2 + a, line, 1).copy_(gxw.narrow(2 + a, line - lo, 1))
        return grads.finish(gx), None, None


def _clamped_lines(strips, ks, out_hw, x_shape):
    """The input lines of the tile's backward that the strips' outputs feed, as
    (axis, window start, window end, line) in local inputs.

    A strip holds the ``k // 2`` outputs next to a side along one axis: on the
    tile, torch clamps their source coordinate to the tile's first (last) input,
    so both their taps along that axis read that one line (the second with
    weight 0). The tile's backward with the strips zeroed therefore equals its
    backward of the whole ``g`` except in those lines; a line's value there is
    the backward of the window of the 2 inputs next to the side (the ``2 k``
    outputs that read them, strips zeroed): the window has the tile's taps for
    every output that reaches the line, in the same order (its own clamped edge
    is its other line), and spans the tile along the other axis."""
    lines = set()
    for box in [s[:2] for s in strips]:
        clamped = False
        for a, (o0, o1) in enumerate(box):
            n_in, half = x_shape[2 + a], ks[a] // 2
            m = min(2, n_in)
            if o1 <= half:
                lines.add((a, 0, m, 0))
                clamped = True
            elif o0 >= out_hw[a] - half:
                lines.add((a, n_in - m, n_in, n_in - 1))
                clamped = True
        if not clamped:  # _upsample_strips makes none such
            raise SPIMError(f"internal: upsampling strip {box} is not next to a side of the tile")
    return sorted(lines)


def _region_outputs(plan, ks, orows, ocols, irows, icols):
    """A strip's outputs in the output of its region's upsampling (which starts
    at global output ``k * region start``)."""
    return tuple((o[0] + ks[a] * (plan.origin[a] - i[0]), o[1] + ks[a] * (plan.origin[a] - i[0]))
                 for a, (o, i) in enumerate(((orows, irows), (ocols, icols))))


def _resample(x_local: torch.Tensor, mesh, mode, ac, out_hw, scales, in_spec: Spec | None,
              n_in: tuple[int, int]) -> SpatialTensor:
    """Sharded result of resampling: ``x_local`` is this rank's tile (``in_spec``)
    or, with ``in_spec`` None, the whole replicated input."""
    run = context.current()
    layouts = run.layouts if run is not None else {}
    ph, pw = mesh.grid
    # the registered partitions of the output sizes (context.layout_for) are part of the key:
    # which one a call gets depends on what this forward has seen
    reg = (layouts.get((0, ph, out_hw[0])), layouts.get((1, pw, out_hw[1])))
    reference = reference_paths()
    kind, spec, data = _resample_plan(in_spec, mesh, id(mesh), tuple(x_local.shape[2:]), tuple(n_in), mode, ac,
                                      tuple(out_hw), tuple(scales), x_local.dtype, x_local.device, reg, reference)
    if kind == "border":
        return wrap(_BorderUpsample.apply(x_local, mesh, data), spec)
    need_r, need_c, rest = data
    if in_spec is None:
        window = x_local
    else:
        window = halo_exchange(x_local, mesh, in_spec.rows, in_spec.cols, need_r, need_c, (2, 3), "interpolate",
                               reference)
    if kind in ("window", "full"):
        with torch._C.DisableTorchFunction():  # a plain window: no routing of replicated inputs
            y = F.interpolate(window, **rest[0])
        for dim, start, length in rest[1]:
            y = y.narrow(dim, start, length)
        return wrap(y, spec)
    y = window
    for dim, taps in rest:
        y = _apply_taps(y, dim, taps)
    return wrap(y, spec)


# A pure function of its arguments, asked by every resampling of every step with the same
# few arguments (FPN/UPerNet: ~10 calls per step): output partition, Spec, halo needs,
# border strips, sliced taps. What raises is not cached (lru_cache), so errors come as
# before, naming the module. ``mesh_id``: see window._window_plan. The cached tensors
# (taps) are never modified.
@functools.lru_cache(maxsize=512)
def _resample_plan(in_spec: Spec | None, mesh, mesh_id: int, x_hw: tuple[int, int], n_in: tuple[int, int],
                   mode: str, ac: bool, out_hw: tuple[int, int], scales, dtype: torch.dtype, device, reg,
                   reference: bool):
    """(kind, output Spec, data) of :func:`_resample`: kind "border" with the
    :class:`_UpGeometry`; "window" (torch's kernel on the window) and "full"
    (torch's call on the whole replicated input) with (needs per axis, (the
    F.interpolate arguments, narrows of its output)); "taps" with (needs per
    axis, per pass (dim, taps as :func:`_apply_taps` takes them))."""
    taps, plans = [], []
    for axis in range(2):
        idx, w, lo, hi = _cached_taps(n_in[axis], out_hw[axis], mode, ac, scales[axis], dtype, device)
        in_part = None if in_spec is None else (in_spec.rows, in_spec.cols)[axis]
        plans.append(_axis_plan(axis, mesh.grid[axis], in_part, n_in[axis], out_hw[axis], lo, hi, reg[axis]))
        taps.append((idx, w))
    (rows, need_r), (cols, need_c) = plans
    spec = Spec(mesh, (2, 3), rows, cols)
    r, c = mesh.coord
    ranges = ((rows[r], rows[r + 1]), (cols[c], cols[c + 1]))
    # the reference path (halo.reference_paths): the window through one all-to-all and the global taps
    ks = _native_factors(mode, ac, n_in, out_hw, scales) if in_spec is not None and not reference else None
    if ks is not None and mesh.sp > 1 and ranges == tuple((k * p[i], k * p[i + 1]) for k, p, i in
                                                           zip(ks, (in_spec.rows, in_spec.cols), (r, c))):
        plan = make_plan(mesh, in_spec.rows, in_spec.cols, need_r, need_c, "interpolate")
        return "border", spec, _UpGeometry(plan, ks, x_hw, n_in)
    if in_spec is None:
        base, window_hw = (0, 0), n_in
    else:
        base = (need_r[r][0], need_c[c][0])
        window_hw = (need_r[r][1] - need_r[r][0], need_c[c][1] - need_c[c][0])
    if ks is not None and all(0 <= o0 - k * b and o1 - k * b <= k * window_hw[a]
                              for a, ((o0, o1), k, b) in enumerate(zip(ranges, ks, base))):
        narrows = tuple((2 + a, o0 - k * b, o1 - o0) for a, ((o0, o1), k, b) in enumerate(zip(ranges, ks, base)))
        return "window", spec, (need_r, need_c, ({"scale_factor": (float(ks[0]), float(ks[1])), "mode": "bilinear",
                                                  "align_corners": False}, narrows))
    if in_spec is None and not reference and (out_hw[0] * out_hw[1] <= 2 * (ranges[0][1] - ranges[0][0]) *
                                              (ranges[1][1] - ranges[1][0])):
        # a replicated input whose whole result is at most twice this tile's (UPerNet's PPM on
        # 2 ranks): torch's own call, the plain op itself, and this tile's part of it; one
        # kernel instead of ~12 small ops of taps (and its backward: the tile's part, convention P)
        call = {"mode": mode, **({"size": out_hw} if scales[0] is None else {"scale_factor": scales}),
                **({"align_corners": ac} if mode in ("bilinear", "bicubic") else {})}
        return "full", spec, (None, None, (call, tuple((2 + a, o0, o1 - o0) for a, (o0, o1) in enumerate(ranges))))
    # columns first while the rows are not shrunk: the second pass then selects
    # whole rows (contiguous copies) instead of gathering single elements along
    # the last dim, and the first pass runs on the smaller input (the PSP's
    # pooled bins: ~5x less CPU than rows first); the nesting h(w(x)) is also ATen's
    order = (1, 0) if ranges[0][1] - ranges[0][0] >= window_hw[0] else (0, 1)
    passes = []
    for axis in order:
        (o0, o1), (idx, w) = ranges[axis], taps[axis]
        view = [1, 1, 1, 1]
        view[2 + axis] = -1
        sel = idx[:, o0:o1] - base[axis]
        passes.append((2 + axis, tuple((sel[k], None if w is None else w[k, o0:o1].to(dtype).view(view))
                                       for k in range(sel.shape[0]))))
    return "taps", spec, (need_r, need_c, tuple(passes))


@register(F.interpolate)
def _interpolate(func, args, kwargs):
    a = bind_args("interpolate", _NAMES, _DEFAULTS, args, kwargs)
    x = a["input"]
    if not isinstance(x, SpatialTensor):
        raise context.unsupported("interpolate", "a sharded tensor as a secondary argument")
    if x._spec.dims != (2, 3) or x.dim() != 4:
        raise context.unsupported("interpolate", f"sharded dims {x._spec.dims} of a {x.dim()}-D tensor "
                                                 f"(N, C, H, W sharded over H and W expected)")
    mode, ac, out_hw, scales = parse(tuple(x.shape), a)
    return _resample(x._local, x._spec.mesh, mode, ac, out_hw, scales, x._spec, tuple(x.shape[2:]))


# --- routing of replicated inputs ------------------------------------------
def interpolate_replicated(mesh, args, kwargs) -> SpatialTensor | None:
    """This rank's tile of ``F.interpolate(*args, **kwargs)`` on a plain input when
    both output sizes are global sizes of sharded tensors of this forward; None
    (run the plain call) otherwise."""
    try:
        a = bind_args("interpolate", _NAMES, _DEFAULTS, args, kwargs)
    except TypeError:
        return None
    x = a["input"]
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        return None
    if a["antialias"] or a["mode"] not in MODES:
        return None  # the plain result is correct; SPIM only redistributes supported modes
    try:
        mode, ac, out_hw, scales = parse(tuple(x.shape), a)
    except (ValueError, SPIMError):
        return None  # let torch raise its own error on the plain call
    ph, pw = mesh.grid
    if context.layout_for(0, ph, out_hw[0]) is None or context.layout_for(1, pw, out_hw[1]) is None:
        return None
    return _resample(x, mesh, mode, ac, out_hw, scales, None, tuple(x.shape[2:]))


def route_replicated(func, types, args, kwargs) -> SpatialTensor | None:
    """``F.interpolate`` on plain inputs inside a parallelized forward (see the module
    docstring): this rank's tile of the result over the current run's mesh, or None
    (the plain call runs) outside any run or when :func:`interpolate_replicated` declines.
    Called by the grid-invariant mode for every ``F.interpolate`` while it is entered."""
    run = context.current()
    if run is None or run.mesh is None or any(issubclass(t, SpatialTensor) for t in types):
        return None
    return interpolate_replicated(run.mesh, args, kwargs)


rng.register_plain_route(F.interpolate, route_replicated)
