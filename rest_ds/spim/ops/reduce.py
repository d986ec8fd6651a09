"""Reductions. Over non-sharded dims: local. Over both sharded dims (global
pooling, a loss): local partial result plus one all-reduce over the sp group;
the result is replicated (a plain tensor). Over one sharded dim only: refused.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import context
from ..comm import all_reduce_, all_reduce_sum
from ..tensor import SpatialTensor, funcs_named, op_name, register, wrap
from .pointwise import _pointwise


class _GlobalExtreme(torch.autograd.Function):
    """max/min over dims that include the sharded ones; ties share the gradient
    evenly over the whole scene, as torch's amax/amin do on one device."""

    @staticmethod
    def forward(ctx, x, dims, mesh, is_max):
        lm = x.amax(dims, keepdim=True) if is_max else x.amin(dims, keepdim=True)
        gm = all_reduce_(lm.clone(), mesh, dist.ReduceOp.MAX if is_max else dist.ReduceOp.MIN)
        mask = x == gm
        cnt = all_reduce_(mask.sum(dims, keepdim=True).to(x.dtype), mesh)
        ctx.save_for_backward(mask, cnt)
        ctx.mesh = mesh
        return gm

    @staticmethod
    def backward(ctx, g):
        mask, cnt = ctx.saved_tensors
        g = all_reduce_(g.contiguous().clone(), ctx.mesh)
        return mask.to(g.dtype) * (g / cnt), None, None, None


def _parse(func, args, kwargs, x):
    name = getattr(func, "__name__", "")
    dim = kwargs.get("dim", kwargs.get("axis"))
    rest = list(args[1:])
    if dim is None and rest and not isinstance(rest[0], (torch.dtype, bool)):
        dim = rest.pop(0)
    keepdim = kwargs.get("keepdim", rest.pop(0) if rest and isinstance(rest[0], bool) else False)
    if name in ("var", "std"):
        correction = kwargs.get("correction", 1 if kwargs.get("unbiased", True) else 0)
    else:
        correction = None
    if dim is None:
        dims = list(range(x.dim()))
    else:
        dims = [dim] if isinstance(dim, int) else list(dim)
        dims = [d % x.dim() for d in dims]
    return name, sorted(set(dims)), keepdim, correction, kwargs.get("dtype")


@register(*funcs_named("sum", "mean", "amax", "amin", "max", "min", "var", "std", "nansum", owners=(torch, torch.Tensor)))
def _reduce(func, args, kwargs):
    x = args[0]
    name = getattr(func, "__name__", "")
    if name in ("max", "min") and (len(args) > 1 and isinstance(args[1], torch.Tensor) or isinstance(kwargs.get("other"), torch.Tensor)):
        return _pointwise(torch.maximum if name == "max" else torch.minimum, args, kwargs)
    if not isinstance(x, SpatialTensor):
        raise context.unsupported(op_name(func), "a sharded tensor as a secondary argument")
    name, dims, keepdim, correction, dtype = _parse(func, args, kwargs, x)
    spatial = set(x._spec.dims) & set(dims)
    if not spatial:
        out = func(x._local, *args[1:], **kwargs)
        def shift(d):
            return d if keepdim else d - sum(1 for q in dims if q < d)
        if isinstance(out, tuple):  # max/min with dim: (values, indices)
            # torch.return_types structseqs take one sequence (not *args)
            return type(out)([wrap(o, x._spec.with_dims(tuple(shift(d) for d in x._spec.dims))) for o in out])
        return wrap(out, x._spec.with_dims(tuple(shift(d) for d in x._spec.dims)))
    if x._spec.is_tokens and x._spec.prefix:
        raise context.unsupported(op_name(func), "reducing over a token dim that holds prefix tokens "
                                  "(strip them first, e.g. x[:, prefix:])")
    if spatial != set(x._spec.dims):
        raise context.unsupported(op_name(func), f"reducing over only one of the sharded dims {x._spec.dims}")
    mesh = x._spec.mesh
    t = x._local if dtype is None else x._local.to(dtype)
    if name in ("max", "min") and (len(args) > 1 or "dim" in kwargs):
        raise context.unsupported(op_name(func), "max/min with indices over the sharded dims (use amax/amin)")
    if name in ("amax", "amin", "max", "min"):
        out = _GlobalExtreme.apply(t, dims, mesh, name in ("amax", "max"))
    else:
        count = 1
        for d in dims:
            count *= x.shape[d]
        s = all_reduce_sum((t.nansum if name == "nansum" else t.sum)(dims, keepdim=True), mesh)
        if name in ("sum", "nansum"):
            out = s
        else:
            mean = s / count
            if name == "mean":
                out = mean
            else:
                ss = all_reduce_sum(((t - mean) ** 2).sum(dims, keepdim=True), mesh)
                out = ss / max(count - correction, 0)
                if name == "std":
                    out = out.sqrt()
    if not keepdim:
        out = out.squeeze(dims) if dims else out
        if len(dims) == x.dim():
            out = out.reshape(())
    return out


