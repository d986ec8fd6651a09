"""Ops that move dims around, index, join or create tensors.

They are local as long as the two sharded dims stay whole (a permute moves them,
a cat along channels keeps them); anything that would cut, merge or reorder
the sharded dims is refused by name.
"""
from __future__ import annotations

import torch

from .. import context
from ..errors import SPIMError
from ..tensor import SpatialTensor, funcs_named, op_name, register, wrap
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
    hd, wd = x._spec.dims
    return wrap(x._local.permute(*order), x._spec.with_dims((order.index(hd), order.index(wd))))


@register(*funcs_named("transpose", "swapaxes", "swapdims", owners=(torch, torch.Tensor)))
def _transpose(func, args, kwargs):
    x, a, b = args[0], args[1], args[2]
    a, b = _norm_dim(a, x.dim()), _norm_dim(b, x.dim())
    order = list(range(x.dim()))
    order[a], order[b] = order[b], order[a]
    hd, wd = x._spec.dims
    return wrap(x._local.transpose(a, b), x._spec.with_dims((order.index(hd), order.index(wd))))


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
    if any(start <= d <= end for d in x._spec.dims) and end > start:
        raise context.unsupported(
            "flatten", f"flattening dims {start}..{end} would merge the sharded dims {x._spec.dims}"
        )
    dims = tuple(d - (end - start) if d > end else d for d in x._spec.dims)
    return wrap(x._local.flatten(start, end), x._spec.with_dims(dims))


@register(*funcs_named("view", "reshape", "view_as", "reshape_as", "unflatten", "expand", "repeat",
                       "unfold", "roll", "flip", "rot90", "narrow", "index_select", "gather", "scatter", "take",
                       "masked_select", "nonzero", "sort", "topk", "cumsum", "cumprod", "diff", "pixel_shuffle",
                       "pixel_unshuffle", "tolist", "numpy", "item", "__setitem__", "__bool__", "__reduce_ex__",
                       "__deepcopy__", "matmul", "mm", "bmm", "einsum", "tensordot", "__matmul__", "__rmatmul__",
                       "fold", "unfold", "channel_shuffle", "grid_sample", "affine_grid", "local_response_norm",
                       "dropout2d", "dropout3d", "feature_dropout"))
def _refuse_layout(func, args, kwargs):
    x = next(a for a in args if isinstance(a, SpatialTensor))
    name = op_name(func)
    if name.endswith(("view", "reshape", "view_as", "reshape_as", "unflatten", "expand")):
        shape = args[1:] if len(args) > 1 else tuple(kwargs.values())
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        if name.endswith(("view", "reshape")) and all(isinstance(s, int) for s in shape) and tuple(shape) == tuple(x.shape):
            return x  # a no-op reshape
    if name.endswith(("cumsum", "cumprod", "flip", "roll", "sort", "topk", "diff", "narrow", "index_select")):
        dim = args[2] if name.endswith("narrow") or name.endswith("index_select") else (args[1] if len(args) > 1 else kwargs.get("dim"))
        if name.endswith(("roll", "flip")) and dim is None:
            dim = args[2] if len(args) > 2 else kwargs.get("dims")
        if isinstance(dim, int) and _norm_dim(dim, x.dim()) not in _spatial_set(x) and not name.endswith(("roll",)):
            largs = [a._local if isinstance(a, SpatialTensor) else a for a in args]
            out = func(*largs, **kwargs)
            if isinstance(out, torch.Tensor) and out.dim() == x.dim():
                return wrap(out, x._spec)
            if isinstance(out, tuple):
                return type(out)(*[wrap(o, x._spec) for o in out])
    raise context.unsupported(
        name, f"it would cut, merge or reorder the sharded dims {x._spec.dims} of a tensor of global shape "
        f"{tuple(x.shape)} (or needs values from other tiles)"
    )


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
    if dim in _spatial_set(x):
        raise context.unsupported(op_name(func), f"along sharded dim {dim}")
    ndim = max(a.dim() for a in args if isinstance(a, torch.Tensor))
    largs, lkwargs = localize(args, kwargs, x._spec, ndim, op_name(func))
    out = func(*largs, **lkwargs)
    keep = kwargs.get("keepdim", False) or name not in ("argmax", "argmin", "cosine_similarity")
    dims = x._spec.dims if keep else tuple(d - 1 if d > dim else d for d in x._spec.dims)
    return wrap(out, x._spec.with_dims(dims))


@register(*funcs_named("cat", "concat", "concatenate", "stack", owners=(torch,)))
def _cat(func, args, kwargs):
    tensors = args[0] if args else kwargs["tensors"]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    x = next(t for t in tensors if isinstance(t, SpatialTensor))
    ndim = x.dim()
    stack = getattr(func, "__name__", "") == "stack"
    dim = _norm_dim(dim, ndim + (1 if stack else 0))
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
        raise context.unsupported(op_name(func), f"splitting along sharded dim {dim}")
    outs = func(x._local, *args[1:], **kwargs)
    dims = tuple(d - 1 if name == "unbind" and d > dim else d for d in x._spec.dims)
    return tuple(wrap(o, x._spec.with_dims(dims)) for o in outs)


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
    src, out_pos, new_dims = 0, 0, {}
    for i in idx:
        if i is None:
            out_pos += 1
            continue
        if src in x._spec.dims:
            if not (isinstance(i, slice) and i == slice(None)):
                raise context.unsupported(
                    "Tensor.__getitem__", f"indexing sharded dim {src} with {i!r} (only ':' is allowed there)"
                )
            new_dims[src] = out_pos
        if not isinstance(i, int):
            out_pos += 1
        src += 1
    out = x._local[idx]
    return wrap(out, x._spec.with_dims((new_dims[x._spec.dims[0]], new_dims[x._spec.dims[1]])))


@register(*funcs_named("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
                       "randint_like", owners=(torch,)))
def _like(func, args, kwargs):
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
