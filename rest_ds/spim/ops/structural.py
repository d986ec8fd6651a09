"""Ops that move dims around, index, join or create tensors.

They are local as long as the two sharded dims stay whole (a permute moves them,
a cat along channels keeps them); anything that would cut, merge or reorder
the sharded dims is refused by name.
"""
from __future__ import annotations

import functools
import math
from dataclasses import replace

import torch
import torch.distributed as dist

from .. import context
from ..comm import all_reduce_, all_reduce_sum
from ..errors import SPIMError
from ..tensor import SpatialTensor, Spec, funcs_named, op_name, register, wrap
from .indexmap import index_mapped
from .pointwise import align_plain, localize


def _norm_dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def _spatial_set(x: SpatialTensor) -> set[int]:
    return set(x._spec.dims)


@register(*funcs_named("permute", owners=(torch, torch.Tensor)))
def _permute(func, args, kwargs):
    x = args[0]
    if "dims" in kwargs:
        order = kwargs["dims"]
    elif len(args) == 2 and isinstance(args[1], (list, tuple, torch.Size)):
        order = args[1]
    else:
        order = args[1:]
    order = [_norm_dim(int(d), x.dim()) for d in order]
    return wrap(x._local.permute(*order), x._spec.with_dims([order.index(d) for d in x._spec.dims]))


@register(*funcs_named("transpose", "swapaxes", "swapdims", owners=(torch, torch.Tensor)))
def _transpose(func, args, kwargs):
    x, a, b = args[0], args[1], args[2]
    a, b = _norm_dim(a, x.dim()), _norm_dim(b, x.dim())
    order = list(range(x.dim()))
    order[a], order[b] = order[b], order[a]
    return wrap(x._local.transpose(a, b), x._spec.with_dims([order.index(d) for d in x._spec.dims]))


@register(*funcs_named("movedim", "moveaxis", owners=(torch, torch.Tensor)))
def _movedim(func, args, kwargs):
    x = args[0]
    out = torch.movedim(x._local, *args[1:], **kwargs)
    # follow the sharded dims through the move on a meta tensor whose sizes name the dims
    probe = torch.movedim(torch.empty([2 + i for i in range(x.dim())], device="meta"), *args[1:], **kwargs)
    pos = [list(probe.shape).index(2 + d) for d in x._spec.dims]
    return wrap(out, x._spec.with_dims(pos))


@register(*funcs_named("unsqueeze", owners=(torch, torch.Tensor)))
def _unsqueeze(func, args, kwargs):
    x, d = args[0], args[1] if len(args) > 1 else kwargs["dim"]
    d = _norm_dim(d, x.dim() + 1)
    dims = tuple(k + 1 if k >= d else k for k in x._spec.dims)
    return wrap(x._local.unsqueeze(d), x._spec.with_dims(dims))


@register(*funcs_named("squeeze", owners=(torch, torch.Tensor)))
def _squeeze(func, args, kwargs):
    x = args[0]
    shape = list(x.shape)
    if len(args) > 1 or "dim" in kwargs:
        d = args[1] if len(args) > 1 else kwargs["dim"]
        ds = [d] if isinstance(d, int) else list(d)
        ds = [_norm_dim(k, x.dim()) for k in ds if shape[_norm_dim(k, x.dim())] == 1]
    else:
        ds = [k for k, n in enumerate(shape) if n == 1]
    if set(ds) & _spatial_set(x):
        raise context.unsupported(op_name(func), "squeezing a sharded dim")
    out = x._local
    for k in sorted(ds, reverse=True):
        out = out.squeeze(k)
    dims = tuple(k - sum(1 for q in ds if q < k) for k in x._spec.dims)
    return wrap(out, x._spec.with_dims(dims))


@register(*funcs_named("flatten", owners=(torch, torch.Tensor)))
def _flatten(func, args, kwargs):
    x = args[0]
    start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
    start, end = _norm_dim(start, x.dim()), _norm_dim(end, x.dim())
    shape = list(x.shape)
    new_shape = shape[:start] + [math.prod(shape[start:end + 1])] + shape[end + 1:]
    return reshape_to(x, new_shape, "flatten")


def _resolve(shape, numel: int, op: str) -> list[int]:
    shape = [int(s) for s in shape]
    if shape.count(-1) > 1:
        raise SPIMError(f"{op}: only one dimension can be -1")
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        if rest == 0 or numel % rest:
            raise SPIMError(f"{op}: shape {shape} is invalid for a tensor of {numel} elements")
        shape[shape.index(-1)] = numel // rest
    if math.prod(shape) != numel:
        raise SPIMError(f"{op}: shape {shape} is invalid for a tensor of {numel} elements")
    return shape


