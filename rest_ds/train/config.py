"""Training configuration: dataclasses that map one to one onto a YAML file.

``rest-ds train --config configs/NAME.yaml [key=value ...]`` loads the YAML,
applies the ``key=value`` overrides (dotted keys, YAML values:
``optimizer.lr=3e-4 mesh.grid=2x1 data.scenes=[a.yaml,b.yaml]``), then
validates every key: an unknown key or a value of the wrong type or range
raises :class:`ConfigError` naming the key (``data.mode: 'crops' is not one
of whole, crop``), with a suggestion for misspelt keys.

Sections (every field has a default except ``data.scenes``)::

    name: nc-rest                  # run name; output_dir defaults to runs/<name>
    output_dir: null
    seed: 0
    model: models/x.yaml           # a model YAML (relative to this file), or a mapping of
                                   # rest_ds.models.ModelConfig fields, or {from: models/x.yaml,
                                   # <fields merged over it>}; num_classes and encoder.in_chans
                                   # default to the scene's; parsed as a ModelConfig
    data:    {scenes, val_scenes, train_region, val_region, cache, scan, mode, crop_size,
              crops_per_rank, min_labelled, tile_cache_mb,
              augment: {flip, rot90, crop, brightness, shift, noise}}
    mesh:    {sp, grid, attention}
    deepspeed: {zero_stage, precision, gradient_clipping, gradient_accumulation_steps, config}
    optimizer: {name, lr, weight_decay, momentum, betas, eps}
    schedule:  {name, warmup_steps, min_lr_ratio, power}
    train:   {steps, log_interval, eval_interval, checkpoint_interval, keep_checkpoints, resume,
              activation_checkpointing, class_weights, label_smoothing, threads, deterministic,
              progress, eval_slide_overlap}
    finetune: {freeze_encoder, freeze_layers, unfreeze_step, encoder_lr, layer_decay,
               lora: {r, alpha, dropout, targets}}

See ``configs/README.md`` for what each key means.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ..cli_args import parse_grid
from ..config_schema import ConfigError, bounded, load_yaml, parse_dataclass
from ..models.config import ModelConfig


# --- sections ----------------------------------------------------------------------------------
@dataclass
class AugmentSection:
    """Scene augmentation, identical over an sp group (rest_ds.data.augment).
    ``crop``: ``[lo, hi]`` side fraction of a random sub-scene, or null."""

    flip: bool = True
    rot90: bool = True
    crop: list[float] | None = None
    brightness: float = bounded(0.0, ge=0)
    shift: float = bounded(0.0, ge=0)
    noise: float = bounded(0.0, ge=0)


_FP32_MAX = 3.4028234663852886e38  # the largest fp32: an lr at or above it overflows in the optimizer step

@dataclass
class DataSection:
    """``scenes``: sample names (``nc-landsat7``) or scene YAML paths (relative
    to the config file). ``mode``: ``whole`` trains on whole (augmented)
    scenes split over the sp ranks; ``crop`` is the cropping baseline: each
    rank trains on ``crops_per_rank`` random ``crop_size`` crops holding at
    least ``min_labelled`` labelled pixels (sp = 1, every rank data-parallel).
    ``tile_cache_mb``: host memory per rank for the source windows whole-scene
    training and evaluation read again at every step (normalised image and labels,
    :class:`rest_ds.data.WindowCache`); 0: read them from disk every time."""

    scenes: list[str] = field(default_factory=list)
    val_scenes: list[str] | None = None
    train_region: str | None = "train"
    val_region: str | None = "val"
    cache: str | None = None
    scan: bool = True
    mode: Literal["whole", "crop"] = "whole"
    crop_size: int = bounded(128, ge=1)
    crops_per_rank: int = bounded(4, ge=1)
    min_labelled: float = bounded(0.05, ge=0, le=1)
    tile_cache_mb: float = bounded(1024.0, ge=0)
    augment: AugmentSection = field(default_factory=AugmentSection)


@dataclass
class MeshSection:
    """``sp``: ranks per scene (null: all ranks; crop mode: 1). ``grid``:
    ``auto`` (the smallest largest tile, then the least halo traffic) or ``PHxPW``. ``attention``: ``auto``,
    ``ulysses`` or ``allgather``."""

    sp: int | None = bounded(None, ge=1)
    grid: str = "auto"
    attention: Literal["auto", "ulysses", "allgather"] = "auto"


@dataclass
class DeepSpeedSection:
    """``zero_stage`` 0-3 over all ``dp x sp`` ranks; ``precision``: fp32 (CPU),
    bf16 or fp16 (GPU); ``gradient_clipping``: max global norm (0: off);
    ``reduce_bucket_size`` / ``allgather_bucket_size``: ZeRO 1-3's gradient
    buckets in values (null: min(5e8, the model's parameter count), so a small
    model does not allocate DeepSpeed's 5e8-value default; ``rest-ds plan`` uses
    the same value); ``config``: further raw DeepSpeed config keys, merged last."""

    zero_stage: int = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_clipping: float = 0.0
    gradient_accumulation_steps: int = 1
    reduce_bucket_size: int | None = None
    allgather_bucket_size: int | None = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerSection:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = bounded(1e-3, gt=0)
    weight_decay: float = bounded(0.01, ge=0)
    momentum: float = bounded(0.9, ge=0, lt=1)
    betas: list[float] = bounded(default_factory=lambda: [0.9, 0.999], ge=0, lt=1)
    eps: float = bounded(1e-8, gt=0)


@dataclass
class ScheduleSection:
    """Learning rate multiplier per optimizer step: linear warm-up over
    ``warmup_steps``, then ``constant``, ``cosine`` or ``poly`` (power
    ``power``) or ``linear`` decay to ``min_lr_ratio`` at ``train.steps``."""

    name: Literal["constant", "cosine", "poly", "linear"] = "cosine"
    warmup_steps: int = bounded(0, ge=0)
    min_lr_ratio: float = bounded(0.0, ge=0, le=1)
    power: float = bounded(1.0, gt=0)


@dataclass
class TrainSection:
    """``steps``: optimizer steps. Intervals are in steps (0: never, except a
    final evaluation and checkpoint at the end when the interval is > 0).
    ``resume``: ``auto`` (latest checkpoint in the output folder, if any),
    ``none``, or a checkpoint folder. ``class_weights``: null, ``sqrt_inv``
    (1/sqrt of the class frequency, normalised to mean 1) or one weight per
    class. ``threads``: torch threads per rank (null: $OMP_NUM_THREADS or 1)."""

    steps: int = bounded(100, ge=1)
    log_interval: int = bounded(10, ge=0)
    eval_interval: int = bounded(50, ge=0)
    checkpoint_interval: int = bounded(50, ge=0)
    keep_checkpoints: int = bounded(2, ge=1)
    resume: str = "auto"
    activation_checkpointing: bool = False
    class_weights: str | list[float] | None = None
    label_smoothing: float = bounded(0.0, ge=0, lt=1)
    threads: int | None = bounded(None, ge=1)
    deterministic: bool = False
    progress: bool = True
    eval_slide_overlap: int | None = bounded(None, ge=0)


@dataclass
class LoraSection:
    """LoRA adapters (``peft``) on the encoder's attention projections: rank ``r``,
    scaling ``alpha / r``, ``dropout`` on the adapter input, ``targets``: module
    name suffixes (null: the encoder's attention input/output projections)."""

    r: int = bounded(8, ge=1)
    alpha: float = 16.0
    dropout: float = bounded(0.0, ge=0, lt=1)
    targets: list[str] | None = None


@dataclass
class FinetuneSection:
    """Fine-tuning controls (rest_ds/train/finetune.py): ``freeze_encoder`` (all of
    it) or ``freeze_layers`` k (embedding + the first k - 1 blocks of a ViT),
    trained again from ``unfreeze_step`` (null: never); ``encoder_lr`` (null:
    optimizer.lr); ``layer_decay`` (ViT encoders: block i at decay^(L+1-i));
    ``lora``: adapters instead of the encoder's weights (null: off). Norms,
    biases and position tables never get weight decay."""

    freeze_encoder: bool = False
    freeze_layers: int | None = bounded(None, ge=1)
    unfreeze_step: int | None = bounded(None, ge=1)
    encoder_lr: float | None = bounded(None, gt=0)
    layer_decay: float | None = bounded(None, gt=0, le=1)
    lora: LoraSection | None = None


@dataclass
class TrainConfig:
    name: str = "run"
    output_dir: str | None = None
    seed: int = 0
    model: ModelConfig | None = None
    data: DataSection = field(default_factory=DataSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    source_file: str | None = field(default=None, metadata={"internal": True})

    # -- derived ---------------------------------------------------------------------------
    @property
    def out_dir(self) -> str:
        return self.output_dir or os.path.join("runs", self.name)

    def grid(self) -> tuple[int, int] | None:
        """The configured grid, or None for ``auto``."""
        return None if self.mesh.grid == "auto" else parse_grid(self.mesh.grid)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source_file", None)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=110)

    # -- checks ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Consistency checks (types and the fields' ranges are checked while parsing)."""
        w = self.source_file

        def need(ok: bool, key: str, msg: str):
            if not ok:
                raise ConfigError(w, key, msg)

        need(bool(self.name) and "/" not in self.name, "name", f"must be a non-empty name without '/', got {self.name!r}")
        need(len(self.data.scenes) > 0, "data.scenes", "give at least one scene (a sample name or a scene YAML path)")
        for key, lr in (("optimizer.lr", self.optimizer.lr), ("finetune.encoder_lr", self.finetune.encoder_lr)):
            # the optimizer step computes in fp32: a larger lr failed there with torch's overflow error
            if lr is not None and lr >= _FP32_MAX:
                raise ConfigError(w, key, f"{lr:g} does not fit fp32 (the optimizer's arithmetic); must be < "
                                          f"{_FP32_MAX:.4g}")
        need(self.data.val_scenes is None or len(self.data.val_scenes) > 0, "data.val_scenes",
             "must be null (the training scenes) or a non-empty list")
        a = self.data.augment
        if a.crop is not None:
            need(len(a.crop) == 2 and 0 < a.crop[0] <= a.crop[1] <= 1, "data.augment.crop",
                 f"must be [lo, hi] with 0 < lo <= hi <= 1, got {a.crop}")
        if self.mesh.grid != "auto":
            try:
                g = parse_grid(self.mesh.grid)
            except ValueError as e:
                raise ConfigError(w, "mesh.grid", f"{e}, or 'auto'") from None
            need(self.mesh.sp is None or g[0] * g[1] == self.mesh.sp, "mesh.grid",
                 f"{self.mesh.grid} has {g[0] * g[1]} tiles but mesh.sp is {self.mesh.sp}")
        if self.data.mode == "crop":
            need(self.mesh.sp in (None, 1) and self.mesh.grid in ("auto", "1x1"), "mesh.sp",
                 "data.mode 'crop' trains on independent crops: sp must be 1 (leave mesh.sp null and mesh.grid auto)")
        d = self.deepspeed
        need(d.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {d.zero_stage}")
        need(d.gradient_clipping >= 0, "deepspeed.gradient_clipping", f"must be >= 0, got {d.gradient_clipping}")
        need(d.gradient_accumulation_steps >= 1, "deepspeed.gradient_accumulation_steps",
             f"must be >= 1, got {d.gradient_accumulation_steps}")
        for k in ("reduce_bucket_size", "allgather_bucket_size"):
            v = getattr(d, k)
            need(v is None or v >= 2, f"deepspeed.{k}", f"must be >= 2 values (or null: sized to the model), got {v}")
        need(d.allgather_bucket_size is None or d.allgather_bucket_size % 2 == 0, "deepspeed.allgather_bucket_size",
             f"must be even (DeepSpeed aligns all-gathers to 2 values), got {d.allgather_bucket_size}")
        reserved = {"optimizer", "scheduler", "zero_optimization", "fp16", "bf16", "gradient_clipping",
                    "gradient_accumulation_steps", "train_micro_batch_size_per_gpu", "train_batch_size"}
        for k in d.config:
            need(k not in reserved, f"deepspeed.config.{k}",
                 "is set from the other keys of the config (optimizer:, deepspeed.zero_stage, ...)"
                 if k != "zero_optimization" else "set deepspeed.zero_stage, deepspeed.reduce_bucket_size and "
                 "deepspeed.allgather_bucket_size; other ZeRO options are not exposed")
        o = self.optimizer
        need(len(o.betas) == 2, "optimizer.betas", f"must be two numbers in [0, 1), got {o.betas}")
        ft = self.finetune
        need(not (ft.freeze_encoder and ft.freeze_layers), "finetune.freeze_layers",
             "give freeze_encoder (all of it) or freeze_layers (the first k), not both")
        need(ft.unfreeze_step is None or ft.freeze_encoder or ft.freeze_layers, "finetune.unfreeze_step",
             "nothing is frozen (set finetune.freeze_encoder or finetune.freeze_layers)")
        t = self.train
        if isinstance(t.class_weights, str):
            need(t.class_weights == "sqrt_inv", "train.class_weights",
                 f"must be null, 'sqrt_inv' or a list of weights, got {t.class_weights!r}")
        elif t.class_weights is not None:
            need(all(x >= 0 for x in t.class_weights) and any(x > 0 for x in t.class_weights),
                 "train.class_weights", f"weights must be >= 0 and not all 0, got {t.class_weights}")
        if t.eval_slide_overlap is not None and self.data.mode == "crop":
            need(t.eval_slide_overlap < self.data.crop_size, "train.eval_slide_overlap",
                 f"must be smaller than data.crop_size ({self.data.crop_size})")
        need(self.model is not None, "model",
             "give the model: a model YAML path (configs/models/...) or a mapping of ModelConfig fields")
        # the model section's values and decoder/neck arguments (encoder arguments: preflight, when it is built)
        self.model.validate(w)


# --- loading ---------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optimizer.lr=3e-4'`` -> ``(['optimizer', 'lr'], 3e-4)`` (the value is YAML)."""
    if "=" not in text:
        raise ConfigError(None, text, "an override must be KEY=VALUE (e.g. optimizer.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(None, text, "an override must be KEY=VALUE with a dotted key (e.g. train.steps=10)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _text_field(keys: list[str]) -> bool:
    """Whether the dotted key names a field of the train config typed ``str`` (or ``str | None``)."""
    import typing

    tp: Any = TrainConfig
    for k in keys:
        if not dataclasses.is_dataclass(tp):
            return False
        hints = typing.get_type_hints(tp)
        if k not in hints:
            return False
        tp = hints[k]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and type(None) in typing.get_args(tp):
            tp = args[0]
    return tp is str


def _set(d: dict, path: list[str], value, where) -> None:
    cur = d
    for i, p in enumerate(path[:-1]):
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(where, ".".join(path[: i + 1]), f"is {nxt!r}, not a section; cannot set {'.'.join(path)}")
        cur = nxt
    cur[path[-1]] = value


def _resolve(path: str, base: str | None) -> str:
    p = os.path.expanduser(path)
    if os.path.isabs(p) or base is None:
        return p
    cand = os.path.join(base, p)
    # a config in configs/ naming configs/models/x.yaml means the repo-relative path too
    return cand if os.path.exists(cand) or not os.path.exists(p) else p


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                data: dict | None = None) -> TrainConfig:
    """Load a YAML config (or a mapping ``data``), apply overrides, validate.

    Scene and model paths are resolved relative to the config file (a path that
    exists relative to the working directory is kept as written)."""
    where = os.fspath(path) if path is not None else None
    if data is None:
        if where is None:
            raise ConfigError(None, "config", "no config given")
        data = load_yaml(where, "config") or {}
    data = _deepcopy(data)
    if not isinstance(data, dict):
        raise ConfigError(where, "config", "must be a mapping of sections (model, data, mesh, ...)")
    base = os.path.dirname(os.path.abspath(where)) if where else None
    parsed = [parse_override(o) for o in overrides]
    # a 'model: file.yaml' reference is expanded first so that model.* overrides apply to it
    for keys, value in parsed:
        if keys == ["model"]:
            data["model"] = value
    m = data.get("model")
    if isinstance(m, str) or (isinstance(m, dict) and "from" in m):
        ref = m if isinstance(m, str) else m["from"]
        if not isinstance(ref, str):
            raise ConfigError(where, "model.from", f"expected a model YAML path, got {ref!r}")
        mpath = _resolve(ref, base)
        if not os.path.isfile(mpath):
            raise ConfigError(where, "model", f"model config '{ref}' not found")
        loaded = load_yaml(mpath, "model") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(mpath, "model", "a model config must be a mapping")
        # 'from: file.yaml' plus keys: the file, with those keys merged over it
        data["model"] = _merge(loaded, {k: v for k, v in m.items() if k != "from"}) if isinstance(m, dict) else loaded
    for text, (keys, value) in zip(overrides, parsed):
        if keys != ["model"]:
            if isinstance(value, (bool, int, float)) and _text_field(keys):
                # YAML reads name=0x10 as 16 and name=yes as True; a text field takes the text as written
                value = text.split("=", 1)[1].strip()
            _set(data, keys, value, where)
    if base is not None and isinstance(data.get("model"), dict):
        # weight paths are relative to this config file, like scene and model paths
        m = data["model"]
        enc = m.get("encoder")
        if isinstance(enc, dict) and isinstance(enc.get("checkpoint"), str):
            enc["checkpoint"] = _resolve(enc["checkpoint"], base)
        if isinstance(m.get("init_from"), str):
            m["init_from"] = _resolve(m["init_from"], base)
    cfg = parse_dataclass(TrainConfig, data, where, "")
    cfg.source_file = where
    if base is not None:
        cfg.data.scenes = [_scene_ref(s, base) for s in cfg.data.scenes]
        if cfg.data.val_scenes is not None:
            cfg.data.val_scenes = [_scene_ref(s, base) for s in cfg.data.val_scenes]
    cfg.validate()
    return cfg


def _scene_ref(s: str, base: str) -> str:
    """Sample names stay names; YAML paths become absolute (relative to the config)."""
    if s.endswith((".yaml", ".yml")) or os.sep in s:
        return os.path.abspath(_resolve(s, base))
    return s


def _merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base`` (mappings recursively, anything else replaced)."""
    out = _deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else _deepcopy(v)
    return out


def _deepcopy(d):
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


__all__ = ["ConfigError", "TrainConfig", "DataSection", "AugmentSection", "MeshSection", "DeepSpeedSection",
           "OptimizerSection", "ScheduleSection", "TrainSection", "FinetuneSection", "LoraSection", "load_config", "parse_override"]