def _bind_norm(func, args, kwargs):
    """(p, dims or None, keepdim, dtype) of torch.norm / Tensor.norm / linalg.vector_norm / linalg.norm."""
    linalg = func in (torch.linalg.vector_norm, torch.linalg.norm)
    names = ("input", "ord" if linalg else "p", "dim", "keepdim")
    a = dict(zip(names, args))
    a.update(kwargs)
    p = a.get("ord" if linalg else "p", None if func is torch.linalg.norm else (2 if linalg else "fro"))
    dim = a.get("dim")
    dims = None if dim is None else ([dim] if isinstance(dim, int) else list(dim))
    if a.get("out") is not None:
        raise context.unsupported(op_name(func), "out= is not supported on sharded tensors")
    if func is torch.linalg.norm and p is not None and (dims is None or len(dims) == 2):
        raise context.unsupported(op_name(func), f"the matrix norm ord={p!r} (only vector norms are exact)")
    if p is None or p == "fro":
        p = 2
    if not isinstance(p, (int, float)):
        raise context.unsupported(op_name(func), f"p={p!r} over the sharded dims (only vector p-norms are exact)")
    return float(p), dims, bool(a.get("keepdim", False)), a.get("dtype")


@register(torch.norm, torch.Tensor.norm, torch.linalg.vector_norm, torch.linalg.norm)
def _norm(func, args, kwargs):
    """Vector p-norms. Over dims that include the sharded ones: composed from the
    exact global reductions (sum of |x|^p, amax/amin for p = +-inf, count for
    p = 0), so every rank gets the scene's norm (replicated); elsewhere torch's
    own norm of the tile. Like torch, the gradient at a zero norm is zero."""
    x = args[0]
    if not isinstance(x, SpatialTensor):
        raise context.unsupported(op_name(func), "a sharded tensor as a secondary argument")
    p, dims, keepdim, dtype = _bind_norm(func, args, kwargs)
    alld = list(range(x.dim())) if dims is None else sorted({d % x.dim() for d in dims})
    if not set(x._spec.dims) & set(alld):
        out = func(x._local, *args[1:], **kwargs)
        return wrap(out, x._spec.with_dims(tuple(d if keepdim else d - sum(1 for q in alld if q < d)
                                                  for d in x._spec.dims)))
    if not set(x._spec.dims) <= set(alld):
        raise context.unsupported(op_name(func), f"a norm over only one of the sharded dims {x._spec.dims}")
    if dtype is not None:
        x = x.to(dtype)
    if p == math.inf or p == -math.inf:
        return (x.abs().amax if p > 0 else x.abs().amin)(dim=alld, keepdim=keepdim)
    if p == 0:
        return (x != 0).to(x.dtype).sum(dim=alld, keepdim=keepdim)
    s = (x * x if p == 2 else x.abs() ** p).sum(dim=alld, keepdim=keepdim)  # replicated, exact
    if p == 1:
        return s
    pos = s > 0
    # s ** (1/p) with a zero (not NaN/inf) gradient where the norm is zero, as torch's norm backward
    return torch.where(pos, torch.where(pos, s, torch.ones_like(s)) ** (1.0 / p), torch.zeros_like(s))