def _divides(a: int, b: int) -> bool:
    return a > 0 and b % a == 0


def reshape_to(x: SpatialTensor, new_shape, op: str) -> SpatialTensor:
    """Reshape by global shape when the sharded grid survives whole.

    Row-major order keeps the structure ``(A..., lead, H, W, trail, Z...)``; a
    reshape is exact when a new dim holds the grid whole: either two dims
    ``(H, W)`` (grid layout) or one dim ``L * H * W * T`` (token layout, with
    ``L`` split off the dims before the grid and ``T`` off those after). A grid
    may also be split into / merged from windows ``(H / k, k, W / k, k)`` when
    every tile border lies on the window grid. A reshape of a grid layout that
    would mix the grid with other dims or cut it returns an index-mapped
    rearrangement (ops/indexmap.py: exact where it comes back to a grid layout
    within the module, refused otherwise); of a token layout it is refused."""
    spec = x._spec
    new_shape = tuple(int(s) for s in new_shape)
    plan = _reshape_plan(spec, id(spec.mesh), tuple(x.shape), new_shape, op)
    if plan is None:
        new_shape = tuple(_resolve(new_shape, math.prod(x.shape), op))
        # a rearrangement through a layout that mixes or cuts the grid: tracked as a global
        # index map until it is a grid layout again (ops/indexmap.py), or refused with this
        err = context.unsupported(
            op, f"reshaping global shape {tuple(x.shape)} to {new_shape} would mix or cut the sharded "
            f"{'token dim' if spec.is_tokens else 'dims'} {spec.dims}")
        return index_mapped(x, new_shape, err)
    loc, out = plan
    return wrap(x._local.reshape(loc), out)


