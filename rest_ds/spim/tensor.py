"""``SpatialTensor``: a tensor sharded over the sp grid along two of its dims.

Why a tensor subclass (and not module replacement): third-party forward methods
compute sizes from ``x.shape`` and call functionals (``F.interpolate(size=...)``,
``F.adaptive_avg_pool2d``, ``x.mean((2, 3))``). A tensor that reports its *global*
shape lets that code run unmodified and still mean what it meant on one device,
and every torch call on it passes through ``__torch_function__``, where SPIM
either runs the op exactly (local compute plus the exchange the op needs) or
refuses it by name. Nothing is silently computed on a tile as if the tile were
the scene. (PhysicsNeMo's ShardTensor takes the same route.)

The subclass is a wrapper: it owns no storage, its ``shape`` is the global shape
and ``_local`` holds this rank's tile as an ordinary tensor. Autograd runs on
the local tensors; the wrapper never reaches the dispatcher.

Contract of a handler: ``handler(func, args, kwargs)`` receives the original
arguments (SpatialTensors included), computes on ``_local`` tensors only, and
returns plain tensors (replicated results) or SpatialTensors.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from types import GetSetDescriptorType
from typing import Callable

import torch

from . import context
from .errors import SPIMError
from .mesh import SpatialMesh
from .tiling import Partition


@dataclass(frozen=True)
class Spec:
    """Sharding of one tensor over the grid of ``mesh``.

    ``rows``/``cols`` are the global partitions of the (pixel or token) grid.
    ``dims`` says where that grid lives in the tensor:

    * two dims ``(row dim, col dim)``: *grid layout* (an image or feature map);
    * one dim ``(token dim,)``: *token layout*, ``(lead, H, W, trail)``
      flattened row-major into one dim of global size
      ``prefix + lead * H * W * trail``; locally ``lead x tile x trail`` in the
      same order, after ``prefix`` replicated tokens (class/register tokens of
      a ViT), which every rank holds and computes identically. ``lead`` is a
      dim merged in front of the grid (time steps of a video ViT, the batch of
      a window partition), ``trail`` one merged behind it (attention heads).
    """

    mesh: SpatialMesh
    dims: tuple[int, ...]
    rows: Partition
    cols: Partition
    prefix: int = 0
    lead: int = 1
    trail: int = 1

    @property
    def is_tokens(self) -> bool:
        return len(self.dims) == 1

    def tile_tokens(self, sp_index: int) -> int:
        """Token count of sp rank ``sp_index`` (prefix excluded): lead x tile area x trail."""
        r, c = divmod(sp_index, self.mesh.grid[1])
        return self.lead * (self.rows[r + 1] - self.rows[r]) * (self.cols[c + 1] - self.cols[c]) * self.trail

    def token_counts(self) -> list[int]:
        return [self.tile_tokens(i) for i in range(self.mesh.sp)]

    def __post_init__(self):
        # the global sizes of ``dims``, once per Spec (a pure function of its fields; every
        # wrap needs them); not a field, so equality, hashing and replace() ignore it
        H, W = self.rows[-1], self.cols[-1]
        object.__setattr__(self, "_global_sizes", (self.prefix + self.lead * H * W * self.trail,)
                           if len(self.dims) == 1 else (H, W))

    def global_sizes(self) -> tuple[int, ...]:
        """Global sizes of ``dims``."""
        return self._global_sizes

    def local_sizes(self) -> tuple[int, ...]:
        (r0, r1), (c0, c1) = self.row_range, self.col_range
        if self.is_tokens:
            return (self.prefix + self.tile_tokens(self.mesh.sp_index),)
        return (r1 - r0, c1 - c0)

    @property
    def global_hw(self) -> tuple[int, int]:
        return self.rows[-1], self.cols[-1]

    @property
    def row_range(self) -> tuple[int, int]:
        r = self.mesh.coord[0]
        return self.rows[r], self.rows[r + 1]

    @property
    def col_range(self) -> tuple[int, int]:
        c = self.mesh.coord[1]
        return self.cols[c], self.cols[c + 1]

    def with_dims(self, dims) -> "Spec":
        # the constructor, not dataclasses.replace (which inspects the fields on every call:
        # ~3x slower, and permutes/reshapes call this on every op)
        dims = tuple(int(d) for d in dims)
        if dims == self.dims:
            return self
        return Spec(self.mesh, dims, self.rows, self.cols, self.prefix, self.lead, self.trail)

    def same_layout(self, other: "Spec") -> bool:
        return self is other or (
            self.dims == other.dims and self.rows == other.rows and self.cols == other.cols
            and self.prefix == other.prefix and self.lead == other.lead and self.trail == other.trail)


_HANDLERS: dict[Callable, Callable] = {}
_GETSET: dict[str, Callable] = {}


def register(*funcs):
    """Register a handler for one or more torch callables (missing ones skipped).

    One rule per op: a callable that already has a handler (from an earlier
    ``register``) raises ``SPIMError`` at import, naming both handlers, so two
    modules can never silently disagree on what an op does (the later one used
    to win). Aliases of one callable within one call (``F.conv2d is
    torch.conv2d``) count once."""

    def deco(fn):
        for f in dict.fromkeys(f for f in funcs if f is not None):
            old = _HANDLERS.get(f)
            if old is not None:
                raise SPIMError(
                    f"internal: {op_name(f)} has two SPIM rules: {old.__module__}.{old.__qualname__} and "
                    f"{fn.__module__}.{fn.__qualname__} (keep exactly one)")
            _HANDLERS[f] = fn
        return fn

    return deco


def funcs_named(*names: str, owners=None) -> list:
    """``torch.X``, ``torch.Tensor.X``, ``F.X``, ``torch.special.X`` for each name that exists."""
    owners = owners or (torch, torch.Tensor, torch.nn.functional, torch.special, torch._C._nn)
    out = []
    for n in names:
        for o in owners:
            f = getattr(o, n, None)
            if f is not None and callable(f):
                out.append(f)
    return out


_OP_NAMES: dict = {}


def op_name(func) -> str:
    # a pure function of the callable, asked by op rules on every call (for their errors):
    # remembered for the first few thousand callables
    try:
        return _OP_NAMES[func]
    except (KeyError, TypeError):
        pass
    owner = getattr(func, "__objclass__", None) or getattr(func, "__self__", None)
    name = getattr(func, "__name__", repr(func))
    if owner is not None and hasattr(owner, "__name__"):
        out = f"{owner.__name__}.{name}"
    else:
        mod = getattr(func, "__module__", None) or "torch"
        out = f"{mod}.{name}"
    try:
        if len(_OP_NAMES) < 4096:
            _OP_NAMES[func] = out
    except TypeError:  # an unhashable callable
        pass
    return out


class SpatialTensor(torch.Tensor):
    """A tensor whose dims ``spec.dims`` are split over the sp grid."""

    _local: torch.Tensor
    _spec: Spec

    @staticmethod
    def __new__(cls, local: torch.Tensor, spec: Spec):
        shape = list(local.shape)
        for d, n in zip(spec.dims, spec._global_sizes):
            shape[d] = n
        shape = torch.Size(shape)
        r = torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=local.dtype, device=local.device, requires_grad=False
        )
        r._local = local
        r._spec = spec
        r._shape = shape
        context.note_layout(spec.rows, spec.cols)  # for resampling to this size (ops/resample.py)
        return r

    def __init__(self, local: torch.Tensor, spec: Spec):
        pass

    # --- public API -------------------------------------------------------
    def to_local(self) -> torch.Tensor:
        """This rank's tile (differentiable: gradients flow back to the tile)."""
        return self._local

    @property
    def spec(self) -> Spec:
        return self._spec

    @property
    def mesh(self) -> SpatialMesh:
        return self._spec.mesh

    # The global shape and rank, read without a dispatch: model code and the op rules ask
    # for them all the time (~400 times in a step of the main job's model), and the
    # inherited getters would each go through __torch_function__ (and the run's torch
    # function modes). The same values: a wrapper's sizes are fixed when it is made, and
    # its rank is its tile's. (torch.Tensor.dim(x) and the like still dispatch.)
    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def ndim(self) -> int:
        return len(self._shape)

    def dim(self) -> int:
        return len(self._shape)

    ndimension = dim

    # --- dispatch ---------------------------------------------------------
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise context.unsupported(
            str(func), "it reached the dispatcher without a SPIM rule (operate on .to_local() "
            "explicitly if you mean the tile)"
        )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # the common case first: a registered op (an attribute's getter, a method-wrapper
        # bound to its descriptor, is never a key of _HANDLERS)
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(func, args, kwargs or {})
        owner = getattr(func, "__self__", None)
        if type(owner) is GetSetDescriptorType:
            getter = _GETSET.get(owner.__name__)
            if getter is None:
                raise context.unsupported(f"attribute Tensor.{owner.__name__}", "no SPIM rule for this attribute")
            return getter(args[0], owner)
        raise context.unsupported(
            op_name(func),
            "no exact sharded rule for this op on a spatially sharded tensor "
            "(use rest_ds.spim.gather() or .to_local() explicitly if you know what the tile means)",
        )

    def __repr__(self, *, tensor_contents=None):  # noqa: D105
        s = self._spec
        return (
            f"SpatialTensor(global_shape={tuple(self.shape)}, dims={s.dims}, grid={s.mesh.grid}, "
            f"tile rows {s.row_range} cols {s.col_range}, local=\n{self._local!r})"
        )


