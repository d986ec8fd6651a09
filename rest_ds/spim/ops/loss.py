"""Pixel losses: ``F.cross_entropy`` and ``F.nll_loss`` over sharded logits.

Logits ``(N, K, H, W)`` are sharded over H, W; the target is ``(N, H, W)`` class
indices (or ``(N, K, H, W)`` probabilities for cross entropy) with the same tile
layout, either a SpatialTensor or a plain whole-scene tensor that each rank
slices to its tile. ``reduction='none'`` is local and sharded. ``'sum'`` and
``'mean'`` add the per-tile sums with one autograd all-reduce over the sp group;
``'mean'`` divides by the *global* normaliser torch uses: the sum of the class
weights of the non-ignored targets (their count without weights), or N*H*W for
probability targets; label smoothing follows torch's formula (its terms are
per-pixel, so the per-pixel 'none' losses summed and divided by that normaliser
are exactly torch's 'mean'). The result is replicated: the same scalar on every
rank, with the gradient convention of comm.py.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn import _reduction

from .. import context
from ..comm import all_reduce_, all_reduce_sum
from ..errors import SPIMError
from ..tensor import SpatialTensor, Spec, register, wrap
from .norm import bind_args

_CE = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
_NLL = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction")
_DEFAULTS = {"weight": None, "size_average": None, "ignore_index": -100, "reduce": None, "reduction": "mean",
             "label_smoothing": 0.0}


def _local_target(target, x: SpatialTensor, tdims: tuple[int, int], op: str) -> torch.Tensor:
    """This rank's tile of the target (sharded on ``tdims``, the logits' layout)."""
    spec = x._spec
    if isinstance(target, SpatialTensor):
        ts = target._spec
        if ts.dims != tdims or ts.rows != spec.rows or ts.cols != spec.cols:
            raise context.unsupported(
                op, f"the target's tile layout (dims {ts.dims}, rows {ts.rows}, cols {ts.cols}) differs from the "
                f"logits' (dims {tdims}, rows {spec.rows}, cols {spec.cols})")
        return target._local
    (r0, r1), (c0, c1) = spec.row_range, spec.col_range
    return target.narrow(tdims[0], r0, r1 - r0).narrow(tdims[1], c0, c1 - c0)


def _bad_classes(t: torch.Tensor, n_classes: int, ignore_index: int) -> torch.Tensor | None:
    """The mask of this tile's class indices outside [0, n_classes) that are not
    ``ignore_index``, or None when there are none (one pass when every index is
    in range, the common case without ignored pixels)."""
    if t.numel() == 0:
        return None
    lo, hi = torch.aminmax(t)
    if int(lo) >= 0 and int(hi) < n_classes:
        return None
    bad = ((t < 0) | (t >= n_classes)) & (t != ignore_index)
    return bad if bool(bad.any()) else None


def _raise_bad_classes(n_classes: int, ignore_index: int, op: str):
    raise SPIMError(f"{context.where()}: {op}: the target holds class indices outside [0, {n_classes}) "
                    f"that are not ignore_index={ignore_index}")


def _check_classes(t: torch.Tensor, n_classes: int, ignore_index: int, mesh, op: str) -> None:
    """Out-of-range class indices raise on every rank (torch would raise on the one
    rank whose tile holds them and leave the others waiting in a collective)."""
    flag = torch.tensor([0.0 if _bad_classes(t, n_classes, ignore_index) is None else 1.0], device=t.device)
    if float(all_reduce_(flag, mesh, dist.ReduceOp.MAX)[0]):
        _raise_bad_classes(n_classes, ignore_index, op)


def _pixel_loss(func, args, kwargs, op: str, names: tuple[str, ...]):
    a = bind_args(op, names, _DEFAULTS, args, kwargs)
    x, target, weight = a["input"], a["target"], a["weight"]
    if not isinstance(x, SpatialTensor):
        raise context.unsupported(op, "a sharded target with replicated logits")
    if isinstance(weight, SpatialTensor):
        raise context.unsupported(op, "a sharded class weight")
    if len(x._spec.dims) != 2 or x.dim() < 3 or min(x._spec.dims) < 2:
        raise context.unsupported(op, f"sharded dims {x._spec.dims} of logits of global shape {tuple(x.shape)} "
                                      f"(N, K, H, W sharded over the dims after K expected)")
    if a["size_average"] is not None or a["reduce"] is not None:
        reduction = _reduction.legacy_get_string(a["size_average"], a["reduce"])
    else:
        reduction = a["reduction"]
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    probs = isinstance(target, torch.Tensor) and target.is_floating_point()
    if probs and op != "cross_entropy":
        raise ValueError(f"{op}: expected class-index targets")
    expect = tuple(x.shape) if probs else tuple(x.shape[:1]) + tuple(x.shape[2:])
    if not isinstance(target, torch.Tensor) or tuple(target.shape) != expect:
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise SPIMError(f"{context.where()}: {op}: target of global shape {got} does not match logits of global "
                        f"shape {tuple(x.shape)} (expected {expect})")
    spec = x._spec
    tdims = spec.dims if probs else tuple(d - 1 for d in spec.dims)
    t = _local_target(target, x, tdims, op)
    K, ignore = x.shape[1], a["ignore_index"]
    bad = None
    if not probs:
        if reduction == "none":  # no collective follows: the check has its own
            _check_classes(t, K, ignore, spec.mesh, op)
        else:
            # the check rides on the loss's own all-reduce (one collective less per step):
            # this rank computes with its bad indices ignored, so that torch does not raise
            # here alone, and every rank raises after the all-reduce
            bad = _bad_classes(t, K, ignore)
            if bad is not None:
                t = t.masked_fill(bad, ignore)
    extra = {"label_smoothing": a["label_smoothing"]} if op == "cross_entropy" else {}
    per_pixel = func(x._local, t, weight, ignore_index=ignore, reduction="none", **extra)
    if reduction == "none":
        return wrap(per_pixel, Spec(spec.mesh, tuple(d - 1 for d in spec.dims), spec.rows, spec.cols))
    num = per_pixel.sum()
    flag = [] if probs else [torch.full((), 0.0 if bad is None else 1.0, dtype=num.dtype, device=num.device)]
    if reduction == "sum":
        total = all_reduce_sum(torch.stack([num] + flag), spec.mesh) if flag else all_reduce_sum(num, spec.mesh)
        if flag and float(total.detach()[1]):  # detached: the flag carries no gradient
            _raise_bad_classes(K, ignore, op)
        return total[0] if flag else total
    if probs:
        denom = torch.tensor(x.numel() // x.shape[1], dtype=num.dtype, device=num.device)
        return all_reduce_sum(num, spec.mesh) / denom
    if weight is None:
        den = (t != ignore).sum().to(num.dtype)
    else:
        # the class weights of the counted pixels as per-class counts (exact integers, one
        # pass; ignored pixels counted in an extra bin) times the weights: no boolean
        # indexing (nonzero + gather, ~1 ms on a 256 x 256 tile)
        idx = t.masked_fill(t == ignore, K)
        counts = torch.bincount(idx.reshape(-1), minlength=K + 1)[:K]
        den = torch.dot(counts.to(weight.dtype), weight).to(num.dtype)
    total = all_reduce_sum(torch.stack([num, den] + flag), spec.mesh)  # one collective for all
    if float(total.detach()[2]):
        _raise_bad_classes(K, ignore, op)
    return total[0] / total[1]


@register(F.cross_entropy)
def _cross_entropy(func, args, kwargs):
    return _pixel_loss(F.cross_entropy, args, kwargs, "cross_entropy", _CE)


@register(F.nll_loss)
def _nll_loss(func, args, kwargs):
    return _pixel_loss(F.nll_loss, args, kwargs, "nll_loss", _NLL)