# A pure function of its arguments (the results are a shape and an immutable Spec), asked
# by every reshape/view/flatten of every step with the same few shapes. What raises is
# not cached (lru_cache): errors come as before, naming the module. ``mesh_id``: see
# window._window_plan (the output Spec holds the mesh object).
@functools.lru_cache(maxsize=1024)
def _reshape_plan(spec: Spec, mesh_id: int, old: tuple, new_shape: tuple, op: str) -> tuple[tuple, Spec] | None:
    """(local shape, Spec) of :func:`reshape_to`; None where the reshape would mix or cut the grid."""
    old = list(old)
    new = _resolve(new_shape, math.prod(old), op)
    H, W = spec.global_hw
    if spec.is_tokens:
        t = spec.dims[0]
        a_tot, z_tot = math.prod(old[:t]) * spec.lead, spec.trail * math.prod(old[t + 1:])
        if spec.prefix:  # only reshapes that leave the token dim as it is
            n = spec.global_sizes()[0]
            for p in range(len(new)):
                if new[p] == n and math.prod(new[:p]) == math.prod(old[:t]):
                    loc = list(new)
                    loc[p] = spec.local_sizes()[0]
                    return tuple(loc), spec.with_dims((p,))
            raise context.unsupported(op, f"reshaping a token dim that holds {spec.prefix} prefix tokens "
                                          f"({tuple(old)} -> {tuple(new)}); strip them first")
    else:
        g0, g1 = spec.dims
        if g1 == g0 + 1:
            a_tot, z_tot = math.prod(old[:g0]), math.prod(old[g1 + 1:])
        elif g1 == g0 + 2:  # windows (H/k, k, W/k, k) merged back into (H, W)
            k1, k2 = old[g0 + 1], old[g1 + 1]
            a_tot, z_tot = math.prod(old[:g0]), math.prod(old[g1 + 2:])
            for p in range(len(new) - 1):
                if (new[p], new[p + 1]) == (H * k1, W * k2) and math.prod(new[:p]) == a_tot:
                    loc = list(new)
                    (r0, r1), (c0, c1) = spec.row_range, spec.col_range
                    loc[p], loc[p + 1] = (r1 - r0) * k1, (c1 - c0) * k2
                    out = Spec(spec.mesh, (p, p + 1), tuple(b * k1 for b in spec.rows), tuple(b * k2 for b in spec.cols))
                    return tuple(loc), out
            raise context.unsupported(op, f"reshaping windows {tuple(old)} -> {tuple(new)} other than back to the grid")
        else:
            return None  # the grid's dims apart or transposed: reshape_to decides
    (r0, r1), (c0, c1) = spec.row_range, spec.col_range
    h, w = r1 - r0, c1 - c0
    grid_first = None
    for p in range(len(new)):
        before = math.prod(new[:p])
        if not _divides(before, a_tot):
            continue
        after2 = math.prod(new[p + 2:])
        # (H, W): grid layout
        if p + 1 < len(new) and (new[p], new[p + 1]) == (H, W) and before == a_tot and after2 == z_tot:
            loc = list(new)
            loc[p], loc[p + 1] = h, w
            grid = tuple(loc), Spec(spec.mesh, (p, p + 1), spec.rows, spec.cols)
            if not (p == 0 and H == 1 and len(new) > 2):
                return grid
            # a one-row map flattened with size-1 leading dims, (1, 1, 1, W, D) -> (1, W, D): the
            # same elements read as a batchless (H=1, W) grid or as (batch, tokens); models mean the
            # tokens (a ViT's one token row: its class token is concatenated along dim 1), so a token
            # reading found further on wins
            grid_first = grid
            continue
        # (H/k, k, W/k, k): windows of a grid layout (tiles must hold whole windows)
        if (not spec.is_tokens and p + 3 < len(new) and before == a_tot and new[p] * new[p + 1] == H
                and new[p + 2] * new[p + 3] == W and math.prod(new[p + 4:]) == z_tot):
            # window sides may be 1 (MaxViT's grid partition of a map as small as its grid: (4, 1, 4, 1))
            k1, k2 = new[p + 1], new[p + 3]
            if all(b % k1 == 0 for b in spec.rows) and all(b % k2 == 0 for b in spec.cols):
                loc = list(new)
                loc[p], loc[p + 2] = h // k1, w // k2
                out = Spec(spec.mesh, (p, p + 2), tuple(b // k1 for b in spec.rows), tuple(b // k2 for b in spec.cols))
                return tuple(loc), out
            if (new[p] == 1 and len(spec.rows) > 2) or (new[p + 2] == 1 and len(spec.cols) > 2):
                raise context.unsupported(
                    op, f"one window of {k1}x{k2} spans the whole {H}x{W} map along a split axis (attention over "
                    f"the whole map through a window reshape): no tiling keeps it whole; "
                    f"split the map only along axes with several windows")
            raise context.unsupported(
                op, f"splitting the grid into windows of {k1}x{k2} needs every tile border on the window grid "
                f"(tile borders rows {spec.rows}, cols {spec.cols}); align tiles to the window size")
        # L * H * W * T: token layout
        lead = a_tot // before
        if _divides(lead * H * W, new[p]):
            trail = new[p] // (lead * H * W)
            if trail * math.prod(new[p + 1:]) == z_tot:
                loc = list(new)
                loc[p] = lead * h * w * trail
                out = Spec(spec.mesh, (p,), spec.rows, spec.cols, 0, lead, trail)
                return tuple(loc), out
    return grid_first  # None: would mix or cut the grid, reshape_to decides


@register(*funcs_named("view", "reshape", owners=(torch, torch.Tensor)))
def _reshape(func, args, kwargs):
    x = args[0]
    shape = args[1:] if len(args) > 1 else (kwargs.get("shape") or kwargs.get("size"),)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if any(isinstance(s, torch.dtype) for s in shape):
        raise context.unsupported(op_name(func), "view as another dtype")
    return reshape_to(x, shape, op_name(func))


@register(*funcs_named("unflatten", owners=(torch, torch.Tensor)))
def _unflatten(func, args, kwargs):
    x = args[0]
    dim = _norm_dim(args[1] if len(args) > 1 else kwargs["dim"], x.dim())
    sizes = list(args[2] if len(args) > 2 else kwargs["sizes"])
    shape = list(x.shape)
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = shape[dim] // known
    return reshape_to(x, shape[:dim] + sizes + shape[dim + 1:], "unflatten")


@register(*funcs_named("view_as", "reshape_as", owners=(torch.Tensor,)))
def _reshape_as(func, args, kwargs):
    return reshape_to(args[0], list(args[1].shape), op_name(func))


# F.unfold / F.fold (non-overlapping patches), pixel (un)shuffle: patch.py; Tensor.unfold (sliding windows along one dim): window.py
@register(*funcs_named("expand", "repeat", "flip", "rot90", "narrow", "index_select", "gather", "scatter", "take",
                       "masked_select", "nonzero", "sort", "topk", "cumsum", "cumprod", "diff", "tolist",
                       "numpy", "item", "__bool__", "__reduce_ex__",
                       "__deepcopy__", "mm", "tensordot",
                       "channel_shuffle", "grid_sample", "affine_grid", "local_response_norm"))
def _refuse_layout(func, args, kwargs):
    x = next(a for a in args if isinstance(a, SpatialTensor))
    name = op_name(func)
    if name.endswith("expand"):
        shape = args[1:] if len(args) > 1 else tuple(kwargs.values())
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        if all(int(s) in (-1, n) for s, n in zip(shape, x.shape)) and len(shape) == x.dim():
            return x  # expanding to its own shape
        lead = len(shape) - x.dim()
        if lead >= 0 and all(int(shape[d + lead]) in (-1, x.shape[d]) for d in x._spec.dims):
            # sharded dims kept, size-1 dims broadcast (HaloNet's relative logits tiled over a block
            # row): local; new leading dims shift the sharded ones
            loc = [-1 if k - lead in x._spec.dims else int(n) for k, n in enumerate(shape)]
            return wrap(x._local.expand(loc), x._spec.with_dims([d + lead for d in x._spec.dims]))
    if name.endswith(("cumsum", "cumprod", "flip", "sort", "topk", "diff", "narrow", "index_select")):
        dim = args[2] if name.endswith("narrow") or name.endswith("index_select") else (args[1] if len(args) > 1 else kwargs.get("dim"))
        if name.endswith("flip") and dim is None:
            dim = args[2] if len(args) > 2 else kwargs.get("dims")
        if isinstance(dim, int) and _norm_dim(dim, x.dim()) not in _spatial_set(x):
            largs = [a._local if isinstance(a, SpatialTensor) else a for a in args]
            out = func(*largs, **kwargs)
            if isinstance(out, torch.Tensor) and out.dim() == x.dim():
                return wrap(out, x._spec)
            if isinstance(out, tuple):
                return type(out)([wrap(o, x._spec) for o in out])  # a structseq takes one sequence
    raise context.unsupported(
        name, f"it would cut, merge or reorder the sharded dims {x._spec.dims} of a tensor of global shape "
        f"{tuple(x.shape)} (or needs values from other tiles)"
    )


@register(*funcs_named("repeat_interleave", owners=(torch, torch.Tensor)))
def _refuse_repeat_interleave(func, args, kwargs):
    """Refused by name: each rank holds only its tile, so repeating it (GCViT's global
    query: the whole map pooled to one window, copied to every window in the batch)
    hands every copy a part of what the model means to copy whole."""
    x = next(a for a in (*args, *kwargs.values()) if isinstance(a, SpatialTensor))
    raise context.unsupported(
        "repeat_interleave", f"it copies a spatially sharded tensor of global shape {tuple(x.shape)} (sharded dims "
        f"{x._spec.dims}) whose tiles differ per rank, e.g. GCViT's global query (the map pooled to one window, "
        "copied to every window); no exact rule: use a model without it, or make that tensor whole in the model "
        "(rest_ds.spim.gather()) before repeating it")


@register(*funcs_named("softmax", "log_softmax", "_softmax", "glu", "normalize", "argmax", "argmin",
                       "cosine_similarity", "logcumsumexp", owners=(torch, torch.Tensor, torch.nn.functional)))
def _along_dim(func, args, kwargs):
    """Ops that work along one dim: local when that dim is not sharded."""
    x = next(a for a in args if isinstance(a, SpatialTensor))
    name = getattr(func, "__name__", "")
    dim = kwargs.get("dim", args[1] if len(args) > 1 and isinstance(args[1], int) else None)
    if name == "normalize":
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 1)
    if name == "glu":
        dim = kwargs.get("dim", args[1] if len(args) > 1 else -1)
    if name == "cosine_similarity":
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 1)
    if dim is None:
        raise context.unsupported(op_name(func), "without an explicit dim it reduces over the sharded dims")
    dim = _norm_dim(dim, x.dim())
    if dim in _spatial_set(x) and name in ("softmax", "log_softmax"):
        return _softmax_sharded(x, dim, name == "log_softmax", kwargs.get("dtype", next(
            (a for a in args[2:] if isinstance(a, torch.dtype)), None)), op_name(func))
    if dim in _spatial_set(x) and name == "normalize" and x is args[0]:
        a = dict(zip(("input", "p", "dim", "eps", "out"), args))
        a.update(kwargs)
        if a.get("out") is not None:
            raise context.unsupported(op_name(func), "out= is not supported on sharded tensors")
        return _normalize_sharded(x, dim, a.get("p", 2.0), a.get("eps", 1e-12), op_name(func))
    if dim in _spatial_set(x):
        raise context.unsupported(op_name(func), f"along sharded dim {dim}")
    ndim = max(a.dim() for a in args if isinstance(a, torch.Tensor))
    largs, lkwargs = localize(args, kwargs, x._spec, ndim, op_name(func))
    out = func(*largs, **lkwargs)
    keep = kwargs.get("keepdim", False) or name not in ("argmax", "argmin", "cosine_similarity")
    dims = x._spec.dims if keep else tuple(d - 1 if d > dim else d for d in x._spec.dims)
    return wrap(out, x._spec.with_dims(dims))