def is_spatial(x) -> bool:
    return isinstance(x, SpatialTensor)


def local(x):
    return x._local if isinstance(x, SpatialTensor) else x


def wrap(t: torch.Tensor, spec: Spec) -> SpatialTensor:
    return SpatialTensor(t, spec)


def tree_local(obj):
    if isinstance(obj, SpatialTensor):
        return obj._local
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_local(o) for o in obj) if not hasattr(obj, "_fields") else type(obj)(*[tree_local(o) for o in obj])
    if isinstance(obj, dict):
        return {k: tree_local(v) for k, v in obj.items()}
    return obj


def first_spatial(args, kwargs=None) -> SpatialTensor:
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, SpatialTensor):
            return a
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, SpatialTensor):
                    return b
    raise SPIMError("internal: no SpatialTensor among the arguments")


# --- attribute getters -----------------------------------------------------
def _global_attr(x, desc):
    with torch._C.DisableTorchFunctionSubclass():
        return desc.__get__(x)


def _local_attr(x, desc):
    return desc.__get__(x._local)


for _n in ("shape", "ndim", "dtype", "device", "layout", "is_cuda", "is_cpu", "is_sparse", "is_quantized",
           "is_meta", "is_mps", "is_xpu", "is_nested", "is_mkldnn", "names", "itemsize", "nbytes"):
    _GETSET[_n] = _global_attr
