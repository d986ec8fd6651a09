"""Cheap checks of a training config that need no launcher, no DeepSpeed and no data scan.

``rest-ds train`` runs :func:`check_train_config` on every rank before
``torch.distributed`` and DeepSpeed start, so a bad value fails in seconds with
one line (exit status 2) instead of after the launcher's start-up; a
preflight command can call the same functions. Each raises
:class:`~rest_ds.config_schema.ConfigError` naming the key (or
:class:`~rest_ds.train.lock.RunLockError` naming the other run).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..config_schema import ConfigError


def check_precision(cfg) -> None:
    """Nothing to refuse: fp16/bf16 need a GPU (DeepSpeed's CPU accelerator trains
    in fp32 only), and on a CPU-only machine the Trainer lowers them to fp32 with a
    one-line notice (issue 13: a GPU config must still run on CPU)."""
    return None


def check_model_names(cfg) -> None:
    """The encoder (and, through :meth:`ModelConfig.validate`, decoder/neck) names exist."""
    from ..models.config import import_encoders
    from ..models.registry import ENCODERS

    cfg.model.validate(cfg.source_file)
    import_encoders()
    name = cfg.model.encoder.name
    if name not in ENCODERS:
        raise ConfigError(cfg.source_file, "model.encoder.name",
                          f"unknown encoder '{name}' (known: {', '.join(sorted(ENCODERS))})")


def check_output_dir(cfg) -> None:
    """``output_dir`` can be created and written, and no live run holds its lock."""
    from .lock import LOCK_NAME, RunLockError, _alive

    from ..data.samples import unwritable_folder

    out = Path(cfg.out_dir)
    blocked = unwritable_folder(out / LOCK_NAME)
    if blocked is not None:
        raise ConfigError(cfg.source_file, "output_dir", f"{out}: cannot write there ({blocked} is not a writable "
                                                         f"folder)")
    lock = out / LOCK_NAME
    try:
        held = json.loads(lock.read_text())
    except (OSError, ValueError):
        return
    import socket

    pid = held.get("pid")
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if held.get("host") != socket.gethostname() and rank != 0:
        return   # a rank on another host cannot tell whether that run lives: rank 0 decides (lock.py)
    if (held.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0
            or _alive(pid, held.get("proc_start"))):
        raise RunLockError(f"{out}: output folder in use by another run (host {held.get('host')}, pid "
                           f"{held.get('pid')}, since {held.get('since')}; lock {lock}): give this run another "
                           f"output_dir, or wait for that one; if it is gone, remove {lock}")


def check_resume(cfg, world_size: int | None = None) -> None:
    """An explicit ``train.resume`` path names an existing folder, and the checkpoint
    it (or ``auto``) would resume from has the same model, optimizer type, precision,
    ZeRO stage, data mode and (when given) world size (its manifest is read), and
    none of its files pickles a type outside the allow-list (checkpoint.scan_checkpoint)."""
    from . import checkpoint as ckpt

    r = cfg.train.resume
    if r == "none":
        return
    if r != "auto" and not Path(r).exists():
        raise ConfigError(cfg.source_file, "train.resume", f"{r}: no such checkpoint folder")
    where = Path(cfg.out_dir) / "checkpoints" if r == "auto" else Path(r)
    try:
        root, tag, manifest = ckpt.find_checkpoint(where)
    except ckpt.NoCheckpoint:
        if r == "auto":   # nothing to resume: a new run
            return
        raise
    except ckpt.CheckpointError:
        if r == "auto":   # a damaged newest checkpoint: the trainer falls back to an older one (notice) or names it
            return
        raise
    ckpt.check_resume_config(manifest, cfg.to_dict(), world_size, root / tag)
    ckpt.scan_checkpoint(root / tag)


def check_mesh(cfg, ranks: int) -> int:
    """The run's sp (ranks per scene) on ``ranks`` ranks: ``mesh.sp`` divides them and a
    fixed ``mesh.grid`` has sp tiles (crop mode: 1, whatever the mesh says)."""
    w = cfg.source_file
    if cfg.data.mode == "crop":
        return 1
    fixed = cfg.grid()
    sp = cfg.mesh.sp or ranks  # as the trainer decides
    if ranks % sp:
        raise ConfigError(w, "mesh.sp", f"{sp} does not divide the {ranks} ranks (ranks = dp x sp)")
    if fixed and fixed[0] * fixed[1] != sp:
        raise ConfigError(w, "mesh.grid", f"{fixed[0]}x{fixed[1]} has {fixed[0] * fixed[1]} tiles but the run has "
                                          f"sp={sp} ({'mesh.sp' if cfg.mesh.sp else 'mesh.sp null: all ranks'}); "
                                          f"set mesh.sp={fixed[0] * fixed[1]} or another grid")
    return sp


def check_train_config(cfg, world_size: int | None = None) -> None:
    """All of the above (seconds; imports the model registry but builds nothing);
    with ``world_size`` also the mesh against it (:func:`check_mesh`)."""
    check_precision(cfg)
    if world_size is not None:
        check_mesh(cfg, world_size)
    check_resume(cfg, world_size)
    check_output_dir(cfg)
    check_model_names(cfg)


__all__ = ["check_train_config", "check_precision", "check_model_names", "check_output_dir", "check_resume",
           "check_mesh"]
