"""Every DeepSpeed-specific adaptation of rest_ds, in one module.

Written for DeepSpeed 0.19.x (:data:`WRITTEN_FOR`). The rest of rest_ds calls
DeepSpeed only through the functions here (``tests/test_layering.py`` checks
that no other module imports it). Where an adaptation relies on a DeepSpeed
internal (a private attribute, a file name, a module-level object), it checks
that internal before using it: when the installed version is not 0.19.x it
warns once naming the adaptation, and when the internal is missing it raises
:class:`DeepSpeedCompatError` naming the adaptation, what is missing and both
versions. It never silently does something else.

The adaptations:

* :func:`quiet` - DeepSpeed logs every step at INFO; keep warnings and errors
  (public logger; also selects the CPU accelerator where there is no GPU).
* :func:`init_comm` - ``deepspeed.init_distributed`` on the ``torch.distributed``
  group already set up, then :func:`unlink_cpu_allreduce_shm`: DeepSpeed's CPU
  all-reduce maps a ~66 MiB ``/dev/shm`` file per rank and never unlinks it; its
  name is DeepSpeed's private convention (``csrc/cpu/comm/shm.cpp``).
* :func:`ds_config` - a rest_ds :class:`~rest_ds.train.config.TrainConfig` as a
  DeepSpeed config dict: ZeRO stage, gradient buckets sized to the model
  (:func:`bucket_sizes`), precision, clipping, ``memory_efficient_linear`` off.
* :func:`initialize` - ``deepspeed.initialize`` plus the two SPIM guards below.
* :func:`zero3_spatial_hooks` - ZeRO-3 applies its backward-ordering
  ``autograd.Function`` s (the private per-module ``pre_bwd_fn`` / ``post_bwd_fn``)
  to module outputs; applied to a SpatialTensor they would detach the tile's
  graph, so they are wrapped to act on the tile.
* :func:`check_functionals` - ZeRO-3's ``memory_efficient_linear`` replaces
  ``torch.nn.functional.linear`` process-wide by an ``autograd.Function`` SPIM
  cannot see into: refuse to train if that happened.
* :func:`comm_backend` / :data:`COMM_OPS` - DeepSpeed's communication backend
  object (``deepspeed.comm.comm.cdb``, internal), whose methods ``rest-ds bench``
  wraps to account DeepSpeed's own collectives.
* :func:`route_host_collectives` - DeepSpeed's gradient all-reduce and ZeRO's
  parameter all-gather through shared memory where every rank is on one host
  (instance attributes on the comm backend object ``cdb``, internal; DeepSpeed's
  CPU all-reduce op, ``torch.ops.deepspeed.inference_all_reduce_``).
* :func:`fp32_state_dict` - ``zero_to_fp32``: the whole fp32 model of a ZeRO 1-3
  checkpoint in one process.
* :data:`CHECKPOINT_GLOBALS` - the non-tensor DeepSpeed types its checkpoint
  files pickle (the allow-list of checkpoint.safe_torch_load).
* :func:`param_count` - parameters of a model whose parameters ZeRO-3 may have
  partitioned (``ds_numel``).
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from typing import Any

import torch

from ..spim import SpatialTensor

#: The DeepSpeed release series the adaptations were written for and tested with.
WRITTEN_FOR = (0, 19)
#: DeepSpeed's default ZeRO gradient bucket (values): ``reduce_bucket_size`` and
#: ``allgather_bucket_size`` in 0.19.
DS_DEFAULT_BUCKET = 500_000_000


class DeepSpeedCompatError(RuntimeError):
    """A DeepSpeed internal that one of the adaptations relies on is not there."""


def installed_version() -> str:
    import deepspeed

    return str(deepspeed.__version__)


def version_matches(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed one) is of the :data:`WRITTEN_FOR` series."""
    parts = (version or installed_version()).split(".")
    try:
        return (int(parts[0]), int(parts[1])) == WRITTEN_FOR
    except (IndexError, ValueError):
        return False


_WARNED: set[str] = set()