def _scene_reduce(part: torch.Tensor, spec: Spec, dim: int, is_max: bool) -> torch.Tensor:
    """Sum (differentiable: all_reduce_sum) or max (no autograd) along sharded
    ``dim`` over the whole scene, from ``part``, this rank's keepdim reduction of
    its tile along ``dim``; returns this tile's share (``part``'s shape).

    A token dim spans every rank: one all-reduce over sp. A grid dim spans only
    the ranks of this tile's grid row (col): each rank places its part at its
    global position along the other grid dim in a scene-size buffer (0 / -inf
    elsewhere), one all-reduce over sp then holds every grid row's (col's) own
    result, of which each rank keeps its tile's part."""
    mesh = spec.mesh
    if not spec.is_tokens:
        axis = 1 - spec.dims.index(dim)  # the grid axis the result stays sharded on
        other = spec.dims[axis]
        lo, hi = (spec.row_range, spec.col_range)[axis]
        n = spec.global_hw[axis]
        fill = float("-inf") if is_max else 0.0
        shape = list(part.shape)
        bands = []
        for size in (lo, n - hi):
            shape[other] = size
            bands.append(part.new_full(shape, fill))
        part = torch.cat([bands[0], part, bands[1]], other)
    if is_max:
        out = all_reduce_(part.detach().clone(), mesh, dist.ReduceOp.MAX)
    else:
        out = all_reduce_sum(part, mesh)
    return out if spec.is_tokens else out.narrow(other, lo, hi - lo)


