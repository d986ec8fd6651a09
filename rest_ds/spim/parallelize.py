"""``parallelize(model, mesh)``: make an unmodified single-device model spatially parallel.

The model is changed in place (its parameters, buffers and state-dict keys stay
as they were, so checkpoints are interchangeable with the single-device model)
and returned:

* a forward pre-hook on the root turns the first positional tensor argument, this
  rank's tile of the scene, into a :class:`SpatialTensor` (the tile sizes of all
  sp ranks are exchanged and validated);
* every op inside then runs through SPIM's rules (halo exchange, global
  statistics, ...) or is refused by name;
* modules that SPIM knows it cannot run exactly are refused up front, naming the
  module.

The SPIM state of a forward (module path for errors, attention setting, tile
layouts seen) lives in the model's own :class:`~.context.SPIMRun`, entered by
the root's hooks, so several parallelized models coexist in one process;
:func:`unparallelize` removes every hook and attribute again.

Gradients: a loss computed through SPIM ops has the same value on every sp rank.
After ``loss.backward()`` on every rank, :func:`average_gradients` (or a
data-parallel wrapper that averages over all ``dp x sp`` ranks, such as
DeepSpeed) turns the per-rank gradients into the exact single-device gradient.
"""
from __future__ import annotations

import torch
from torch import nn

from . import context
from .comm import all_reduce_
from .errors import SPIMError, SPIMUnsupportedError
from .mesh import SpatialMesh
from .ops.indexmap import settle
from . import rng
from .sharding import from_local
from .tensor import FUNCTION_GUARD, SpatialTensor

# Modules SPIM refuses outright: their result depends on the whole scene in a
# way no local rule reproduces (or they would run a second, conflicting sync).
_REFUSED: dict[type, str] = {
    nn.SyncBatchNorm: "SyncBatchNorm synchronises over its own process group; use BatchNorm2d "
                      "(SPIM computes whole-scene statistics over the sp group)",
    nn.AdaptiveMaxPool2d: "adaptive max pooling to bins is not implemented exactly",
    nn.FractionalMaxPool2d: "random pooling regions are not reproducible across tiles",
    nn.LPPool2d: "LP pooling is not implemented exactly",
    nn.LocalResponseNorm: "local response norm is not implemented",
}


def _check_module(name: str, m: nn.Module) -> None:
    where = f"module '{name or '<root>'}' ({type(m).__name__})"
    for t, why in _REFUSED.items():
        if isinstance(m, t):
            raise SPIMUnsupportedError(f"{where}: not supported by SPIM: {why}")
    if isinstance(m, nn.Conv2d) and m.padding_mode == "circular":
        raise SPIMUnsupportedError(f"{where}: not supported by SPIM: padding_mode='circular' (the scene does not wrap around)")
    if isinstance(m, nn.ConvTranspose2d):
        k, s = tuple(m.kernel_size), tuple(m.stride)
        if k != s or tuple(m.padding) != (0, 0) or tuple(m.output_padding) != (0, 0) or tuple(m.dilation) != (1, 1):
            raise SPIMUnsupportedError(
                f"{where}: not supported by SPIM: ConvTranspose2d is exact only with stride == kernel, "
                f"padding 0 (got kernel {k}, stride {s}, padding {tuple(m.padding)})")
    if isinstance(m, nn.MaxPool2d) and m.return_indices:
        raise SPIMUnsupportedError(f"{where}: not supported by SPIM: MaxPool2d(return_indices=True)")


