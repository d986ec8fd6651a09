"""The training engine: SPIM spatial parallelism inside DeepSpeed data parallelism.

Every rank builds the same model (same seed), ``parallelize`` s it over its sp
group and hands it with a torch optimizer to ``deepspeed.initialize``; the
DeepSpeed data-parallel group is the whole world (``dp x sp`` ranks).

**Gradients (docs/design.md section 4), the route chosen.** SPIM's loss is the
whole-scene loss, replicated on the sp ranks; back-propagating it on every
rank gives each rank ``sp x`` its tile's share of the gradient (comm.py), so
the *average* over the sp ranks is the exact whole-scene gradient. DeepSpeed's
plain data-parallel reduction averages over all ``dp x sp`` ranks, which is
exactly the mean over dp of the whole-scene gradients: the loss is passed to
``engine.backward`` unscaled, and DeepSpeed's sequence-parallel ``mpu`` route
is not used (its sp handling differs between ZeRO stages). The same average
is made by ZeRO 0-3 (all-reduce, or reduce-scatter into the partitions); a
test checks one step of each stage against one process on the whole scene.

**ZeRO-3** gathers parameters in module hooks; those work unchanged under
SPIM. Two of its features apply an ``autograd.Function`` to SpatialTensors,
which would attach the graph to the wrapper and silently detach the tile:
its backward-ordering hooks on every module output
(``deepspeed_compat.zero3_spatial_hooks`` applies them to the local tile
instead) and ``memory_efficient_linear``, which replaces
``torch.nn.functional.linear`` process-wide (turned off in
``deepspeed_compat.ds_config``; ``check_functionals`` refuses to train if it
was replaced anyway). Every DeepSpeed-specific adaptation, with its version
check, is in :mod:`.deepspeed_compat`.
"""
from __future__ import annotations

import copy
import functools
import csv
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..spim import (SpatialMesh, from_local, init_distributed, install_rng, parallelize, rng_state,
                    set_rng_state)
from ..spim.comm import all_reduce_
from ..spim.spawn import free_port
from ..spim.tiling import choose_grid
from . import checkpoint as ckpt
from . import deepspeed_compat as dsc
from .config import ConfigError, TrainConfig
# the DeepSpeed adaptations live in deepspeed_compat; these names stay importable from here
from .deepspeed_compat import check_functionals, quiet as quiet_deepspeed, zero3_spatial_hooks
from .deepspeed_compat import ds_config as deepspeed_config
from ..data import WindowCache
from .data import (CropData, WholeSceneData, auto_grid, classes_without_pixels, grid_fits, grid_shapes,
                   has_labelled_pixel, open_scenes, scene_tile_layout)
from .inference import predict_slide, predict_whole, read_padded, slide_windows
from .metrics import class_weights_from_counts, confusion_matrix, segmentation_loss, segmentation_metrics


# --- process set-up ------------------------------------------------------------------------------------
def set_threads(n: int | None) -> int:
    """torch threads of this rank: ``n`` (``train.threads``), else ``$OMP_NUM_THREADS``, else
    the cores this process may use divided by the ranks on its node (the launcher's
    ``LOCAL_WORLD_SIZE`` / ``LOCAL_SIZE``; under SLURM ``SLURM_CPUS_PER_TASK``), at least 1.
    Decided here, in every rank, because launchers do not forward ``OMP_NUM_THREADS`` to
    remote nodes (DeepSpeed over ssh exports only a few variables)."""
    n = n or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or default_threads()
    torch.set_num_threads(n)
    return n


