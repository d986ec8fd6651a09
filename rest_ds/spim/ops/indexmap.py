"""Rearrangements that pass through layouts SPIM cannot shard.

Some models move data through an intermediate that mixes the sharded grid
with other dims and come back to a shardable layout a few ops later: the
relative-to-absolute trick of relative position logits (BoTNet's
``PosEmbedRel``: ``(B, H, W, 2W-1) -> (B H, W, 2W-1)``, pad, flatten, pad,
reshape, slice, ``-> (B, H, W, W)``) is a skew in which every query row keeps
its own values, but no single op of it keeps the grid whole.

Rule (exact): a reshape of a grid-layout tensor that would mix or cut the
sharded dims does not refuse at once; it returns an :class:`IndexMapped`
tensor, the source tensor plus the *global index map* of the rearrangement
(for every element of the global result, the flat global index of its source
element, ``-1`` for zero padding). Pure data-movement ops on it (reshape,
view, flatten, unflatten, permute, transpose, (un)squeeze, expand, basic
indexing, zero ``F.pad``, contiguous, clone) apply to the index map. Any other
op, and the end of the module's forward that made it, *materializes* it: it is
a grid-layout tensor again when two of its dims hold the source grid
position for position (the element at grid position (r, c) came from the
source's (r, c), or is padding), and then each rank gathers its tile from its
own source tile (autograd: an index into the tile, whose backward adds the
gradients back). Otherwise the reshape's refusal is raised, naming the module
and the op as before. Every rank builds the same global index map (integer
work, no communication), limited to :data:`MAX_ELEMENTS` elements.
"""
from __future__ import annotations

import itertools
import math
from types import GetSetDescriptorType

import torch
import torch.nn.functional as F

from .. import tensor as _tensor
from ..errors import SPIMError
from ..tensor import SpatialTensor, Spec, wrap

# the global index map is built on every rank (int64): a rearrangement of a larger
# tensor is refused as before instead of allocating it
MAX_ELEMENTS = 1 << 22

_META = (_tensor._size, _tensor._global_meta)


def index_mapped(x: SpatialTensor, new_shape, error: SPIMError):
    """``x.reshape(new_shape)`` as an :class:`IndexMapped` (``x`` in grid layout),
    or ``error`` raised when ``x`` is not in grid layout or too large to track."""
    if x._spec.is_tokens or x.numel() > MAX_ELEMENTS:
        raise error
    idx = torch.arange(x.numel(), device=x._local.device).reshape(tuple(x.shape)).reshape(tuple(new_shape))
    return IndexMapped(x, idx, error)


def _moves():
    T = torch.Tensor
    return {T.reshape, T.view, torch.reshape, T.flatten, torch.flatten, T.unflatten, torch.unflatten, T.permute,
            torch.permute, T.transpose, torch.transpose, T.swapaxes, T.swapdims, T.unsqueeze, torch.unsqueeze,
            T.squeeze, torch.squeeze, T.expand, T.contiguous, T.clone, torch.clone, T.__getitem__, T.movedim,
            torch.movedim}


_MOVES = _moves()
_PAD = {F.pad} | ({torch._C._nn.pad} if hasattr(torch._C._nn, "pad") else set())


class IndexMapped(SpatialTensor):
    """A rearrangement of the grid-layout SpatialTensor ``_src`` in a layout that
    mixes or cuts its sharded dims: ``_idx`` (global shape) holds each element's
    flat global index in ``_src`` (-1: zero padding). Its ``_local`` and
    ``_spec`` are those of its materialization (module docstring), which raises
    ``_error`` where the layout is not a grid layout again."""

    @staticmethod
    def __new__(cls, src: SpatialTensor, idx: torch.Tensor, error: SPIMError):
        r = torch.Tensor._make_wrapper_subclass(cls, idx.shape, dtype=src.dtype, device=src.device,
                                                requires_grad=False)
        r._src, r._idx, r._error, r._shape, r._done = src, idx, error, idx.shape, None
        return r

    def __init__(self, *args, **kwargs):
        pass

    @property
    def _local(self) -> torch.Tensor:
        return self.materialize()._local

    @property
    def _spec(self) -> Spec:
        return self.materialize()._spec

    def materialize(self) -> SpatialTensor:
        """The grid-layout SpatialTensor this rearrangement is, or the reshape's refusal."""
        if self._done is None:
            self._done = _materialize(self._src, self._idx, self._error)
        return self._done

    def __repr__(self, *, tensor_contents=None):  # noqa: D105
        return f"IndexMapped(global_shape={tuple(self._shape)}, of {SpatialTensor.__repr__(self._src)})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else None
        if _tensor._HANDLERS.get(func) in _META or type(getattr(func, "__self__", None)) is GetSetDescriptorType:
            # sizes and attributes: the global ones of the wrapper (those of the tile materialize it)
            return SpatialTensor.__torch_function__(func, types, args, kwargs)
        if isinstance(x, IndexMapped) and (func in _MOVES or func in _PAD):
            moved = _move(func, x, args[1:], kwargs)
            if moved is not None:
                return moved
        return func(*_settled(args), **_settled(kwargs))