def _softmax_sharded(x: SpatialTensor, dim: int, log: bool, dtype, op: str) -> SpatialTensor:
    """softmax / log_softmax along a sharded dim (a token dim, e.g. GCNet's
    attention pooling over ``H*W``, or one grid dim), exact: the scene's max
    along ``dim`` (a shift, constant for autograd: softmax does not depend on
    it), the scene's sum of ``exp`` (an autograd all-reduce, whose backward
    supplies the global sum of ``grad * y``), then the tile normalised locally.
    Replicated prefix tokens (CrossViT's class-token attention over [cls, patches])
    enter the max as they are and the sum once, after the all-reduce.
    Same layout as ``x``."""
    spec = x._spec
    k = spec.prefix if spec.is_tokens else 0
    t = x._local if dtype is None else x._local.to(dtype)
    m = _scene_reduce(t.detach().amax(dim, keepdim=True), spec, dim, True)
    z = t - m
    e = z.exp()
    s = _scene_reduce(e.narrow(dim, k, e.shape[dim] - k).sum(dim, keepdim=True), spec, dim, False)
    if k:
        s = s + e.narrow(dim, 0, k).sum(dim, keepdim=True)
    return wrap(z - s.log() if log else e / s, spec)


def _normalize_sharded(x: SpatialTensor, dim: int, p, eps: float, op: str) -> SpatialTensor:
    """``F.normalize`` along a sharded dim (EdgeNeXt's / XCiT's cross-covariance
    attention normalises q and k over the tokens), exact: the scene's sum of
    ``|x|^p`` along ``dim`` (an autograd all-reduce, _scene_reduce), its p-th
    root clamped at ``eps`` as torch does, the tile divided locally. Like
    torch's norm, the gradient at a zero norm is zero. Same layout as ``x``."""
    spec = x._spec
    if spec.is_tokens and spec.prefix:
        raise context.unsupported(op, f"along a token dim that holds {spec.prefix} replicated prefix tokens")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < math.inf:
        raise context.unsupported(op, f"p={p!r} along sharded dim {dim} (only finite p > 0 is exact)")
    t = x._local
    s = _scene_reduce((t * t if p == 2 else t.abs() ** p).sum(dim, keepdim=True), spec, dim, False)
    pos = s > 0
    # s ** (1/p) with a zero (not NaN) gradient where the norm is zero, as torch's norm backward
    n = torch.where(pos, torch.where(pos, s, torch.ones_like(s)) ** (1.0 / p), torch.zeros_like(s))
    return wrap(t / n.clamp_min(eps), spec)


