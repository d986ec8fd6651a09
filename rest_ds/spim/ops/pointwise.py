"""Elementwise ops: local on every tile, no communication.

Operands must share one tile layout. A plain (replicated) operand broadcasts as
usual when its spatial extent is 1; when it has the full *global* spatial extent
(e.g. a positional embedding of the whole scene) each rank uses its tile of it,
so the gradient that reaches it is this tile's part (partial, see comm.py).
"""
from __future__ import annotations

import functools

import torch

from .. import context, halo
from ..errors import SPIMError
from ..tensor import SpatialTensor, Spec, funcs_named, op_name, register, wrap
from .. import rng
from ..tokens import tile_of_full

UNARY = (
    "abs neg negative exp exp2 expm1 log log2 log10 log1p sqrt rsqrt sigmoid logsigmoid tanh relu relu6 gelu silu "
    "mish hardswish hardsigmoid hardtanh leaky_relu elu selu celu softplus softsign tanhshrink softshrink "
    "hardshrink threshold clamp clamp_min clamp_max clip pow square reciprocal sin cos tan erf erfc floor ceil "
    "round trunc frac sign sgn logical_not isnan isinf isfinite nan_to_num bitwise_not float_power xlogy "
    "prelu logit"
).split()
BINARY = (
    "add sub subtract rsub mul multiply div divide true_divide floor_divide remainder fmod maximum minimum fmax fmin "
    "eq ne lt le gt ge greater less greater_equal less_equal equal_ where lerp addcmul addcdiv logical_and logical_or "
    "logical_xor bitwise_and bitwise_or bitwise_xor masked_fill hypot atan2 copysign heaviside"
).split()
DUNDER = (
    "__add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__ __rtruediv__ "
    "__itruediv__ __div__ __floordiv__ __rfloordiv__ __ifloordiv__ __mod__ __rmod__ __neg__ __pos__ __abs__ "
    "__pow__ __rpow__ __ipow__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ __and__ __rand__ __iand__ __or__ "
    "__ror__ __ior__ __xor__ __rxor__ __ixor__ __invert__"
).split()
CAST = (
    "contiguous clone detach float double half bfloat16 int long bool to type_as cpu cuda type"
).split()

_INPLACE_DUNDER = {n for n in DUNDER if n.startswith("__i") and n not in ("__invert__",)}


def _names_with_inplace(names):
    out = []
    for n in names:
        out += [n, n + "_"]
    return out


def align_plain(p: torch.Tensor, ndim: int, spec: Spec, op: str) -> torch.Tensor:
    """This rank's view of a plain operand broadcast against a sharded one."""
    lead = ndim - p.dim()
    (r0, r1), (c0, c1) = spec.row_range, spec.col_range
    H, W = spec.global_hw
    if spec.is_tokens:
        pd = spec.dims[0] - lead
        if pd < 0 or p.shape[pd] == 1:
            return p
        n = spec.global_sizes()[0]
        if p.shape[pd] != n:
            raise context.unsupported(
                op, f"operand of shape {tuple(p.shape)} does not broadcast against the global shape "
                f"({n} tokens on dim {spec.dims[0]})")
        return tile_of_full(p, pd, spec)
    for d, (lo, hi, n) in zip(spec.dims, ((r0, r1, H), (c0, c1, W))):
        pd = d - lead
        if pd < 0 or p.shape[pd] == 1:
            continue
        if p.shape[pd] != n:
            raise context.unsupported(
                op, f"operand of shape {tuple(p.shape)} does not broadcast against the global shape "
                f"(spatial extent {n} on dim {d})"
            )
        p = p.narrow(pd, lo, hi - lo)
    return p


def _relayoutable(a: Spec, spec: Spec) -> bool:
    """Grid layouts of one map that differ only in where the tile borders fall (same
    dims, mesh, grid and scene size): ``a``'s tiles can be moved onto ``spec``'s."""
    return (not a.is_tokens and not spec.is_tokens and a.dims == spec.dims and a.mesh is spec.mesh
            and (a.rows != spec.rows or a.cols != spec.cols) and len(a.rows) == len(spec.rows)
            and len(a.cols) == len(spec.cols) and a.rows[-1] == spec.rows[-1] and a.cols[-1] == spec.cols[-1])