def _move(func, x: IndexMapped, rest, kwargs):
    """``func`` applied to the index map (None: not a pure move, materialize)."""
    if any(isinstance(a, torch.Tensor) for a in list(rest) + list(kwargs.values())):
        return None  # tensor indices, expand_as-like arguments: not tracked
    if func in _PAD:
        a = dict(zip(("pad", "mode", "value"), rest))
        a.update(kwargs)
        if (a.get("mode") or "constant") != "constant" or (a.get("value") or 0.0) != 0.0:
            return None
        return IndexMapped(x._src, F.pad(x._idx, list(a["pad"]), value=-1), x._error)
    if func is torch.Tensor.__getitem__:
        index = rest[0] if isinstance(rest[0], tuple) else (rest[0],)
        if not all(i is None or isinstance(i, (int, slice, type(Ellipsis))) for i in index):
            return None
    if func in (torch.Tensor.view, torch.Tensor.reshape) and any(isinstance(s, torch.dtype) for s in rest):
        return None
    return IndexMapped(x._src, func(x._idx, *rest, **kwargs), x._error)


def settle(out):
    """``out`` with every :class:`IndexMapped` in it (itself, or in a tuple, list
    or dict) materialized, or None when it holds none (a module's output as a
    forward hook returns it: what a module returns is never an index map)."""
    return _settled(out) if _has(out) else None


def _has(obj) -> bool:
    if isinstance(obj, IndexMapped):
        return True
    if isinstance(obj, (list, tuple)):
        return any(_has(o) for o in obj)
    if isinstance(obj, dict):
        return any(_has(v) for v in obj.values())
    return False


def _settled(obj):
    if isinstance(obj, IndexMapped):
        return obj.materialize()
    if not _has(obj):
        return obj
    if isinstance(obj, (list, tuple)):
        vals = [_settled(o) for o in obj]
        return type(obj)(*vals) if hasattr(obj, "_fields") else type(obj)(vals)
    for k, v in obj.items():  # a dict (a fresh output, a ModelOutput, kwargs): in place, keeps its type
        obj[k] = _settled(v)
    return obj


def _materialize(src: SpatialTensor, idx: torch.Tensor, error: SPIMError) -> SpatialTensor:
    spec = src._spec
    shape = tuple(src.shape)
    strides = [math.prod(shape[k + 1:]) for k in range(len(shape))]
    g0, g1 = spec.dims
    H, W = spec.global_hw
    valid = idx >= 0
    safe = idx.clamp_min(0)
    row, col = safe // strides[g0] % H, safe // strides[g1] % W
    nd = idx.dim()
    for i, j in itertools.permutations(range(nd), 2):
        if idx.shape[i] != H or idx.shape[j] != W:
            continue
        pi = torch.arange(H, device=idx.device).view([-1 if k == i else 1 for k in range(nd)])
        pj = torch.arange(W, device=idx.device).view([-1 if k == j else 1 for k in range(nd)])
        if bool((((row == pi) & (col == pj)) | ~valid).all()):
            break
    else:
        raise error
    (r0, r1), (c0, c1) = spec.row_range, spec.col_range
    t = safe.narrow(i, r0, r1 - r0).narrow(j, c0, c1 - c0)
    v = valid.narrow(i, r0, r1 - r0).narrow(j, c0, c1 - c0)
    loc = src._local
    lstrides = [math.prod(loc.shape[k + 1:]) for k in range(loc.dim())]
    flat = torch.zeros_like(t)
    for k in range(len(shape)):
        coord = t // strides[k] % shape[k] - (r0 if k == g0 else c0 if k == g1 else 0)
        flat += coord * lstrides[k]
    vals = loc.reshape(-1)[torch.where(v, flat, 0)]
    vals = torch.where(v, vals, torch.zeros((), dtype=vals.dtype, device=vals.device))
    return wrap(vals, Spec(spec.mesh, (i, j), spec.rows, spec.cols))