def check(adaptation: str, present: bool, missing: str, *, error: bool = True) -> bool:
    """The version check of one adaptation. ``present``: whether the DeepSpeed internal
    it relies on is there (``missing`` says what it is). Missing: raise
    :class:`DeepSpeedCompatError` (or, ``error=False``, warn: for adaptations whose
    absence costs resources, not correctness). Present on another version: warn once.
    Returns ``present``."""
    version, want = installed_version(), f"{WRITTEN_FOR[0]}.{WRITTEN_FOR[1]}.x"
    where = f"rest_ds.train.deepspeed_compat: adaptation '{adaptation}' (written for DeepSpeed {want})"
    if not present:
        msg = f"{where}: DeepSpeed {version} is installed and {missing}; install deepspeed {want} (setup.cfg)"
        if error:
            raise DeepSpeedCompatError(msg + " or update the adaptation")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    elif not version_matches(version) and adaptation not in _WARNED:
        _WARNED.add(adaptation)
        warnings.warn(f"{where}: DeepSpeed {version} is installed; the internals it uses are present but "
                      f"not verified on this version", RuntimeWarning, stacklevel=2)
    return present


# --- logging and process set-up --------------------------------------------------------------------
def quiet() -> None:
    """DeepSpeed logs every step at INFO; keep warnings and errors. Without a GPU,
    select DeepSpeed's CPU accelerator (before DeepSpeed is imported)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's ZeRO calls torch's older collective names; torch 2.14 warns on each rank's first call
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*is deprecated",
                            category=FutureWarning)
    try:
        from deepspeed.utils import logger
        logger.setLevel(logging.WARNING)
    except Exception:  # pragma: no cover
        pass


def init_comm() -> None:
    """DeepSpeed's comm layer over the initialised ``torch.distributed`` group (its
    backend), then :func:`unlink_cpu_allreduce_shm`. Every rank calls it."""
    import deepspeed
    import torch.distributed as dist

    quiet()
    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    unlink_cpu_allreduce_shm()


def cpu_allreduce_shm_name(rank: int) -> str:
    """The ``/dev/shm`` file of ``rank``'s CPU all-reduce buffer: DeepSpeed's
    ``SHM_BUFFER_NAME_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (csrc/cpu/comm/shm.cpp)."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


_UNLINKED: set[str] = set()   # this process's files unlinked already (init_comm may run twice)


def unlink_cpu_allreduce_shm() -> bool:
    """DeepSpeed's CPU all-reduce (all ranks on one host, ``LOCAL_SIZE`` == world)
    maps a ~66 MiB ``/dev/shm`` file per rank and never unlinks it: every CPU job
    would leave them behind, filling the RAM-backed /dev/shm. Once every rank has
    mapped its peers' files (inside ``init_distributed``, before the barrier here),
    each rank unlinks its own; the mappings stay valid. Returns whether a file was
    unlinked. Collective over the world when DeepSpeed uses the shm all-reduce."""
    import torch.distributed as dist

    world = dist.get_world_size()
    if os.environ.get("LOCAL_SIZE") != str(world) or torch.cuda.is_available():
        return False
    backend = comm_backend()
    name = cpu_allreduce_shm_name(dist.get_rank())
    if not check("unlink the CPU all-reduce /dev/shm files", hasattr(backend, "shm_comm_op"),
                 "its comm backend has no 'shm_comm_op' (its /dev/shm files, if any, are left behind)",
                 error=False):
        return False
    if backend.shm_comm_op is None or name in _UNLINKED:  # the op was not built (no files), or done already
        return False
    dist.barrier()
    try:
        os.unlink(name)
        _UNLINKED.add(name)
        return True
    except FileNotFoundError:
        check("unlink the CPU all-reduce /dev/shm files", False,
              f"its shm all-reduce left no file {name} (the name changed?): /dev/shm may fill up", error=False)
        return False