def localize(args, kwargs, spec: Spec, ndim: int, op: str):
    """Replace SpatialTensors by their tiles and slice full-extent plain tensors."""

    def conv(a):
        if isinstance(a, SpatialTensor):
            if not a._spec.same_layout(spec) or a.dim() != ndim:
                if a.dim() == ndim and _relayoutable(a._spec, spec):  # off the common path: layouts differ
                    return halo.relayout(a._local, spec.mesh, a._spec.rows, a._spec.cols, spec.rows, spec.cols,
                                         spec.dims, op)
                raise context.unsupported(
                    op, f"operands have different tile layouts or ranks (dims {a._spec.dims} vs {spec.dims}, "
                    f"rows {a._spec.rows} vs {spec.rows}, cols {a._spec.cols} vs {spec.cols})"
                )
            return a._local
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return align_plain(a, ndim, spec, op)
        if isinstance(a, (list, tuple)) and any(isinstance(b, torch.Tensor) for b in a):
            return type(a)(conv(b) for b in a)
        return a

    return [conv(a) for a in args], {k: conv(v) for k, v in kwargs.items()}


@functools.lru_cache(maxsize=1024)  # a pure function of the callable, asked on every call of the commonest rule
def _inplace_name(func) -> bool:
    name = getattr(func, "__name__", "")
    return name.endswith("_") and not name.endswith("__") or name in _INPLACE_DUNDER


def _pointwise(func, args, kwargs):
    op = op_name(func)
    if kwargs.get("out") is not None:
        raise context.unsupported(op, "out= is not supported on sharded tensors")
    operands = (*args, *kwargs.values()) if kwargs else args
    spec, ndim = None, None
    for a in operands:  # the first sharded operand's layout, the largest rank of all tensors
        if isinstance(a, torch.Tensor):
            if spec is None and isinstance(a, SpatialTensor):
                spec = a._spec
            n = a.dim()
            if ndim is None or n > ndim:
                ndim = n
    if spec is None:
        raise SPIMError(f"internal: {op}: the elementwise rule was called without a sharded operand")
    inplace = _inplace_name(func) or kwargs.get("inplace", False)
    if inplace and not isinstance(args[0], SpatialTensor):
        raise context.unsupported(op, "an in-place op on a replicated tensor with a sharded operand")
    # the common case without localize(): operands of this very layout and rank, and scalars
    largs = []
    for a in args:
        if isinstance(a, SpatialTensor) and a._spec is spec and a.dim() == ndim:
            largs.append(a._local)
        elif isinstance(a, (torch.Tensor, list, tuple)):
            break
        else:
            largs.append(a)
    if len(largs) == len(args) and not kwargs:
        lkwargs = kwargs
    else:
        largs, lkwargs = localize(args, kwargs, spec, ndim, op)
    out = func(*largs, **lkwargs)
    if inplace:
        args[0]._local = out if isinstance(out, torch.Tensor) else args[0]._local
        return args[0]
    if isinstance(out, torch.Tensor):
        if out.dim() != ndim:
            raise SPIMError(f"internal: elementwise {op} changed the rank of its output")
        return wrap(out, spec)
    return out


register(*funcs_named(*_names_with_inplace(UNARY + BINARY)), *funcs_named(*DUNDER, owners=(torch.Tensor,)))(_pointwise)

# Random ops (dropout and its variants, rrelu, bernoulli, uniform_, normal_,
# rand_like, ...): grid-invariant values from (seed, global element index), or a
# refusal by name for random ops without such a rule (rng.py).
register(*(rng.RANDOM_FUNCS | rng.GRID_INVARIANT_FUNCS))(rng.random_op)


@register(*funcs_named(*CAST, owners=(torch.Tensor,)))
def _cast(func, args, kwargs):
    """Dtype/device/copy methods: applied to the tile; other tensors only give a dtype/device."""
    x = args[0]
    rest = [a._local if isinstance(a, SpatialTensor) else a for a in args[1:]]
    out = func(x._local, *rest, **kwargs)
    return wrap(out, x._spec) if isinstance(out, torch.Tensor) else out