def parallelize(model: nn.Module, mesh: SpatialMesh, *, align: int = 1,
                dims: tuple[int, int] = (-2, -1), attention: str = "auto",
                rng_seed: int | None = None) -> nn.Module:
    """Make ``model`` run spatially parallel over ``mesh``'s sp group; returns ``model``.

    Call it on every rank with identical models. Afterwards ``model(tile)``
    takes this rank's tile (``dims`` are its row/col dims; interior tile borders
    on multiples of ``align``) or a :class:`SpatialTensor`, and returns
    SpatialTensors for per-pixel outputs and plain replicated tensors for
    global ones. ``attention`` picks the sequence-parallel attention algorithm
    ('auto': Ulysses when heads % sp == 0, else all-gather of K/V; or
    'ulysses' / 'allgather'). Random ops draw from a stream shared by the sp
    group, seeded with ``rng_seed`` (default: sp rank 0's
    ``torch.initial_seed()``) plus the dp index; element-wise ones (dropout,
    DropPath's bernoulli_, rand_like, ...) are a function of that stream and each
    element's global index, so they are the same for every grid (rng.py). Raises :class:`SPIMUnsupportedError` naming the first module
    SPIM cannot run exactly."""
    from . import ops  # noqa: F401  (registers the op rules)

    if getattr(model, "_spim_mesh", None) is not None:
        raise SPIMUnsupportedError("parallelize: this model is already parallelized")
    from .attention import choose_algorithm

    choose_algorithm(mesh.sp, mesh, attention)  # validates the name
    for name, m in model.named_modules():
        _check_module(name, m)

    # entered with the run, left with it: the autograd.Function guard. (The routing of
    # replicated -> sharded resampling, PPM and image pooling, rides on rng's
    # grid-invariant mode, installed below: ops/resample.py route_replicated.)
    run = context.SPIMRun(attention, modes=(lambda: FUNCTION_GUARD,), mesh=mesh)

    def root_pre_hook(mod, args, kwargs):
        run.push("", type(mod).__name__, fresh=True)
        args = list(args)
        for i, a in enumerate(args):
            if isinstance(a, SpatialTensor):
                break
            if isinstance(a, torch.Tensor):
                args[i] = from_local(a, mesh, dims=dims, align=align)
                break
        for v in args + list(kwargs.values()):
            if isinstance(v, SpatialTensor):  # (also those made outside the run) resampling lines up with them
                context.note_layout(v._spec.rows, v._spec.cols)
        return tuple(args), kwargs

    def root_post(mod, args, out):
        try:
            return settle(out)  # never an index map out of a module (ops/indexmap.py)
        finally:
            run.pop("")

    # always_call: a forward that raises still leaves the run (and the guard)
    handles = [model.register_forward_pre_hook(root_pre_hook, with_kwargs=True),
               model.register_forward_hook(root_post, always_call=True)]
    # the sp group's stream, grid-invariant draws; its per-submodule work is done by the
    # hooks below (one pre/post pair per module for both: ~160 module calls per step)
    handles += rng.install_rng(model, mesh, rng_seed, submodule_hooks=False)
    rng_enter, rng_leave = model._spim_rng_sub

    def pre(name):
        # a submodule called outside the root's forward (a checkpointed block recomputed
        # in backward) enters the run for that call
        def hook(mod, args):
            run.push(name, type(mod).__name__)
            rng_enter()
        return hook

    def post(name):
        def hook(mod, args, out):
            try:
                return settle(out)  # never an index map out of a module (ops/indexmap.py)
            finally:
                try:
                    run.pop(name)
                finally:  # as two always-called hooks: the second runs when the first raises
                    rng_leave()
        return hook

    for name, m in model.named_modules():
        if name:
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name), always_call=True))
    model._spim_run = run
    model._spim_mesh = mesh
    model._spim_handles = handles
    return model


def unparallelize(model: nn.Module) -> nn.Module:
    """Undo :func:`parallelize` in place; returns ``model``.

    Removes every hook ``parallelize`` registered (its own, the resampling routing
    and the shared-RNG ones) and the ``_spim_*`` attributes; parameters, buffers
    and their values are left as they are, so the model then computes exactly
    what a never-parallelized copy with the same weights computes. Raises
    :class:`SPIMError` if ``model`` is not parallelized or its forward is running."""
    run = getattr(model, "_spim_run", None)
    if getattr(model, "_spim_mesh", None) is None:
        raise SPIMError("unparallelize: this model is not parallelized")
    if run is not None and run.frames:
        raise SPIMError("unparallelize: the model's forward is running")
    for h in model._spim_handles:
        h.remove()
    for k in [k for k in vars(model) if k.startswith("_spim_")]:
        delattr(model, k)
    return model


def average_gradients(model: nn.Module, mesh: SpatialMesh | None = None) -> None:
    """Average parameter gradients over the sp group (one bucketed all-reduce).

    Use after ``loss.backward()`` when no data-parallel wrapper does it: the result
    equals the single-device gradient of the whole scene."""
    mesh = mesh or getattr(model, "_spim_mesh", None)
    if mesh is None or mesh.sp == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = all_reduce_(torch.cat([g.reshape(-1) for g in grads]), mesh)
    flat /= mesh.sp
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()