# --- the DeepSpeed config -------------------------------------------------------------------------
def bucket_sizes(params: int | None, reduce: int | None = None, allgather: int | None = None) -> tuple[int, int]:
    """ZeRO's ``(reduce_bucket_size, allgather_bucket_size)`` in values: the configured
    ones, else ``min(5e8, params)`` rounded up to even (DeepSpeed allocates a reduce
    bucket of this many values whatever the model: a 5e8 default costs ~1.9 GiB per
    rank in fp32 for a model of any size), else (``params`` None) DeepSpeed's 5e8."""
    auto = DS_DEFAULT_BUCKET if params is None else max(2, min(DS_DEFAULT_BUCKET, int(params) + int(params) % 2))
    return int(reduce or auto), int(allgather or auto)


def ds_config(cfg, micro_batch: int, params: int | None = None) -> dict[str, Any]:
    """DeepSpeed's config dict for TrainConfig ``cfg`` with ``micro_batch`` samples per
    rank and micro-step; ``params``: the model's parameter count (sizes the ZeRO
    buckets, :func:`bucket_sizes`). bf16/fp16 need a GPU (ConfigError on CPU)."""
    from .config import ConfigError

    d = cfg.deepspeed
    if d.precision != "fp32" and not torch.cuda.is_available():
        raise ConfigError(cfg.source_file, "deepspeed.precision", f"{d.precision} needs a GPU; on CPU use fp32")
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.zero_stage >= 1:
        zero["reduce_bucket_size"], zero["allgather_bucket_size"] = bucket_sizes(
            params, d.reduce_bucket_size, d.allgather_bucket_size)
    if d.zero_stage == 3:
        # memory_efficient_linear would replace torch.nn.functional.linear process-wide by an
        # autograd.Function that SPIM's tensor subclass cannot see into (the tile would be detached)
        zero["memory_efficient_linear"] = False
    out = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": d.gradient_accumulation_steps,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,   # a plain torch optimizer; ZeRO partitions its state
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if d.gradient_clipping > 0:
        out["gradient_clipping"] = d.gradient_clipping
    if d.precision == "bf16":
        out["bf16"] = {"enabled": True}
    elif d.precision == "fp16":
        out["fp16"] = {"enabled": True, "initial_scale_power": 16}
    out.update(copy.deepcopy(d.config))
    return out


# --- the engine ----------------------------------------------------------------------------------
def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict,
               lr_scheduler=None) -> tuple:
    """``deepspeed.initialize(model, optimizer, lr_scheduler, config)`` for a (possibly
    parallelized) model, with the ZeRO-3 hooks made tile-aware and the functionals
    checked. Returns ``(engine, optimizer, dataloader, lr_scheduler)`` as DeepSpeed does."""
    import deepspeed

    out = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config)
    if int((config.get("zero_optimization") or {}).get("stage", 0)) == 3:
        zero3_spatial_hooks(out[0].module)
    check_functionals()
    return out


class _TileAware:
    """An ``autograd.Function`` class whose ``apply`` acts on a SpatialTensor's tile."""

    def __init__(self, fn):
        self.fn = fn

    def apply(self, x, *args):
        if isinstance(x, SpatialTensor):
            # ZeRO-3's functions are the identity forward: the result keeps the input's sharding
            return SpatialTensor(self.fn.apply(x.to_local(), *args), x.spec)
        return self.fn.apply(x, *args)


_ZERO3_HOOKS = ("pre_bwd_fn", "post_bwd_fn")


def zero3_spatial_hooks(module: torch.nn.Module) -> int:
    """Make ZeRO-3's per-module backward hooks (the private ``pre_bwd_fn`` /
    ``post_bwd_fn`` DeepSpeed 0.19 sets on every module it manages) act on
    SpatialTensor tiles; returns the number of hooks adapted. Call it after
    ``deepspeed.initialize`` with stage 3 and after every ``load_checkpoint``.
    Raises :class:`DeepSpeedCompatError` when no module carries them (another
    DeepSpeed: its hooks would silently detach the tiles)."""
    n = found = 0
    for m in module.modules():
        for attr in _ZERO3_HOOKS:
            fn = m.__dict__.get(attr)
            if fn is None:
                continue
            found += 1
            if not isinstance(fn, _TileAware):
                setattr(m, attr, _TileAware(fn))
                n += 1
    check("ZeRO-3 backward hooks on SpatialTensor tiles", found > 0,
          f"no module of the ZeRO-3 engine carries {' / '.join(_ZERO3_HOOKS)}")
    return n