def default_threads() -> int:
    """Cores this process may use / ranks on this node (1 when that is unknown)."""
    for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):  # torchrun, the deepspeed launcher
        v = os.environ.get(k, "")
        if v.isdigit() and int(v) > 0:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            return max(1, cores // int(v))
    v = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(v) if v.isdigit() and int(v) > 0 else 1


def init_job(timeout_s: float | None = None) -> tuple[int, int]:
    """Initialise ``torch.distributed`` from the launcher's environment (deepspeed,
    torchrun, SLURM; without a launcher: a one-rank job) and DeepSpeed's comm
    layer on top of it. Returns ``(rank, world_size)``."""
    if not dist.is_initialized():
        if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        init_distributed(timeout_s=timeout_s)
    dsc.init_comm()
    return dist.get_rank(), dist.get_world_size()


# --- model -----------------------------------------------------------------------------------------
def build_model(model_cfg: "ModelConfig | dict", *, num_classes: int | None, in_chans: int | None,
                where: str | None = None, dates: int = 1):
    """``(Segmentor, full model config dict)`` from the ``model`` section (a
    :class:`rest_ds.models.ModelConfig` or its mapping);
    ``num_classes`` and ``encoder.in_chans`` default to the scene's. ``dates`` T > 1
    (a time-series scene, ``in_chans`` = T * C bands date-major): the encoder gets
    ``kwargs.num_frames`` = T and ``in_chans`` = C by default, and must read its
    ``(B, T*C, H, W)`` input as T dates (Prithvi encoders: ``input_channels``)."""
    from ..models.config import ModelConfig, build_segmentor

    d = model_cfg.to_dict() if isinstance(model_cfg, ModelConfig) else copy.deepcopy(model_cfg)
    if d.get("num_classes") is None:
        d["num_classes"] = num_classes
    elif num_classes is not None and d["num_classes"] != num_classes:
        raise ConfigError(where, "model.num_classes", f"is {d['num_classes']} but the scenes have {num_classes} classes")
    enc = d.get("encoder")
    if isinstance(enc, dict) and dates > 1:
        enc["kwargs"] = {**(enc.get("kwargs") or {})}
        enc["kwargs"].setdefault("num_frames", dates)
        if in_chans:
            in_chans //= dates
    if isinstance(enc, dict) and enc.get("in_chans") is None and not enc.get("bands") and in_chans:
        enc["in_chans"] = in_chans
    mcfg = ModelConfig.from_dict(d, where)
    refusal = ConfigError(where, "model.encoder", f"the scenes are time series of {dates} dates; the encoder "
                          f"({mcfg.encoder.name}) must take them (a prithvi encoder with num_frames {dates} and "
                          f"in_chans {in_chans})")
    try:
        model = build_segmentor(mcfg, where)
    except TypeError as e:
        if dates > 1 and "num_frames" in str(e):  # an encoder without dates
            raise refusal from None
        raise
    if dates > 1 and getattr(model.encoder, "input_channels", None) != (in_chans or 0) * dates:
        raise refusal
    return model, mcfg.to_dict()


def enable_activation_checkpointing(model, on: bool = True) -> None:
    """Recompute encoder blocks in backward (encoders with ``grad_checkpointing``
    or timm's ``set_grad_checkpointing``); ``on=False`` switches it off again."""
    enc = getattr(model, "encoder", model)
    for m in enc.modules():
        if hasattr(m, "grad_checkpointing"):
            m.grad_checkpointing = on
            return
        if hasattr(m, "set_grad_checkpointing"):
            m.set_grad_checkpointing(on)
            return
    raise ConfigError(None, "train.activation_checkpointing",
                      f"the encoder ({type(enc).__name__}) has no activation checkpointing switch")



# --- optimiser and schedule ------------------------------------------------------------------------
def make_optimizer(model, cfg: TrainConfig, groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """A torch optimizer (DeepSpeed wraps it; no fused/compiled ops needed) over
    ``groups`` (default: finetune.param_groups: no weight decay on norms, biases
    and position tables; encoder lr / layer decay / unfreeze step per group)."""
    from .finetune import param_groups

    o = cfg.optimizer
    if groups is None:
        groups = param_groups(model, cfg)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def apply_optimizer_config(scheduler, cfg: TrainConfig, step: int) -> None:
    """After loading a checkpoint of ``step``: the optimizer hyper-parameters and the
    learning rate of ``cfg`` (its lr, schedule and steps) replace the checkpoint's
    (``scheduler`` is the ``LambdaLR`` over the optimizer; its lambda reads ``cfg``)."""
    o, groups = cfg.optimizer, scheduler.optimizer.param_groups
    # each group keeps its lr_scale / decay / start_step (finetune.param_groups)
    scheduler.base_lrs = [o.lr * g.get("lr_scale", 1.0) for g in groups]
    lrs = [b * group_lr_factor(step, cfg, g.get("start_step", 0)) for b, g in zip(scheduler.base_lrs, groups)]
    for i, (g, lr) in enumerate(zip(groups, lrs)):
        g["initial_lr"], g["lr"] = scheduler.base_lrs[i], lr
        if g.get("decay", bool(g.get("weight_decay"))):
            g["weight_decay"] = o.weight_decay
        if "betas" in g:
            g["betas"], g["eps"] = tuple(o.betas), o.eps
        if "momentum" in g:
            g["momentum"] = o.momentum
    scheduler._last_lr = lrs


def group_lr_factor(step: int, cfg: TrainConfig, start_step: int = 0) -> float:
    """:func:`lr_factor` for a group frozen (lr 0) before ``start_step`` (finetune.unfreeze_step)."""
    return 0.0 if step < start_step else lr_factor(step, cfg)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of every parameter group (its own base lr, frozen before its ``start_step``)."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, [functools.partial(group_lr_factor, cfg=cfg, start_step=g.get("start_step", 0))
              for g in opt.param_groups])


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier after ``step`` optimizer steps (config.ScheduleSection)."""
    s, total = cfg.schedule, cfg.train.steps
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.name == "constant":
        return 1.0
    span = max(1, total - s.warmup_steps)
    t = min(1.0, max(0.0, (step - s.warmup_steps) / span))
    if s.name == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * t))
    elif s.name == "poly":
        f = (1 - t) ** s.power
    else:
        f = 1 - t
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * f



# --- data off the critical path ---------------------------------------------------------------------
class Prefetcher:
    """``batch(m)`` of a data source whose batches are pure functions of the
    micro-step ``m`` (:mod:`.data`), with micro-step ``m + 1`` read in a
    background thread while ``m`` computes: reading ahead changes when a
    batch is read, never what. An error of the read-ahead surfaces when its
    batch is asked for. :meth:`wait` before anything else reads the scenes
    (evaluation), so that no reader is used by two threads at once."""

    def __init__(self, batch_fn):
        self.batch_fn = batch_fn
        self._pool: ThreadPoolExecutor | None = None
        self._next = None  # (micro-step, future)

    def batch(self, m: int):
        if self._next is not None and self._next[0] == m:
            out = self._next[1].result()
        else:
            self.wait()
            out = self.batch_fn(m)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="rest_ds-prefetch")
        self._next = (m + 1, self._pool.submit(self.batch_fn, m + 1))
        return out

    def wait(self) -> None:
        """Let a pending read-ahead finish (its result or error is kept for its step)."""
        if self._next is not None:
            self._next[1].exception()

    def close(self) -> None:
        self.wait()
        self._next = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


# --- the trainer -------------------------------------------------------------------------------------
class Trainer:
    """One training job; every rank constructs it and calls :meth:`fit`.

    Rank 0 prints one line per ``log_interval`` (and a progress bar on a
    terminal), writes ``train_log.csv``, ``eval_log.csv``, ``metrics.json`` and
    ``training_curve.png`` into the output folder; checkpoints go to
    ``<output>/checkpoints/`` (checkpoint.py)."""

    def __init__(self, cfg: TrainConfig, *, log=None):
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is0 = self.rank == 0
        self._log = log or (lambda m: print(m, flush=True))
        if cfg.deepspeed.precision != "fp32" and not torch.cuda.is_available():
            # a GPU config (bf16/fp16) tried on CPU runs in fp32 rather than failing
            if self.is0:
                self._log(f"note: deepspeed.precision {cfg.deepspeed.precision} needs a GPU; this CPU run uses fp32")
            cfg.deepspeed.precision = "fp32"
        self.out = Path(cfg.out_dir)
        self.threads = set_threads(cfg.train.threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        if self.is0:
            self.out.mkdir(parents=True, exist_ok=True)
        d = cfg.data
        t0 = time.monotonic()
        self.train_scenes = open_scenes(d.scenes, cache=d.cache, expected_bands=None, scan=d.scan, first=self.is0,
                                        barrier=dist.barrier)
        self.val_scenes = (self.train_scenes if d.val_scenes is None else
                           open_scenes(d.val_scenes, cache=d.cache, expected_bands=None, scan=d.scan,
                                       first=self.is0, barrier=dist.barrier))
        first = self.train_scenes[0].reader
        self.num_classes, self.in_chans = first.num_classes, first.shape[0]
        self.class_names = first.scene.class_names
        self.ignore_index = first.scene.ignore_index
        for sc in self.train_scenes + self.val_scenes:
            r = sc.reader
            if r.dates != first.dates:
                raise ConfigError(cfg.source_file, "data.scenes", f"scene '{sc.name}' has dates: {r.dates}, "
                                  f"'{self.train_scenes[0].name}' has {first.dates}")
            if r.shape[0] != self.in_chans or r.scene.class_names != self.class_names:
                raise ConfigError(cfg.source_file, "data.scenes",
                                  f"scene '{sc.name}' has {r.shape[0]} bands and classes {r.scene.class_names}; "
                                  f"'{self.train_scenes[0].name}' has {self.in_chans} and {self.class_names}")
            if r.label is None:
                raise ConfigError(cfg.source_file, "data.scenes", f"scene '{sc.name}' has no label")
        # every rank reads the same files (no collective): a train region without one labelled pixel
        # trained silently at loss 0, a val region without one evaluated to NaN
        for scenes, region, key, role, what in (
                (self.train_scenes, d.train_region, "data.train_region", "training", "nothing to train on"),
                (self.val_scenes, d.val_region, "data.val_region", "validation", "nothing to evaluate")):
            if not has_labelled_pixel(scenes, region):
                where = f"region '{region}' of " if region else ""
                raise ConfigError(cfg.source_file, key if region else ("data.scenes" if role == "training" else
                                                                       "data.val_scenes"),
                                  f"no labelled pixel in {where}the {role} scenes "
                                  f"({', '.join(sc.name for sc in scenes)}): {what}")
        missing = classes_without_pixels(self.train_scenes) if self.is0 else None
        if missing:  # not an error (a class may be kept for other data), but a 1-class label trained silently
            self._log(f"warning: {len(missing)} of the {len(self.class_names)} classes ({', '.join(missing)}) have no "
                      f"labelled pixel in the training scenes: the model cannot learn them")

        torch.manual_seed(cfg.seed)
        self.model, self.model_cfg = build_model(cfg.model, num_classes=self.num_classes, in_chans=self.in_chans,
                                                 where=cfg.source_file, dates=first.dates)
        if self.is0:
            for line in getattr(self.model, "load_reports", ()):  # one line per weights file loaded
                self._log(line)
        from .finetune import apply_freezing, apply_lora

        # before SPIM and DeepSpeed: they see the adapters and which parameters train
        self.frozen = apply_lora(self.model, cfg, where=cfg.source_file)
        self.frozen |= apply_freezing(self.model, cfg, where=cfg.source_file)
        self.align = int(getattr(self.model, "align", None) or 1)
        want = (getattr(self.model.encoder, "input_channels", None) or getattr(self.model.encoder, "in_chans", None)
                or self.model_cfg["encoder"].get("in_chans"))
        if want is not None and int(want) != self.in_chans:
            raise ConfigError(cfg.source_file, "model.encoder.in_chans",
                              f"the model takes {want} bands but scene '{self.train_scenes[0].name}' has "
                              f"{self.in_chans}; set model.encoder.in_chans (or bands) to match")
        if cfg.train.activation_checkpointing:
            enable_activation_checkpointing(self.model)

        # the windows whole-scene training and evaluation read again and again, kept in host memory
        self.window_cache = WindowCache(d.tile_cache_mb) if d.tile_cache_mb > 0 else None
        if d.mode == "crop":
            self.mesh = SpatialMesh.build(sp=1)
            self.grid = (1, 1)
            self.data = CropData(self.train_scenes, cfg, self.rank)
            micro = d.crops_per_rank
        else:
            sp = cfg.mesh.sp or self.world
            # one grid splits every training scene (turned too, under rot90) and every validation scene;
            # a scene it cannot split failed in SPIM's tiling, naming no config key
            need = grid_shapes(self.train_scenes, self.val_scenes, d.augment.rot90, crop=bool(d.augment.crop))
            self.grid = cfg.grid() or auto_grid(self.train_scenes, sp, self.align, need)
            if self.grid is None or not all(grid_fits(self.grid, hw, self.align) for hw in need):
                if self.grid is None:
                    small = min(need, key=min)
                    head = f"no grid of {sp} tiles splits a {small[0]}x{small[1]} scene"
                else:
                    small = next(hw for hw in need if not grid_fits(self.grid, hw, self.align))
                    head = f"grid {self.grid[0]}x{self.grid[1]} does not split a {small[0]}x{small[1]} scene"
                rot = " (data.augment.rot90 also turns the training scenes)" if d.augment.rot90 else ""
                raise ConfigError(cfg.source_file, "mesh.grid" if cfg.grid() else "mesh.sp",
                                  f"{head}{rot}: each tile needs at least {self.align} px (the model's alignment) "
                                  f"per side; use fewer ranks per scene{', another grid' if cfg.grid() else ''} or "
                                  f"larger scenes{', or data.augment.rot90=false' if d.augment.rot90 else ''}")
            self.mesh = SpatialMesh.build(sp=sp, grid=self.grid)
            self.data = WholeSceneData(self.train_scenes, cfg, self.mesh, self.grid, self.align,
                                       cache=self.window_cache)
            micro = 1
            if self.mesh.sp > 1:
                parallelize(self.model, self.mesh, align=self.align, attention=cfg.mesh.attention, rng_seed=cfg.seed)
            else:  # the same grid-invariant random draws as sp > 1 (1 rank = the 1x1 grid); crop mode keeps torch's
                install_rng(self.model, self.mesh, cfg.seed)
        self.prefetch = Prefetcher(self.data.batch)  # the next micro-step's tile is read while this one computes

        counts = None
        if cfg.train.class_weights == "sqrt_inv":
            if any(sc.summary is None for sc in self.train_scenes):
                raise ConfigError(cfg.source_file, "train.class_weights", "'sqrt_inv' needs class counts (data.scan: true)")
            counts = np.sum([sc.summary.class_counts for sc in self.train_scenes], axis=0)
        w = class_weights_from_counts(counts, cfg.train.class_weights, self.num_classes)
        self.class_weight = torch.tensor(w, dtype=torch.float32) if w is not None else None
        self.aux_weight = float(getattr(self.model, "aux_weight", 0.0)) if getattr(self.model, "aux_head", None) else 0.0

        from .finetune import describe, param_groups

        groups = param_groups(self.model, cfg, self.frozen, where=cfg.source_file)
        if self.is0 and (self.frozen or cfg.finetune != type(cfg.finetune)()):
            self._log(describe(self.model, groups, self.frozen))
        opt = make_optimizer(self.model, cfg, groups)
        sched = make_scheduler(opt, cfg)
        # ZeRO-3's hooks made tile-aware and the functionals checked (deepspeed_compat)
        self.engine, _, _, self.scheduler = dsc.initialize(
            self.model, opt, dsc.ds_config(cfg, micro, params=dsc.param_count(self.model)), lr_scheduler=sched)
        self.device = self.engine.device  # cpu, or this rank's GPU (collectives: nccl needs GPU tensors)
        # on one host, DeepSpeed's gradient all-reduce and ZeRO's all-gather go through shared memory
        self.routed_collectives = dsc.route_host_collectives(self.mesh) if self.world > 1 else []
        if self.class_weight is not None:
            self.class_weight = self.class_weight.to(self.device)
        self.start_step = 0
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.last_metrics: dict | None = None
        self.setup_s = time.monotonic() - t0

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self, step: int) -> float:
        """Run the micro-steps of optimizer step ``step``; returns the loss averaged
        over the micro-steps and the dp replicas (the same on every rank)."""
        cfg = self.cfg
        gas = cfg.deepspeed.gradient_accumulation_steps
        self.engine.train()
        dev = self.device
        total = torch.zeros(1, dtype=torch.float64, device=dev)
        for i in range(gas):
            x, y, layout = self.prefetch.batch(step * gas + i)
            x, y = x.to(dev), y.to(dev)
            labelled = torch.tensor([float((y != self.ignore_index).sum())], dtype=torch.float64, device=dev)
            if self.mesh.sp > 1:
                x = from_local(x, self.mesh, layout=layout)
                y = from_local(y, self.mesh, dims=(1, 2), layout=layout)
                # SPIM's collective: the sp ranks' shared-memory channel on one host, not a gloo round trip
                all_reduce_(labelled, self.mesh)
            out = self.engine(x)
            if labelled.item() == 0:  # no training label in this (augmented) scene: a zero-gradient step
                first = out[0] if isinstance(out, (tuple, list)) else out
                loss = (first * 0).sum()
            else:
                loss = segmentation_loss(out, y, aux_weight=self.aux_weight, ignore_index=self.ignore_index,
                                         weight=self.class_weight, label_smoothing=cfg.train.label_smoothing)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().double()
        if self.mesh.dp > 1:  # the sp ranks of a replica hold the same (whole-scene) loss already
            dist.all_reduce(total)
            return float(total.item() / (gas * self.world))
        return float(total.item() / gas)

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Metrics on the validation region of the validation scenes: the confusion
        matrix of every rank's tile, summed over sp and dp (one all-reduce)."""
        cfg = self.cfg
        K = self.num_classes
        conf = np.zeros((K, K), dtype=np.int64)
        self.prefetch.wait()  # the training read-ahead may use the same scene readers
        self.engine.eval()
        try:
            if cfg.data.mode == "crop":
                conf += self._eval_slide()
            else:
                conf += self._eval_whole()
        finally:
            self.engine.train()
        t = torch.from_numpy(conf).to(self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return segmentation_metrics(t.cpu().numpy(), self.class_names)

    def _eval_whole(self) -> np.ndarray:
        K, mesh = self.num_classes, self.mesh
        conf = np.zeros((K, K), dtype=np.int64)
        n = len(self.val_scenes)
        mine = [i for i in range(n) if i % mesh.dp == mesh.dp_index]
        for r in range(math.ceil(n / mesh.dp)):  # equal forward counts on every rank (ZeRO-3 gathers)
            pad = r >= len(mine)
            sc = self.val_scenes[0 if pad else mine[r]]
            hw = sc.reader.shape[1:]
            layout = scene_tile_layout(hw, self.grid, self.align)
            rows, cols = layout.tile(*mesh.coord)
            img, lab, _ = read_padded(sc.reader, rows, cols, hw, stats=sc.stats, region=self.cfg.data.val_region,
                                      cache=self.window_cache)
            logits = predict_whole(self.engine, mesh, layout, torch.from_numpy(img)[None].to(self.device))
            if not pad:
                conf += confusion_matrix(logits.argmax(1)[0], lab, K, self.ignore_index)
        return conf

    def _eval_slide(self) -> np.ndarray:
        cfg, K = self.cfg, self.num_classes
        crop = cfg.data.crop_size
        overlap = cfg.train.eval_slide_overlap if cfg.train.eval_slide_overlap is not None else crop // 4
        conf = np.zeros((K, K), dtype=np.int64)
        for sc in self.val_scenes:  # every scene over all ranks: each rank its tile's windows
            _, H, W = sc.reader.shape
            grid = choose_grid(H, W, self.world, 1)
            layout = scene_tile_layout((H, W), grid, 1)
            rows, cols = layout.tile(*divmod(self.rank, grid[1]))
            wins = [w for w in slide_windows(H, W, crop, crop - overlap)
                    if w[0] < rows.stop and w[1] > rows.start and w[2] < cols.stop and w[3] > cols.start]
            need = torch.tensor([len(wins)], device=self.device)
            if self.world > 1:
                dist.all_reduce(need, op=dist.ReduceOp.MAX)
            logits, _ = predict_slide(self.engine, sc.reader, sc.stats, rows, cols, crop=crop, overlap=overlap,
                                      align=self.align, num_classes=K, min_forwards=int(need.item()),
                                      device=self.device)
            _, lab, _ = read_padded(sc.reader, rows, cols, (H, W), stats=sc.stats, region=cfg.data.val_region)
            conf += confusion_matrix(logits.argmax(0), lab, K, self.ignore_index)
        return conf

    # -- checkpoints ------------------------------------------------------------------------------
    def manifest(self) -> dict:
        cfg, first = self.cfg, self.train_scenes[0]
        sc = first.reader.scene
        return {
            "config": cfg.to_dict(),
            "model": self.model_cfg,
            "align": self.align,
            "zero_stage": cfg.deepspeed.zero_stage,
            "world_size": self.world,
            "mesh": {"dp": self.mesh.dp, "sp": self.mesh.sp, "grid": list(self.grid)},
            "mode": cfg.data.mode,
            "crop_size": cfg.data.crop_size,
            "slide_overlap": (cfg.train.eval_slide_overlap if cfg.train.eval_slide_overlap is not None
                              else cfg.data.crop_size // 4),
            "in_chans": self.in_chans,
            "num_classes": self.num_classes,
            "classes": [{"value": c.value, "name": c.name, "color": list(col)}
                        for c, col in zip(sc.classes, sc.class_colors)],
            "ignore_index": self.ignore_index,
            "band_names": list(sc.band_names) if sc.band_names else None,
            "normalization": {"mean": list(first.stats.mean), "std": list(first.stats.std),
                              "scene": first.name},
            "train_scenes": [s.name for s in self.train_scenes],
        }

    def _rank_state(self) -> dict:
        return {"torch_rng": torch.get_rng_state(), "spim_rng": rng_state(self.model)}

    def save(self, step: int) -> Path:
        return ckpt.save_checkpoint(self.engine, self.out / "checkpoints", step, self.manifest(), self._rank_state(),
                                    rank=self.rank, barrier=dist.barrier, keep=self.cfg.train.keep_checkpoints)

    def resume(self) -> int:
        """Load the checkpoint ``train.resume`` names; returns the step to start from."""
        r = self.cfg.train.resume
        if r == "none":
            return 0
        where = self.out / "checkpoints" if r == "auto" else Path(r)
        try:
            ckpt.find_checkpoint(where)
        except ckpt.NoCheckpoint:
            if r == "auto":
                return 0
            raise
        except ckpt.CheckpointError:
            if r != "auto":
                raise  # auto: a damaged newest checkpoint falls back to an older complete one below, or is named
        # rank 0 checks the files (sizes, sha256; auto: a damaged latest falls back to the one before)
        # and tells the others, so every rank loads the same checkpoint
        res: list = [None]
        if self.is0:
            try:
                res[0] = ckpt.select_checkpoint(where, fallback=r == "auto", log=self._log)
            except ckpt.CheckpointError as e:
                res[0] = e
        if self.world > 1:
            dist.broadcast_object_list(res, src=0)
        if isinstance(res[0], BaseException):
            raise res[0]
        root, tag, manifest = res[0]
        changes = ckpt.resume_changes(manifest, self.manifest(), root / tag)
        if manifest.get("world_size") != self.world or manifest.get("zero_stage") != self.cfg.deepspeed.zero_stage:
            raise ckpt.CheckpointError(
                f"{root / tag}: written by {manifest.get('world_size')} ranks with ZeRO stage "
                f"{manifest.get('zero_stage')}; this job has {self.world} ranks and stage "
                f"{self.cfg.deepspeed.zero_stage}. Resume with the same, or export it ('rest-ds export') and "
                f"start a new run from the exported weights")
        state = ckpt.load_checkpoint(self.engine, root, tag, rank=self.rank)
        step = int(manifest["step"])
        if changes:
            if any(k.startswith(("optimizer.", "schedule.")) or k == "train.steps" for k, _, _ in changes):
                apply_optimizer_config(self.scheduler, self.cfg, step)
            if self.is0:
                self._log(ckpt.describe_changes(changes, step))
        if state is not None:
            torch.set_rng_state(state["torch_rng"])
            if rng_state(self.model) is not None:  # the grid-invariant stream, where the model has one
                set_rng_state(self.model, state.get("spim_rng"))
        if self.cfg.deepspeed.zero_stage == 3:
            zero3_spatial_hooks(self.engine.module)
        return int(manifest["step"])

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        start = self.start_step = self.resume()
        self.tb = None
        if self.is0:
            self._log(self.describe(start))
            self._init_logs(start)
            try:  # TensorBoard only when installed
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=start + 1)
            except Exception:
                self.tb = None
        bar = None
        if self.is0 and t.progress and sys.stderr.isatty():
            from tqdm import tqdm
            bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, leave=False)
        t_loop = time.monotonic()
        t_last, n_last = t_loop, 0
        for step in range(start, t.steps):
            loss = self.train_step(step)
            done = step + 1
            lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else cfg.optimizer.lr
            row = {"step": done, "loss": loss, "lr": lr, "seconds": time.monotonic() - t_loop}
            self.history.append(row)
            n_last += 1
            if self.is0:
                self._append_csv("train_log.csv", row)
                if self.tb is not None:
                    self.tb.add_scalar("train/loss", loss, done)
                    self.tb.add_scalar("train/lr", lr, done)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                if t.log_interval and (done % t.log_interval == 0 or done == t.steps):
                    dt = (time.monotonic() - t_last) / max(n_last, 1)
                    self._print(bar, f"step {done}/{t.steps}  loss {loss:.4f}  lr {lr:.2e}  {dt:.2f} s/step")
                    t_last, n_last = time.monotonic(), 0
            if not math.isfinite(loss):
                raise FloatingPointError(f"step {done}: the loss is {loss}; lower optimizer.lr or check the data")
            if t.eval_interval and (done % t.eval_interval == 0 or done == t.steps):
                te = time.monotonic()
                m = self.evaluate()
                self.last_metrics = {"step": done, **m}
                erow = {"step": done, "mIoU": m["mIoU"], "OA": m["OA"], "mF1": m["mF1"], "kappa": m["kappa"],
                        **{f"IoU_{k}": v["IoU"] for k, v in m["per_class"].items()}}
                self.eval_history.append(erow)
                if self.is0:
                    self._append_csv("eval_log.csv", erow)
                    if self.tb is not None:
                        for k in ("mIoU", "OA", "mF1", "kappa"):
                            self.tb.add_scalar(f"val/{k}", m[k], done)
                    self._print(bar, f"eval step {done}: mIoU {m['mIoU']:.4f}  OA {m['OA']:.4f}  mF1 {m['mF1']:.4f}  "
                                     f"kappa {m['kappa']:.4f}  [{time.monotonic() - te:.1f} s]")
                t_last, n_last = time.monotonic(), 0  # evaluation/saving time is not step time
            if t.checkpoint_interval and (done % t.checkpoint_interval == 0 or done == t.steps):
                path = self.save(done)
                if self.is0:
                    self._print(bar, f"checkpoint {path}")
                t_last, n_last = time.monotonic(), 0  # evaluation/saving time is not step time
        if bar is not None:
            bar.close()
        self.prefetch.close()
        elapsed = time.monotonic() - t_loop
        summary = {"steps": t.steps, "start_step": start, "train_seconds": elapsed, "setup_seconds": self.setup_s,
                   "final_loss": self.history[-1]["loss"] if self.history else None, "eval": self.last_metrics}
        if self.is0:
            ckpt.atomic_write_json(self.out / "metrics.json", summary)
            self._plot()
            if self.tb is not None:
                self.tb.close()
        dist.barrier()
        return summary

    # -- logging ------------------------------------------------------------------------------------
    def describe(self, start: int) -> str:
        cfg = self.cfg
        shown = [f"{s.name} {'x'.join(map(str, s.reader.shape))}" for s in self.train_scenes[:3]]
        more = len(self.train_scenes) - len(shown)
        scenes = ("scene " if len(self.train_scenes) == 1 else f"{len(self.train_scenes)} scenes ") + ", ".join(shown)
        n = dsc.param_count(self.model)
        mode = (f"whole scenes, sp={self.mesh.sp} grid {self.grid[0]}x{self.grid[1]}, dp={self.mesh.dp}"
                if cfg.data.mode == "whole" else
                f"crops {cfg.data.crop_size}px x {cfg.data.crops_per_rank}/rank, dp={self.mesh.dp}")
        return (f"train {cfg.name}: {self.world} rank(s) ({dist.get_backend()}, {self.threads} thread(s) each), {mode}; "
                f"ZeRO {cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}; model {self.model_cfg['encoder']['name']}"
                f" + {self.model_cfg['decoder']['name']} ({n / 1e6:.2f} M params, align {self.align}); "
                f"{scenes}{f' and {more} more' if more else ''}; "
                f"steps {start}->{cfg.train.steps}; output {self.out}")

    def _print(self, bar, msg: str) -> None:
        if bar is not None:
            bar.write(msg)
        else:
            self._log(msg)

    def _init_logs(self, start: int) -> None:
        """Keep the log rows up to ``start`` (a resumed run rewrites the steps after it)."""
        for name in ("train_log.csv", "eval_log.csv"):
            p = self.out / name
            if not p.is_file():
                continue
            if start == 0:
                p.unlink()
                continue
            with open(p, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
            with open(p, "w", newline="") as f:
                if rows:
                    w = csv.DictWriter(f, fieldnames=list(rows[0]))
                    w.writeheader()
                    w.writerows(rows)

    def _append_csv(self, name: str, row: dict) -> None:
        p = self.out / name
        new = not p.is_file() or p.stat().st_size == 0
        with open(p, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    def _plot(self) -> None:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception:  # pragma: no cover
            return
        rows = _read_csv(self.out / "train_log.csv")
        evals = _read_csv(self.out / "eval_log.csv")
        if not rows:
            return
        fig, ax = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 5, 3.5), squeeze=False)
        ax[0, 0].plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], lw=1)
        ax[0, 0].set_xlabel("step")
        ax[0, 0].set_ylabel("training loss")
        ax[0, 0].set_yscale("log")
        if evals:
            ax[0, 1].plot([int(r["step"]) for r in evals], [float(r["mIoU"]) for r in evals], "o-")
            ax[0, 1].set_xlabel("step")
            ax[0, 1].set_ylabel(f"mIoU ({self.cfg.data.val_region or 'all'} region)")
        fig.suptitle(self.cfg.name)
        fig.tight_layout()
        fig.savefig(self.out / "training_curve.png", dpi=100)
        plt.close(fig)


def _read_csv(p: Path) -> list[dict]:
    if not p.is_file():
        return []
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


__all__ = ["Trainer", "init_job", "build_model", "make_optimizer", "make_scheduler", "group_lr_factor", "lr_factor",
           "apply_optimizer_config", "deepspeed_config",
           "zero3_spatial_hooks", "check_functionals", "set_threads", "enable_activation_checkpointing", "quiet_deepspeed"]