@register(*funcs_named("cat", "concat", "concatenate", "stack", owners=(torch,)))
def _cat(func, args, kwargs):
    tensors = args[0] if args else kwargs["tensors"]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    x = next(t for t in tensors if isinstance(t, SpatialTensor))
    ndim = x.dim()
    stack = getattr(func, "__name__", "") == "stack"
    dim = _norm_dim(dim, ndim + (1 if stack else 0))
    if not stack and x._spec.is_tokens and dim == x._spec.dims[0]:
        # replicated tokens (class / register tokens) prepended to the scene's tokens
        k = next(i for i, t in enumerate(tensors) if t is x)
        if k != len(tensors) - 1 or any(isinstance(t, SpatialTensor) for t in tensors[:k]):
            raise context.unsupported(op_name(func), "only replicated tokens may be concatenated, and only in front")
        extra = sum(t.shape[dim] for t in tensors[:k])
        out = torch.cat(list(tensors[:k]) + [x._local], dim)
        return wrap(out, replace(x._spec, prefix=x._spec.prefix + extra))
    if not stack and dim in _spatial_set(x):
        raise context.unsupported(op_name(func), f"concatenating along sharded dim {dim}")
    largs, _ = localize([list(tensors)], {}, x._spec, ndim, op_name(func))
    out = func(largs[0], dim)
    dims = tuple(d + 1 if stack and d >= dim else d for d in x._spec.dims)
    return wrap(out, x._spec.with_dims(dims))


@register(*funcs_named("chunk", "split", "unbind", "tensor_split", owners=(torch, torch.Tensor)))
def _split(func, args, kwargs):
    x = args[0]
    name = getattr(func, "__name__", "")
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0) if name != "unbind" else kwargs.get("dim", args[1] if len(args) > 1 else 0)
    dim = _norm_dim(dim, x.dim())
    if dim in _spatial_set(x):
        spec = x._spec
        if name == "split" and spec.is_tokens and spec.prefix and dim == spec.dims[0]:
            size = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size"))
            outs = _split_prefix(x, size, dim)
            if outs is not None:
                return outs
        raise context.unsupported(op_name(func), f"splitting along sharded dim {dim}"
                                  + (" (only the replicated prefix tokens may be split off, in front of the rest)"
                                     if spec.is_tokens and spec.prefix else ""))
    outs = func(x._local, *args[1:], **kwargs)
    dims = tuple(d - 1 if name == "unbind" and d > dim else d for d in x._spec.dims)
    return tuple(wrap(o, x._spec.with_dims(dims)) for o in outs)