for _n in ("requires_grad", "grad_fn", "is_leaf", "grad", "_version", "output_nr", "_base", "retains_grad"):
    _GETSET[_n] = _local_attr


def _set_requires_grad(x, desc):  # pragma: no cover - setter goes through __set__, not here
    raise SPIMError("set requires_grad on the local tile")


@register(torch.Tensor.size)
def _size(func, args, kwargs):
    x = args[0]
    with torch._C.DisableTorchFunctionSubclass():
        return torch.Tensor.size(x, *args[1:], **kwargs)


@register(torch.Tensor.dim, torch.Tensor.ndimension, torch.Tensor.numel, torch.Tensor.nelement,
          torch.Tensor.element_size, torch.Tensor.is_floating_point, torch.Tensor.is_complex,
          torch.Tensor.get_device, torch.numel, torch.is_floating_point, torch.is_complex,
          torch.Tensor.__len__, torch.Tensor.__hash__)
def _global_meta(func, args, kwargs):
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


@register(torch.Tensor.is_contiguous, torch.Tensor.data_ptr, torch.Tensor.stride, torch.Tensor.storage_offset,
          torch.Tensor.register_hook, torch.Tensor.retain_grad, torch.is_grad_enabled)
def _local_meta(func, args, kwargs):
    return func(*tree_local(args), **tree_local(kwargs))


@register(torch.Tensor.__format__)
def _format(func, args, kwargs):
    return repr(args[0]) if not args[1] else format(args[0]._local, args[1])


