"""Normalisation layers: batch, group, instance, layer and RMS norm.

Statistics that span the scene (batch norm in training, group and instance
norm) are computed over the *whole* scene: each rank sums its tile, an
all-reduce over the sp group gives the global sum, and the variance is a second
pass over the squared deviations from the global mean (two passes, not
E[x^2] - E[x]^2, so fp32 keeps its accuracy). The statistics are then
replicated, every rank normalises its own tile, and running statistics are
updated identically on every rank. The backward all-reduces the two sums of
the fused normalisation backward (see :class:`_Normalize`). Norms over non-sharded dims (LayerNorm over
channels after a permute, as in ConvNeXt) and batch norm in eval mode are local.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import context
from ..comm import all_reduce_
from ..errors import SPIMError
from ..tensor import SpatialTensor, register, wrap


def bind_args(func_name: str, names: tuple[str, ...], defaults: dict, args, kwargs) -> dict:
    """Map a functional's positional and keyword arguments to names (defaults filled in)."""
    if len(args) > len(names):
        raise TypeError(f"{func_name}() takes at most {len(names)} positional arguments ({len(args)} given)")
    out = dict(defaults)
    out.update(zip(names, args))
    for k, v in kwargs.items():
        if k not in names:
            raise TypeError(f"{func_name}() got an unexpected keyword argument '{k}'")
        out[k] = v
    missing = [n for n in names if n not in out]
    if missing:
        raise TypeError(f"{func_name}() missing required argument(s) {missing}")
    return out