def _split_prefix(x: SpatialTensor, size, dim: int) -> tuple | None:
    """``split`` of a token dim whose first ``prefix`` tokens are replicated (class /
    register tokens) into pieces that each lie within the prefix, then one last piece
    running to the end (DINOv3's RoPE: ``q.split((prefix, N - prefix), dim=-2)``):
    the prefix pieces as plain (replicated) tensors, the last as this rank's tokens
    with the prefix tokens it still holds. Sizes are global (the scene's token count).
    None for any other split (a piece would end inside the sharded tokens)."""
    spec, n = x._spec, x.shape[dim]
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        sizes = [size] * (n // size) + ([n % size] if n % size else [])
    elif isinstance(size, (list, tuple)) and all(isinstance(v, int) and v >= 0 for v in size) and sum(size) == n:
        sizes = list(size)
    else:
        return None
    t, outs, start = x._local, [], 0
    for i, k in enumerate(sizes):
        if start + k <= spec.prefix and i < len(sizes) - 1:
            outs.append(t.narrow(dim, start, k))  # prefix tokens only: replicated
        elif i == len(sizes) - 1 and start <= spec.prefix:
            outs.append(wrap(t.narrow(dim, start, t.shape[dim] - start), replace(spec, prefix=spec.prefix - start)))
        else:
            return None
        start += k
    return tuple(outs)


@register(torch.Tensor.__getitem__)
def _getitem(func, args, kwargs):
    x, index = args
    idx = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (torch.Tensor, list)) or (i is not None and not isinstance(i, (int, slice, type(Ellipsis)))) for i in idx):
        raise context.unsupported("Tensor.__getitem__", "advanced (tensor/list) indexing of a sharded tensor")
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (x.dim() - n_real) + idx[k + 1:]
    else:
        idx = idx + (slice(None),) * (x.dim() - n_real)
    spec = x._spec
    if spec.is_tokens and spec.prefix:
        t = spec.dims[0]
        pos = [k for k, i in enumerate(idx) if i is not None]
        i = idx[pos[t]]
        if isinstance(i, slice) and (i.step in (None, 1)):
            start = i.start or 0
            if start == spec.prefix and i.stop is None:  # strip the prefix tokens
                rest = list(idx)
                rest[pos[t]] = slice(None)
                stripped = wrap(x._local.narrow(t, spec.prefix, x._local.shape[t] - spec.prefix),
                                replace(spec, prefix=0))
                return _getitem(func, (stripped, tuple(rest)), kwargs)
            if 0 <= start and i.stop is not None and 0 <= i.stop <= spec.prefix:
                return x._local.narrow(t, 0, spec.prefix)[tuple(idx)]  # prefix tokens only: replicated
        if isinstance(i, int) and 0 <= i < spec.prefix:
            return x._local.narrow(t, 0, spec.prefix)[tuple(idx)]  # one prefix token: replicated
    src, out_pos, new_dims = 0, 0, {}
    for k, i in enumerate(idx):
        if i is None:
            out_pos += 1
            continue
        if src in x._spec.dims and not x._spec.is_tokens and isinstance(i, slice) and i != slice(None):
            crop = _crop_end(x, src, i)
            if crop is None:
                crop = every_kth(x, src, i)
            if crop is not None:  # a crop at the scene's end (padding removed) or every k-th row: a new layout
                rest = list(idx)
                rest[k] = slice(None)
                return _getitem(func, (crop, tuple(rest)), kwargs)
        if src in x._spec.dims:
            # a slice that keeps the whole dim (MViTv2's x[:, :, 0:, :] with no class token) is ':'
            if not (isinstance(i, slice) and (i == slice(None) or i.indices(x.shape[src]) == (0, x.shape[src], 1))):
                raise context.unsupported(
                    "Tensor.__getitem__", f"indexing sharded dim {src} with {i!r} (only ':' is allowed there)"
                )
            new_dims[src] = out_pos
        if not isinstance(i, int):
            out_pos += 1
        src += 1
    out = x._local[idx]
    return wrap(out, x._spec.with_dims([new_dims[d] for d in x._spec.dims]))


@register(torch.Tensor.__setitem__)
def _setitem(func, args, kwargs):
    """``x[index] = value`` in place on the tile, where ``index`` keeps every
    sharded dim of ``x`` whole (``:`` or a slice over all of it; MViTv2's
    ``attn[:, :, 0:, 0:] = attn[...] + rel_pos`` without a class token): the
    indexed view of the tile is then this tile's part of the indexed global
    view, so the assignment is local. ``value`` is a sharded tensor of that
    view's layout, or a plain one (a number, or a tensor broadcast against the
    view's global shape, sliced to the tile where it spans a sharded dim).
    Anything else (an index into a sharded dim, a sharded value into a
    replicated tensor) is refused."""
    x, index, value = args
    if not isinstance(x, SpatialTensor):
        raise context.unsupported("Tensor.__setitem__", "assigning a sharded value into a replicated tensor "
                                  "(it would hold only this tile's part)")
    idx = index if isinstance(index, tuple) else (index,)
    if any(i is None or not isinstance(i, (int, slice, type(Ellipsis))) for i in idx):
        raise context.unsupported("Tensor.__setitem__", "advanced (tensor/list/None) indexing of a sharded tensor")
    n_real = sum(1 for i in idx if i is not Ellipsis)
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (x.dim() - n_real) + idx[k + 1:]
    else:
        idx = idx + (slice(None),) * (x.dim() - n_real)
    for d in x._spec.dims:
        i = idx[d]
        if not (isinstance(i, slice) and i.indices(x.shape[d]) == (0, x.shape[d], 1)):
            raise context.unsupported(
                "Tensor.__setitem__", f"assigning into sharded dim {d} with {i!r} of a tensor of global shape "
                f"{tuple(x.shape)} (only ':' is allowed there)")
    view = _getitem(torch.Tensor.__getitem__, (x, idx), {})
    if isinstance(value, SpatialTensor):
        if value.dim() != view.dim() or not value._spec.same_layout(view._spec):
            raise context.unsupported(
                "Tensor.__setitem__", f"the value's layout (dims {value._spec.dims}, global shape "
                f"{tuple(value.shape)}) is not the target's (dims {view._spec.dims}, global shape {tuple(view.shape)})")
        v = value._local
    elif isinstance(value, torch.Tensor):
        v = align_plain(value, view.dim(), view._spec, "Tensor.__setitem__")
    else:
        v = value
    x._local[idx] = v
    return None


