"""Model configs: dataclasses that map one to one onto YAML, and ``build_segmentor``.

A model YAML (``configs/models/*.yaml``) and the ``model:`` section of a
training config hold the fields of :class:`ModelConfig` (parsed by
``rest_ds.config_schema``, like every YAML of the project)::

    num_classes: 7
    encoder:   {name: ..., in_chans: 3, bands: null, checkpoint: null, kwargs: {...}}
    neck:      {name: simple_pyramid, kwargs: {...}}          # or null
    decoder:   {name: upernet, channels: 128, norm: bn, dropout: 0.1, kwargs: {...}}
    aux_head:  {name: fcn, level: -2, weight: 0.4, channels: 64, ...}   # or null

Every key is a dataclass field and every field a key: unknown keys, values of
the wrong type and out-of-range values raise :class:`ConfigError` naming the
key (``model.decoder.norm``). A field left ``null`` (channels, norm, dropout,
in_chans, ...) is not passed on, so the factory's own default applies.
``kwargs`` are passed to the factory as keyword arguments and checked against
its signature when the config is validated (decoders, necks) or built
(encoders, which may live in modules imported only then).

``build_segmentor(cfg)`` builds, by registry name:

* the encoder: ``build_encoder(name, **kwargs, in_chans=..., bands=...,
  checkpoint=...)`` (the last three only when set, ``in_chans`` defaulting to
  ``len(bands)``, ``bands`` only to factories that take it; the factory owns
  checkpoint loading and band adaptation). It must follow the encoder contract of
  ``rest_ds.models.registry`` (``out_channels``, ``strides``, ``align``);
* the neck: ``build_neck(name, encoder.out_channels, encoder.strides, **kwargs)``;
* the decoder: ``build_decoder(name, in_channels, strides, num_classes,
  channels=, norm=, dropout=, **kwargs)`` on the neck's (else the encoder's) levels;
* the aux head: the same for decoder ``aux_head.name`` built on level
  ``aux_head.level`` alone.

* ``init_from``: weights of the whole segmentor (a ``rest-ds export``
  ``.safetensors``, or any state dict with the segmentor's keys) loaded
  strictly after building: a new run from an exported model, on any number of
  ranks or ZeRO stage (they are plain weights, loaded before parallelizing).

Paths (``encoder.checkpoint``, ``init_from``) are used as written here; a
training config resolves them relative to the config file
(``rest_ds.train.config.load_config``). Every load leaves one line in
``segmentor.load_reports`` (file, keys loaded / missing / unexpected /
resized, band rule).
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config_schema import ConfigError, bounded, check_ranges, load_yaml, parse_dataclass
from . import decoders as _decoders  # noqa: F401  (registers the decoders)
from .decoders import NORMS
from .necks import NECKS, build_neck
from .registry import DECODERS, ENCODERS, build_decoder, build_encoder, import_encoders
from .segmentor import Segmentor


@dataclass
class EncoderConfig:
    """``name``: registered encoder; ``in_chans``: input bands (default: the
    factory's, or ``len(bands)``); ``bands``: the input bands in order, names
    or centre wavelengths in nm (for band adaptation of a checkpoint, see
    ``rest_ds.models.encoders.bands``); ``checkpoint``: weights file the
    factory loads; ``kwargs``: further factory arguments."""

    name: str
    in_chans: int | None = bounded(None, ge=1)
    bands: list[str | float] | None = None
    checkpoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class NeckConfig:
    """``name``: registered neck (``rest_ds.models.necks``); ``kwargs``: its arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DecoderConfig:
    """``name``: registered decoder; ``channels`` / ``norm`` (``bn``, ``gn``, ``ln``,
    ``none``) / ``dropout``: common arguments (null: the decoder's default);
    ``kwargs``: decoder-specific ones (``pool_scales``, ``ppm_norm``, ``in_index`` ...)."""

    name: str
    channels: int | None = bounded(None, ge=1)
    norm: str | None = None
    dropout: float | None = bounded(None, ge=0, lt=1)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class AuxHeadConfig:
    """Auxiliary head (training only): decoder ``name`` on feature level ``level``
    (after the neck; negative counts from the coarsest), loss weight ``weight``."""

    name: str = "fcn"
    level: int = -2
    weight: float = bounded(0.4, ge=0)
    channels: int | None = bounded(None, ge=1)
    norm: str | None = None
    dropout: float | None = bounded(None, ge=0, lt=1)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """A segmentor: encoder, optional neck, decoder, optional auxiliary head.
    ``num_classes``: null (a training config's ``model:`` section) is filled in
    from the scenes; building needs it set."""

    encoder: EncoderConfig
    decoder: DecoderConfig
    num_classes: int | None = bounded(None, ge=1)
    neck: NeckConfig | None = None
    aux_head: AuxHeadConfig | None = None
    init_from: str | None = None  # whole-model weights (a rest_ds export) loaded after building

    # -- (de)serialisation -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> "ModelConfig":
        cfg = parse_dataclass(cls, data, where, "model")
        cfg.validate(where)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(path, "model", "config file not found")
        return cls.from_dict(load_yaml(path, "model"), where=path)

    def to_dict(self) -> dict[str, Any]:
        """Every field, nested dataclasses as mappings (the inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | os.PathLike) -> None:
        import yaml

        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False, default_flow_style=None, width=120)

    # -- checks ----------------------------------------------------------------------------
    def validate(self, where: str | None = None) -> None:
        """Value checks that need no encoder module; raises :class:`ConfigError`."""
        check_ranges(self, where, "model")  # parsing checked them; an instance built in code may not be
        e = self.encoder
        if e.bands is not None:
            if not e.bands or len(set(e.bands)) != len(e.bands):
                raise ConfigError(where, "model.encoder.bands",
                                  f"must be a non-empty list of distinct bands, got {e.bands}")
            if e.in_chans is not None and e.in_chans != len(e.bands):
                raise ConfigError(where, "model.encoder.bands",
                                  f"{len(e.bands)} band names but in_chans is {e.in_chans}")
        if self.neck is not None:
            _check_factory_kwargs(NECKS, "neck", self.neck.name, self.neck.kwargs, where, "model.neck",
                                  reserved=("in_channels", "strides"))
        for key, d in (("model.decoder", self.decoder), ("model.aux_head", self.aux_head)):
            if d is None:
                continue
            if d.norm is not None and d.norm not in NORMS:
                raise ConfigError(where, f"{key}.norm", f"must be one of {', '.join(NORMS)}, got {d.norm!r}")
            given = {k: v for k, v in (("channels", d.channels), ("norm", d.norm), ("dropout", d.dropout))
                     if v is not None}
            _check_factory_kwargs(DECODERS, "decoder", d.name, {**given, **d.kwargs}, where, key,
                                  reserved=("in_channels", "strides", "num_classes"), explicit=given, extra=d.kwargs)


def _signature_params(fn) -> tuple[set[str], bool]:
    params = inspect.signature(fn).parameters.values()
    return ({p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)},
            any(p.kind is p.VAR_KEYWORD for p in params))


def _check_factory_kwargs(table, kind, name, kwargs, where, key, reserved=(), explicit=None, extra=None):
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise ConfigError(where, f"{key}.name", f"unknown {kind} '{name}' (known: {known})")
    for k in reserved:
        if k in kwargs:
            raise ConfigError(where, f"{key}.kwargs.{k}", "is set by the builder, not by the config")
    if explicit and extra:
        for k in explicit:
            if k in extra:
                raise ConfigError(where, f"{key}.kwargs.{k}", f"duplicates {key}.{k}")
    names, var_kw = _signature_params(table[name])
    if var_kw:
        return
    for k in kwargs:
        if k not in names:
            sub = "kwargs." if extra is None or k in extra else ""
            options = sorted(names - set(reserved))
            raise ConfigError(where, f"{key}.{sub}{k}", f"{kind} '{name}' has no argument '{k}' "
                                                       f"(arguments: {', '.join(options)})")


# --- building -------------------------------------------------------------------------------

def _build_encoder(cfg: EncoderConfig, where) -> nn.Module:
    import_encoders()
    kwargs = dict(cfg.kwargs)
    in_chans = cfg.in_chans if cfg.in_chans is not None else (len(cfg.bands) if cfg.bands else None)
    names, var_kw = _signature_params(ENCODERS[cfg.name]) if cfg.name in ENCODERS else (set(), True)
    # band names are passed only to factories that take them (they adapt checkpoints);
    # otherwise they only set in_chans
    bands = cfg.bands if var_kw or "bands" in names else None
    for k, v in (("in_chans", in_chans), ("bands", bands), ("checkpoint", cfg.checkpoint)):
        if v is not None:
            if k in kwargs:
                raise ConfigError(where, f"model.encoder.kwargs.{k}", f"duplicates model.encoder.{k}")
            kwargs[k] = v
    _check_factory_kwargs(ENCODERS, "encoder", cfg.name, kwargs, where, "model.encoder", extra=cfg.kwargs)
    encoder = _built(where, "model.encoder", build_encoder, cfg.name, **kwargs)
    missing = [a for a in ("out_channels", "strides") if getattr(encoder, a, None) is None]
    if missing:
        raise ConfigError(where, "model.encoder.name", f"encoder '{cfg.name}' does not follow the encoder contract "
                                                       f"(no {', '.join(missing)}; see rest_ds.models.registry)")
    return encoder


def _built(where, key: str, build, name: str, *args, **kwargs) -> nn.Module:
    """``build(name, ...)``; a factory's ValueError (it refuses an argument's value: sizes,
    indices, scales) becomes a ConfigError naming the config section ``key``."""
    try:
        return build(name, *args, **kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(where, key, f"'{name}': {e}") from None


def _decoder_kwargs(d) -> dict[str, Any]:
    common = {k: v for k, v in (("channels", d.channels), ("norm", d.norm), ("dropout", d.dropout)) if v is not None}
    return {**common, **d.kwargs}


def build_segmentor(cfg: "ModelConfig | dict | str | os.PathLike", where: str | None = None) -> Segmentor:
    """A :class:`Segmentor` from a config (dataclass, mapping or YAML path); the
    config is kept as ``segmentor.config``. ``where``: the file named in errors
    (default: the YAML path, if one is given)."""
    if isinstance(cfg, (str, os.PathLike)):
        where = os.fspath(cfg)
        cfg = ModelConfig.from_yaml(cfg)
    elif isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    else:
        cfg.validate()
    if cfg.num_classes is None:
        raise ConfigError(where, "model.num_classes", "missing: give the number of classes (a training config fills "
                                                      "it in from the scenes)")
    encoder = _build_encoder(cfg.encoder, where)
    channels, strides = list(encoder.out_channels), list(encoder.strides)
    neck = None
    if cfg.neck is not None:
        neck = _built(where, "model.neck", build_neck, cfg.neck.name, channels, strides, **cfg.neck.kwargs)
        channels, strides = list(neck.out_channels), list(neck.strides)
    decoder = _built(where, "model.decoder", build_decoder, cfg.decoder.name, channels, strides, cfg.num_classes,
                     **_decoder_kwargs(cfg.decoder))
    aux_head, aux_level, aux_weight = None, -1, 0.0
    if cfg.aux_head is not None:
        a = cfg.aux_head
        if not -len(channels) <= a.level < len(channels):
            raise ConfigError(where, "model.aux_head.level",
                              f"{a.level} is out of range for the {len(channels)} feature levels the decoder sees")
        aux_head = _built(where, "model.aux_head", build_decoder, a.name, [channels[a.level]], [strides[a.level]],
                          cfg.num_classes, **_decoder_kwargs(a))
        aux_level, aux_weight = a.level, a.weight
    model = Segmentor(encoder, decoder, neck=neck, aux_head=aux_head, aux_level=aux_level, aux_weight=aux_weight)
    model.config = cfg
    model.load_reports = [r for r in (getattr(m, "load_report", None) for m in encoder.modules()) if r]
    if cfg.init_from is not None:
        model.load_reports.append(init_from(model, cfg.init_from, where))
    return model


def init_from(model: nn.Module, path: str | os.PathLike, where: str | None = None) -> str:
    """Load whole-model weights (``rest-ds export`` ``.safetensors`` or a state-dict
    file with the model's keys) into ``model`` strictly; returns the load report
    line. Raises :class:`ConfigError` naming ``model.init_from`` on a bad file or
    a model that does not match (e.g. another num_classes or encoder width)."""
    from .encoders.common import describe_source, load_report, load_strict, read_state_dict

    try:
        sd = read_state_dict(path)
        load_strict(model, sd, "model.init_from")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(where, "model.init_from", "; ".join(l.strip() for l in str(e).splitlines())[:600]) from None
    return load_report("model.init_from", describe_source(path), sd, model)


def load_model_config(path: str | os.PathLike) -> ModelConfig:
    """:meth:`ModelConfig.from_yaml`."""
    return ModelConfig.from_yaml(path)


__all__ = ["ConfigError", "EncoderConfig", "NeckConfig", "DecoderConfig", "AuxHeadConfig", "ModelConfig",
           "build_segmentor", "load_model_config", "import_encoders", "init_from"]