def _plain(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if isinstance(t, SpatialTensor):
            raise context.unsupported(op, f"a spatially sharded {name}")


def _stat_dtype(t: torch.Tensor) -> torch.dtype:
    # reduced-precision inputs get fp32 statistics, as torch's kernels do
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


class _Normalize(torch.autograd.Function):
    """``x_hat = (t - mean) / sqrt(var + eps)``, mean and biased var over ``dims``
    of the whole scene (``count`` elements in all); also returns the replicated
    mean and sum of squared deviations (not differentiable, for running stats).

    The backward is the fused formula of torch's native kernels,
    ``invstd * (g - mean(g) - x_hat * mean(g * x_hat))`` with whole-scene means
    (one all-reduce of both sums, like SyncBatchNorm), rather than autograd
    through the statistics, whose analytically zero terms only add rounding noise."""

    @staticmethod
    def forward(ctx, t, dims, count, eps, mesh):
        # sums accumulate in fp64 (as torch's CPU batch norm does): the statistics
        # of a whole scene are sums of millions of values
        mean = (all_reduce_(t.sum(dims, keepdim=True, dtype=torch.float64), mesh) / count).to(t.dtype)
        d = t - mean
        ssd = all_reduce_((d * d).sum(dims, keepdim=True, dtype=torch.float64), mesh)
        invstd = (1.0 / torch.sqrt(ssd / count + eps)).to(t.dtype)
        x_hat = d * invstd
        ctx.save_for_backward(x_hat, invstd)
        ctx.dims, ctx.count, ctx.mesh = dims, count, mesh
        ctx.mark_non_differentiable(mean, ssd)
        return x_hat, mean, ssd

    @staticmethod
    def backward(ctx, g, _g_mean, _g_ssd):
        x_hat, invstd = ctx.saved_tensors
        dims, n = ctx.dims, ctx.count
        sums = torch.stack([g.sum(dims, keepdim=True, dtype=torch.float64),
                            (g * x_hat).sum(dims, keepdim=True, dtype=torch.float64)])
        all_reduce_(sums, ctx.mesh)  # g is this tile's part of the scene's gradient
        mean_g, mean_gx = (sums[0] / n).to(g.dtype), (sums[1] / n).to(g.dtype)
        return (g - mean_g - x_hat * mean_gx) * invstd, None, None, None, None


def normalize(t: torch.Tensor, dims: tuple[int, ...], count: int, eps: float, mesh):
    """(x_hat, mean, ssd): ``t`` normalised over ``dims`` of the whole scene
    (``count`` elements over all sp tiles); the mean (``t.dtype``) and the sum of
    squared deviations (fp64), both with kept dims, are replicated.
    Differentiable in ``t``."""
    return _Normalize.apply(t, tuple(dims), int(count), float(eps), mesh)


def _check_channel_layout(x: SpatialTensor, op: str) -> None:
    if len(x._spec.dims) != 2:
        raise context.unsupported(op, "statistics over a token-layout tensor (sharded dims "
                                      f"{x._spec.dims}); normalise the (N, C, H, W) feature map")
    if x.dim() < 3 or min(x._spec.dims) < 2:
        raise context.unsupported(
            op, f"the sharded dims {x._spec.dims} must come after the batch and channel dims (N, C, ...) "
            f"of the global shape {tuple(x.shape)}")


def _affine(y: torch.Tensor, weight, bias) -> torch.Tensor:
    shape = [1, y.shape[1]] + [1] * (y.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


@register(F.batch_norm)
def _batch_norm(func, args, kwargs):
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    a = bind_args("batch_norm", names, {"weight": None, "bias": None, "training": False, "momentum": 0.1,
                                         "eps": 1e-5}, args, kwargs)
    x = a["input"]
    rm, rv, w, b = a["running_mean"], a["running_var"], a["weight"], a["bias"]
    _plain("batch_norm", running_mean=rm, running_var=rv, weight=w, bias=b)
    if not isinstance(x, SpatialTensor):
        raise context.unsupported("batch_norm", "a sharded tensor as a secondary argument")
    _check_channel_layout(x, "batch_norm")
    spec, loc = x._spec, x._local
    if not a["training"] and rm is not None and rv is not None:
        # eval mode with running statistics: per pixel, no communication
        return wrap(F.batch_norm(loc, rm, rv, w, b, False, a["momentum"], a["eps"]), spec)
    F._verify_batch_size(x.shape)  # same ValueError as on one device, from the global shape
    dims = (0,) + tuple(range(2, x.dim()))
    count = x.numel() // x.shape[1]
    y, mean, ssd = normalize(loc.to(_stat_dtype(loc)), dims, count, a["eps"], spec.mesh)
    y = _affine(y, w, b).to(loc.dtype)
    momentum = a["momentum"] if a["momentum"] is not None else 0.0
    with torch.no_grad():
        if rm is not None:
            rm.mul_(1 - momentum).add_(mean.reshape(-1).to(rm.dtype), alpha=momentum)
        if rv is not None:
            rv.mul_(1 - momentum).add_((ssd.reshape(-1) / (count - 1)).to(rv.dtype), alpha=momentum)
    return wrap(y, spec)


def _group_stats_norm(x: SpatialTensor, groups: int, eps: float, op: str):
    """Normalise per (sample, group) over the group's channels and the whole scene.
    Returns (normalised local tile, group mean (B, G), unbiased group var (B, G))."""
    _check_channel_layout(x, op)
    loc = x._local
    B, C = loc.shape[0], loc.shape[1]
    if C % groups:
        raise SPIMError(f"{context.where()}: {op}: {C} channels are not divisible by num_groups={groups}")
    t = loc.to(_stat_dtype(loc)).reshape(B, groups, C // groups, -1)
    count = (C // groups) * (x.numel() // (x.shape[0] * C))
    y, mean, ssd = normalize(t, (2, 3), count, eps, x._spec.mesh)
    y = y.reshape(loc.shape)
    unbiased = ssd / (count - 1) if count > 1 else torch.full_like(ssd, float("nan"))
    return y, mean.reshape(B, groups), unbiased.reshape(B, groups)


@register(F.group_norm)
def _group_norm(func, args, kwargs):
    names = ("input", "num_groups", "weight", "bias", "eps")
    a = bind_args("group_norm", names, {"weight": None, "bias": None, "eps": 1e-5}, args, kwargs)
    x, w, b = a["input"], a["weight"], a["bias"]
    _plain("group_norm", weight=w, bias=b)
    if not isinstance(x, SpatialTensor):
        raise context.unsupported("group_norm", "a sharded tensor as a secondary argument")
    G = int(a["num_groups"])
    if x.dim() >= 2 and G > 0 and x.shape[1] % G == 0:
        F._verify_batch_size([x.shape[0] * x.shape[1] // G, G] + list(x.shape[2:]))
    y, _, _ = _group_stats_norm(x, G, a["eps"], "group_norm")
    return wrap(_affine(y, w, b).to(x.dtype), x._spec)


@register(F.instance_norm)
def _instance_norm(func, args, kwargs):
    names = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
    a = bind_args("instance_norm", names, {"running_mean": None, "running_var": None, "weight": None,
                                            "bias": None, "use_input_stats": True, "momentum": 0.1,
                                            "eps": 1e-5}, args, kwargs)
    x = a["input"]
    rm, rv, w, b = a["running_mean"], a["running_var"], a["weight"], a["bias"]
    _plain("instance_norm", running_mean=rm, running_var=rv, weight=w, bias=b)
    if not isinstance(x, SpatialTensor):
        raise context.unsupported("instance_norm", "a sharded tensor as a secondary argument")
    _check_channel_layout(x, "instance_norm")
    if not a["use_input_stats"]:
        return wrap(F.instance_norm(x._local, rm, rv, w, b, False, a["momentum"], a["eps"]), x._spec)
    F._verify_spatial_size(x.shape)
    y, mean, var = _group_stats_norm(x, x.shape[1], a["eps"], "instance_norm")
    m = a["momentum"] if a["momentum"] is not None else 0.0
    with torch.no_grad():
        # torch runs batch norm on (1, B*C, ...) with the running stats repeated B
        # times, then stores the mean over B of the updated copies
        if rm is not None:
            rm.copy_(((1 - m) * rm.unsqueeze(0) + m * mean.to(rm.dtype)).mean(0))
        if rv is not None:
            rv.copy_(((1 - m) * rv.unsqueeze(0) + m * var.to(rv.dtype)).mean(0))
    return wrap(_affine(y, w, b).to(x.dtype), x._spec)


def _last_dims_norm(func, args, kwargs, op, names, defaults):
    a = bind_args(op, names, defaults, args, kwargs)
    x = a["input"]
    _plain(op, weight=a.get("weight"), bias=a.get("bias"))
    if not isinstance(x, SpatialTensor):
        raise context.unsupported(op, "a sharded tensor as a secondary argument")
    shape = a["normalized_shape"]
    k = 1 if isinstance(shape, int) else len(shape)
    covered = set(range(x.dim() - k, x.dim()))
    if covered & set(x._spec.dims):
        raise context.unsupported(
            op, f"normalized_shape {tuple([shape] if isinstance(shape, int) else shape)} covers the sharded "
            f"dims {x._spec.dims} of the global shape {tuple(x.shape)}; normalise over channels "
            f"(channels-last after a permute) instead")
    local_args = {n: a[n] for n in names if n != "input"}
    return wrap(func(x._local, **local_args), x._spec)


@register(F.layer_norm)
def _layer_norm(func, args, kwargs):
    return _last_dims_norm(F.layer_norm, args, kwargs, "layer_norm",
                           ("input", "normalized_shape", "weight", "bias", "eps"),
                           {"weight": None, "bias": None, "eps": 1e-5})


@register(getattr(F, "rms_norm", None))
def _rms_norm(func, args, kwargs):
    return _last_dims_norm(F.rms_norm, args, kwargs, "rms_norm",
                           ("input", "normalized_shape", "weight", "eps"), {"weight": None, "eps": None})