def every_kth(x: SpatialTensor, dim: int, sl: slice) -> SpatialTensor | None:
    """``x[..., s::k, ...]`` along sharded ``dim`` (``0 <= s < k``, to the end)
    as a new SpatialTensor, when every interior tile border is a multiple of
    ``k`` (e.g. the ``x[:, 0::2, 1::2]`` of a Swin patch merging on tiles
    aligned to 2): each tile keeps its own ``s::k`` rows, the new borders are
    the old ones divided by ``k``. None for any other slice; refused when a
    tile border is off the ``k`` grid or a tile would be left empty."""
    spec = x._spec
    n = x.shape[dim]
    start, stop, step = sl.indices(n)
    if step <= 1 or not 0 <= start < step or stop != n or sl.stop not in (None, n):
        return None
    axis = spec.dims.index(dim)
    part = spec.rows if axis == 0 else spec.cols
    new = tuple(b // step for b in part[:-1]) + (-(-(n - start) // step),)
    if any(b % step for b in part[1:-1]) or any(b >= e for b, e in zip(new[:-1], new[1:])):
        raise context.unsupported(
            "Tensor.__getitem__", f"every {step}th element of sharded dim {dim} from {start} needs every tile "
            f"border on a multiple of {step} and no empty tile (tile borders {list(part)}); align tiles to {step}")
    loc = x._local[(slice(None),) * dim + (slice(start, None, step),)]
    return wrap(loc, replace(spec, rows=new) if axis == 0 else replace(spec, cols=new))


def _crop_end(x: SpatialTensor, dim: int, sl: slice):
    """``x[..., :n, ...]`` along sharded ``dim`` as a new SpatialTensor, when ``n``
    only cuts into the last tile of that axis (as after padding to a window
    multiple); None for any other slice."""
    spec = x._spec
    n = x.shape[dim]
    start, stop, step = sl.indices(n)
    axis = spec.dims.index(dim)
    part = spec.rows if axis == 0 else spec.cols
    if start != 0 or step != 1 or not part[-2] < stop <= n:
        return None
    new = part[:-1] + (stop,)
    last = (spec.mesh.coord[axis] == len(part) - 2)
    loc = x._local.narrow(dim, 0, stop - part[-2]) if last else x._local
    return wrap(loc, replace(spec, rows=new) if axis == 0 else replace(spec, cols=new))


@register(*funcs_named("zeros_like", "ones_like", "empty_like", "full_like", owners=(torch,)))
def _like(func, args, kwargs):
    """Same layout, this rank's tile (rand_like and the other random ones: rng.py)."""
    x = args[0]
    return wrap(func(x._local, *args[1:], **kwargs), x._spec)


@register(*funcs_named("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", owners=(torch.Tensor,)))
def _new(func, args, kwargs):
    """A new tensor from a sharded one is a plain tensor of the shape asked for."""
    return func(args[0]._local, *args[1:], **kwargs)


@register(torch.Tensor.expand_as)
def _expand_as(func, args, kwargs):
    x, other = args
    if isinstance(other, SpatialTensor) and not isinstance(x, SpatialTensor):
        p = align_plain(x, other.dim(), other._spec, "Tensor.expand_as")
        return wrap(p.expand_as(other._local), other._spec)
    if isinstance(x, SpatialTensor) and isinstance(other, SpatialTensor) and x._spec.same_layout(other._spec):
        return wrap(x._local.expand_as(other._local), x._spec)
    raise context.unsupported("Tensor.expand_as", "expanding a sharded tensor to another layout")


@register(torch.Tensor.__array__ if hasattr(torch.Tensor, "__array__") else None)
def _array(func, args, kwargs):
    raise SPIMError("a SpatialTensor is not a numpy array: call rest_ds.spim.gather() first")