def check_functionals() -> None:
    """Raise if ``torch.nn.functional.linear`` was replaced (DeepSpeed ZeRO-3's
    ``memory_efficient_linear``): SPIM's rule for it would be bypassed."""
    import torch.nn.functional as F

    if F.linear is not torch._C._nn.linear:
        raise RuntimeError(f"torch.nn.functional.linear was replaced by {getattr(F.linear, '__module__', '?')}."
                           f"{getattr(F.linear, '__name__', '?')} "
                           f"(DeepSpeed ZeRO-3 memory_efficient_linear?); SPIM would compute wrong gradients. "
                           f"Do not set zero_optimization.memory_efficient_linear")


def param_count(module: torch.nn.Module) -> int:
    """Parameters of ``module``, whole also where ZeRO-3 partitioned them (``ds_numel``)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())


# --- communication accounting -------------------------------------------------------------------
#: The methods of DeepSpeed's comm backend (:func:`comm_backend`) that ``rest-ds bench`` accounts.
COMM_OPS = ("all_reduce", "inference_all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter",
            "reduce_scatter_tensor", "all_gather", "all_gather_into_tensor", "all_gather_base",
            "all_gather_coalesced", "broadcast", "all_to_all_single", "barrier")


def comm_backend():
    """DeepSpeed's communication backend object (``deepspeed.comm.comm.cdb``, set by
    ``deepspeed.init_distributed``; None before it): every DeepSpeed collective goes
    through its methods (:data:`COMM_OPS`). Raises :class:`DeepSpeedCompatError`
    when DeepSpeed has no such object."""
    import deepspeed.comm.comm as ds_comm

    check("comm backend (bench's collective accounting)", hasattr(ds_comm, "cdb"),
          "deepspeed.comm.comm has no 'cdb' backend object")
    return ds_comm.cdb


# --- DeepSpeed's collectives on one host ----------------------------------------------------------
def route_host_collectives(mesh) -> list[str]:
    """Send DeepSpeed's gradient all-reduce and ZeRO's parameter all-gather through shared memory
    where every rank runs on this host (CPU tensors; gloo would carry them through its TCP loopback:
    ~10 ms each per step for a 1.7 M-parameter model on 2 ranks). Returns the routed op names; every
    other call goes to DeepSpeed's own method unchanged. Call it on every rank after
    :func:`initialize`; ``REST_DS_SHM=0`` routes nothing (as for SPIM's own transport).

    * ``all_reduce`` (SUM, synchronous, contiguous, over a group spanning the world): DeepSpeed's own
      CPU shared-memory all-reduce (its inference path's; fp32, and bf16/fp16 where the kernel's ISA
      is there) where it is set up (the deepspeed launcher: ``LOCAL_SIZE`` == world), else, when the
      world is ``mesh``'s one sp group (dp = 1) and the call comes outside any forward or backward
      (ZeRO's reduction after ``backward``, the gradient norm), the mailboxes of SPIM's
      shared-memory channel (:mod:`rest_ds.spim.shm`). Either way every rank adds the ranks'
      buffers in rank order, so all get the same bits (for 2 ranks the very sum gloo computes).
    * ``all_gather_into_tensor`` (synchronous, contiguous, dp = 1, outside forward and backward:
      ZeRO 1/2's gather after the optimizer step): the channel's mailboxes. A copy: exact.

    The "outside forward and backward" condition keeps these messages from interleaving with
    SPIM's own exchanges on the same mailboxes (a ZeRO-3 gather inside a forward goes to gloo)."""
    import torch.distributed as dist

    cdb = comm_backend()
    if cdb is None or os.environ.get("REST_DS_SHM", "1") == "0":
        return []
    check("shared-memory routing of DeepSpeed's collectives", all(hasattr(cdb, n) for n in (
        "all_reduce", "all_gather_into_tensor")), "its comm backend has no all_reduce / all_gather_into_tensor")
    from ..spim import context

    world = dist.get_world_size()
    ch = getattr(mesh, "shm", None)
    ds_dtypes: set = set()
    if (getattr(cdb, "shm_comm_op", None) is not None and os.environ.get("LOCAL_SIZE") == str(world)
            and hasattr(getattr(torch.ops, "deepspeed", None), "inference_all_reduce_")):
        # its C++ side maps the segment only when LOCAL_SIZE equals the world size (the test
        # repeated here); its fp32 kernel needs AVX2, bf16/fp16 AVX-512 (vector level 1 / 2)
        level = int(getattr(cdb, "shm_vector_kernel_level", 0))
        ds_dtypes = {torch.float32} if level == 1 else {torch.float32, torch.bfloat16, torch.float16} \
            if level >= 2 else set()
    # what the routes use, replaced by a later call (a new mesh, e.g. the next job of a process)
    state = {"ch": ch if ch is not None and ch.all_pairs and mesh.dp == 1 and world == mesh.sp else None,
             "ranks": tuple(mesh.sp_ranks), "me": dist.get_rank(), "ds_dtypes": ds_dtypes}
    if getattr(cdb, "_rest_ds_route", None) is not None:
        cdb._rest_ds_route.update(state)
    else:
        cdb._rest_ds_route = state
        _install_routes(cdb, state, context)
    return [n for n, on in (("all_reduce", bool(state["ds_dtypes"] or state["ch"])),
                            ("all_gather_into_tensor", state["ch"] is not None)) if on]


def _install_routes(cdb, state: dict, context) -> None:
    """The instance-attribute wrappers of :func:`route_host_collectives` (reading ``state``)."""
    import torch.distributed as dist

    sum_ops = {dist.ReduceOp.SUM}
    with contextlib.suppress(ImportError):
        from deepspeed.comm.reduce_op import ReduceOp as DSReduceOp
        sum_ops.add(DSReduceOp.SUM)

    def quiet_now() -> bool:  # no SPIM exchange can be in flight on the mailboxes
        return context.current() is None and torch._C._current_graph_task_id() == -1

    def spans_world(group) -> bool:
        return group is None or dist.get_world_size(group=group) == dist.get_world_size()

    orig_all_reduce, orig_all_gather = cdb.all_reduce, cdb.all_gather_into_tensor

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if (not async_op and op in sum_ops and tensor.device.type == "cpu" and tensor.is_contiguous()
                and tensor.numel() and spans_world(group)):
            if tensor.dtype in state["ds_dtypes"]:
                torch.ops.deepspeed.inference_all_reduce_(tensor)
                return None
            if state["ch"] is not None and quiet_now():
                _channel_all_reduce(state["ch"], state["ranks"], state["me"], tensor)
                return None
        return orig_all_reduce(tensor, op, group, async_op)

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        ch, ranks, me, n = state["ch"], state["ranks"], state["me"], input_tensor.numel()
        if (ch is not None and not async_op and output_tensor.device.type == "cpu"
                and input_tensor.device.type == "cpu" and output_tensor.dtype == input_tensor.dtype
                and output_tensor.is_contiguous() and input_tensor.is_contiguous() and n
                and output_tensor.numel() == n * len(ranks) and spans_world(group) and quiet_now()):
            flat = output_tensor.view(-1)
            part = {r: flat.narrow(0, i * n, n) for i, r in enumerate(ranks)}
            part[me].copy_(input_tensor.view(-1))
            src = input_tensor.view(-1)
            ch.start_exchange([(r, src) for r in ranks if r != me],
                              [(r, part[r]) for r in ranks if r != me], "ZeRO all-gather")()
            return None
        return orig_all_gather(output_tensor=output_tensor, input_tensor=input_tensor, group=group,
                               async_op=async_op)

    cdb.all_reduce = all_reduce
    cdb.all_gather_into_tensor = all_gather_into_tensor


def _channel_all_reduce(ch, ranks: tuple[int, ...], me: int, t: torch.Tensor) -> None:
    """Sum ``t`` (contiguous, CPU) over ``ranks`` in place through ``ch``'s mailboxes, as a
    reduce-scatter then an all-gather: chunk ``j`` of the flat buffer is summed by ``ranks[j]``
    alone, adding the ranks' copies in ``ranks`` order, and sent back to all (so every rank holds
    the same bits; each rank adds 1/P of the buffer and moves 2 (P-1)/P of it each way)."""
    flat = t.view(-1)
    n, P, i = flat.numel(), len(ranks), ranks.index(me)
    bounds = [n * j // P for j in range(P + 1)]
    chunk = [flat.narrow(0, bounds[j], bounds[j + 1] - bounds[j]) for j in range(P)]
    mine = chunk[i]
    got = {r: torch.empty_like(mine) for r in ranks if r != me}
    ch.start_exchange([(r, chunk[j]) for j, r in enumerate(ranks) if r != me], list(got.items()),
                      "DeepSpeed all-reduce (reduce-scatter)")()
    parts = [mine if r == me else got[r] for r in ranks]
    if i == 0:  # rank order: ((p0 + p1) + p2) + ...; in place where this rank's part comes first
        for p in parts[1:]:
            mine.add_(p)
    else:
        acc = parts[0]
        for p in parts[1:]:
            acc.add_(p)
        mine.copy_(acc)
    ch.start_exchange([(r, mine) for r in ranks if r != me], [(r, chunk[j]) for j, r in enumerate(ranks) if r != me],
                      "DeepSpeed all-reduce (all-gather)")()


# --- checkpoints -----------------------------------------------------------------------------------
#: The non-tensor types DeepSpeed 0.19.8 pickles into its checkpoint files (found with
#: ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0-3 checkpoints and by reading
#: the optimizers' ``state_dict``): the ZeRO stage enum, the loss scalers of ZeRO 1-3 (fp32 and
#: fp16), and the fragment addresses of ZeRO 1/2's parameter slice mappings. All are plain data
#: classes: unpickling them sets attributes and calls no code of the file's choosing.
CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def checkpoint_globals() -> list:
    """The classes of :data:`CHECKPOINT_GLOBALS` that the installed DeepSpeed has (a
    missing one is warned about: files that pickle it are then refused by name)."""
    import importlib

    out = []
    for name in CHECKPOINT_GLOBALS:
        mod, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(mod), attr))
        except (ImportError, AttributeError):
            check("checkpoint type allow-list", False, f"it has no {name}", error=False)
    return out


def fp32_state_dict(root: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """The whole fp32 model state dict of the ZeRO 1-3 checkpoint ``root/tag`` in one
    process (DeepSpeed's ``zero_to_fp32``; its progress output is swallowed). Loads
    with whatever ``torch.load`` is in effect (wrap in checkpoint.safe_loading)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        get_fp32_state_dict_from_zero_checkpoint = None
    check("zero_to_fp32 consolidation", get_fp32_state_dict_from_zero_checkpoint is not None,
          "deepspeed.utils.zero_to_fp32 has no get_fp32_state_dict_from_zero_checkpoint")
    # zero_to_fp32 prints progress on stdout and a progress bar on stderr
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)


__all__ = ["WRITTEN_FOR", "DS_DEFAULT_BUCKET", "DeepSpeedCompatError", "installed_version", "version_matches",
           "check", "quiet", "init_comm", "cpu_allreduce_shm_name", "unlink_cpu_allreduce_shm", "bucket_sizes",
           "ds_config", "initialize", "zero3_spatial_hooks", "check_functionals", "param_count", "COMM_OPS",
           "comm_backend", "route_host_collectives", "CHECKPOINT_GLOBALS", "checkpoint_globals", "fp32_state_dict"]