@register(torch.Tensor.__repr__, torch.Tensor.__str__)
def _repr(func, args, kwargs):
    return SpatialTensor.__repr__(args[0])


@register(torch.Tensor.backward)
def _backward(func, args, kwargs):
    x = args[0]
    grad = args[1] if len(args) > 1 else kwargs.pop("gradient", None)
    if grad is None and x._local.numel() != 1:
        raise SPIMError("backward() of a non-scalar SpatialTensor needs a gradient")
    return torch.Tensor.backward(x._local, local(grad), *args[2:], **kwargs)


@register(torch.Tensor.requires_grad_)
def _requires_grad_(func, args, kwargs):
    args[0]._local.requires_grad_(*args[1:], **kwargs)
    return args[0]


# --- custom autograd Functions ------------------------------------------------
# ``torch.autograd.Function.apply`` does not dispatch through
# ``__torch_function__``: a user's Function applied to a SpatialTensor would run
# its forward on the wrapper (under no_grad) and return a result detached from
# the tile's graph, so every gradient before it would silently be missing. SPIM
# cannot know what such a Function computes, so it refuses by name, on every
# rank alike (the check depends only on the arguments' types). The guard is
# installed only while a parallelized forward runs (FUNCTION_GUARD, entered with
# the model's run, context.SPIMRun): importing SPIM leaves torch untouched.
_FUNCTION_APPLY = torch._C._FunctionBase.__dict__["apply"]


def _any_spatial(obj) -> bool:
    if isinstance(obj, SpatialTensor):
        return True
    if isinstance(obj, dict):
        obj = obj.values()
    elif not isinstance(obj, (list, tuple)):
        return False
    # a loop, recursing only into containers: Function.apply's arguments are mostly
    # tensors and numbers, and this runs on every apply inside a parallelized forward
    for o in obj:
        if isinstance(o, SpatialTensor) or (isinstance(o, (list, tuple, dict)) and _any_spatial(o)):
            return True
    return False


def _guarded_apply(cls, *args, **kwargs):
    if _any_spatial(args) or (kwargs and _any_spatial(kwargs)):
        hint = (" (reentrant activation checkpointing: use torch.utils.checkpoint.checkpoint(..., "
                "use_reentrant=False), which SPIM replays exactly)" if cls.__name__ == "CheckpointFunction" else "")
        raise context.unsupported(
            f"torch.autograd.Function {cls.__module__}.{cls.__qualname__}",
            "a custom autograd.Function on a spatially sharded tensor would be detached from the tile's "
            "autograd graph; apply it to the tile (x.to_local(), rewrapped with rest_ds.spim.from_local) "
            f"if it acts per pixel, or write it with torch ops{hint}")
    return _FUNCTION_APPLY.__get__(None, cls)(*args, **kwargs)


class _FunctionGuard:
    """``torch.autograd.Function.apply`` replaced by the guard while at least one
    parallelized forward runs in this process (any thread), the original put back
    when the last one leaves. The count is process-wide because the patched class
    attribute is; ``acquire``/``release`` are balanced by parallelize's hooks."""

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0
        self._saved = None      # what Function.__dict__["apply"] held before acquire
        self._installed = None  # the classmethod put in its place

    def acquire(self) -> None:
        with self._lock:
            self._active += 1
            if self._active == 1:
                cur = torch.autograd.Function.__dict__.get("apply")
                # only the stock apply is wrapped: another library's replacement is left alone
                if cur is _FUNCTION_APPLY:
                    self._saved, self._installed = cur, classmethod(_guarded_apply)
                    torch.autograd.Function.apply = self._installed

    def release(self) -> None:
        with self._lock:
            self._active = max(0, self._active - 1)
            if self._active == 0 and self._installed is not None:
                if torch.autograd.Function.__dict__.get("apply") is self._installed:
                    torch.autograd.Function.apply = self._saved
                self._saved = self._installed = None

    def __enter__(self) -> "_FunctionGuard":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def active(self) -> bool:
        return self._active > 0


FUNCTION_GUARD = _FunctionGuard()
