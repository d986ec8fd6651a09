"""``rest-ds train --check``: everything about a run that can be checked in seconds
without starting its ranks, and its memory plan (rest_ds.train.plan).

Checks, in order (the first problem raises :class:`ConfigError` or
:class:`~rest_ds.data.DataError`, whose one-line message names the file and key):

* the config's own checks (:func:`rest_ds.train.validation.check_train_config`:
  output folder writable and free, resume path, encoder name);
* encoder arguments against the encoder factory's signature
  (:func:`check_encoder_kwargs`: unknown names, values of the wrong type);
* every training and validation scene, headers only (no pixel is read): files,
  band count (the same in every scene, and the model's ``in_chans``), band names
  (the same bands in the same order where scenes name them), a label
  on every training scene, the same classes everywhere and the model's
  ``num_classes``, the ``train_region`` / ``val_region`` the config names;
* the tile grid against the scene (``mesh.sp`` divides the ranks, each tile at
  least one alignment unit of the model on each side).

``fp16``/``bf16`` on a machine without a GPU is not an error (the trainer
trains in fp32 there); it is reported as a note.
"""
from __future__ import annotations

import inspect
import typing
import warnings
from pathlib import Path
from typing import Any

from ..config_schema import ConfigError


# --- encoder arguments -------------------------------------------------------------------------------
def _factory_params(fn) -> tuple[dict[str, inspect.Parameter], bool, dict]:
    """Named parameters of an encoder factory, whether it takes ``**kwargs``, and its
    type hints; a factory ``f(**kwargs) -> SomeModule`` is followed to ``SomeModule``."""
    sig = inspect.signature(fn)
    params = {p.name: p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    ret = hints.get("return")
    if var_kw and isinstance(ret, type):
        p2, v2, h2 = _factory_params(ret.__init__)
        p2.pop("self", None)
        params = {**p2, **params}
        var_kw = v2
        hints = {**h2, **{k: v for k, v in hints.items() if k != "return"}}
    return params, var_kw, hints


def _type_ok(tp, value) -> bool | None:
    """Whether ``value`` (from YAML) fits annotation ``tp``; None when it cannot tell."""
    if tp is Any or tp is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        verdicts = [_type_ok(a, value) for a in typing.get_args(tp)]
        return True if any(v is True for v in verdicts) else (None if any(v is None for v in verdicts) else False)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    base = origin or tp
    if isinstance(base, type):
        import collections.abc as abc

        if issubclass(base, (list, tuple)) or base in (abc.Sequence,):
            return isinstance(value, (list, tuple))
        if issubclass(base, dict) or base is abc.Mapping:
            return isinstance(value, dict)
    return None


def check_encoder_kwargs(cfg) -> None:
    """``model.encoder.kwargs`` against the encoder factory: each key must be one of
    its parameters (unless it takes ``**kwargs`` that go further than we can see) and
    each value must fit the parameter's type annotation."""
    from ..models.config import import_encoders
    from ..models.registry import ENCODERS

    import_encoders()
    name, kwargs = cfg.model.encoder.name, cfg.model.encoder.kwargs
    if name not in ENCODERS:
        return  # the name is checked by validation.check_model_names
    params, var_kw, hints = _factory_params(ENCODERS[name])
    for k, v in kwargs.items():
        key = f"model.encoder.kwargs.{k}"
        if k not in params:
            if var_kw:
                continue
            raise ConfigError(cfg.source_file, key, f"encoder '{name}' takes no argument '{k}' "
                                                    f"(it takes: {', '.join(sorted(params))})")
        tp = hints.get(k, params[k].annotation)
        if isinstance(tp, str):  # an annotation that could not be resolved
            continue
        if _type_ok(tp, v) is False:
            from ..config_schema import type_name

            raise ConfigError(cfg.source_file, key, f"{v!r} is not a valid {type_name(tp)} for encoder "
                                                    f"'{name}' argument '{k}'")


# --- scenes --------------------------------------------------------------------------------------------
def scene_headers(cfg) -> list[dict]:
    """Open every training and validation scene (metadata only) and check them against
    each other and the config; returns one dict per scene (name, ref, bands, height,
    width, classes, labelled, regions, role). Samples not fetched yet are listed with
    ``fetched: False`` (rank 0 fetches them at the start of training)."""
    from ..data import DataError, DataWarning, open_scene
    from ..data.samples import SAMPLES, is_fetched
    from .data import band_order_problem, resolve_scene

    d = cfg.data
    w = cfg.source_file
    refs = [("data.scenes", r, "train") for r in d.scenes]
    refs += [("data.val_scenes", r, "val") for r in (d.val_scenes or [])]
    out = []
    for key, ref, role in refs:
        if ref in SAMPLES and not is_fetched(ref, d.cache):
            out.append({"ref": ref, "name": ref, "role": role, "fetched": False})
            continue
        try:
            scene = resolve_scene(ref, d.cache, fetch=False)
        except ConfigError:
            raise
        except DataError as e:
            raise ConfigError(w, key, str(e)) from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DataWarning)  # datum-only CRS differences: 'rest-ds data info'
                r = open_scene(scene)
            with r:
                C, H, W = r.shape
                info = {"ref": ref, "name": scene.name, "role": role, "fetched": True, "bands": C, "height": H,
                        "width": W, "classes": list(scene.class_names or []) if r.label is not None else None,
                        "labelled": r.label is not None, "regions": sorted(scene.regions),
                        "band_names": list(scene.band_names or []),
                        "file": scene.source_file or str(ref)}
        except DataError as e:
            raise ConfigError(w, key, str(e)) from None
        out.append(info)
    seen = [s for s in out if s["fetched"]]
    for s in seen:
        key = "data.scenes" if s["role"] == "train" else "data.val_scenes"
        if s["bands"] != seen[0]["bands"]:
            raise ConfigError(w, key, f"scene '{s['name']}' ({s['file']}) has {s['bands']} bands, "
                                      f"'{seen[0]['name']}' has {seen[0]['bands']}")
        bad_bands = band_order_problem(seen[0]["band_names"], s["band_names"])
        if bad_bands:  # mixing band orders would train on silently wrong inputs
            raise ConfigError(w, key, f"scene '{s['name']}' ({s['file']}) {bad_bands} (compared with scene "
                                      f"'{seen[0]['name']}')")
        if not s["labelled"]:
            raise ConfigError(w, key, f"scene '{s['name']}' ({s['file']}) has no label")
        if s["classes"] != seen[0]["classes"]:
            raise ConfigError(w, key, f"scene '{s['name']}' has classes {s['classes']}, "
                                      f"'{seen[0]['name']}' has {seen[0]['classes']}")
        evaluates = cfg.train.eval_interval > 0
        region, rkey = (d.train_region, "data.train_region") if s["role"] == "train" else (
            d.val_region if evaluates else None, "data.val_region")
        if d.val_scenes is None and s["role"] == "train" and d.val_region is not None and evaluates \
                and d.val_region not in s["regions"]:
            raise ConfigError(w, "data.val_region", f"scene '{s['name']}' ({s['file']}) has no region "
                                                    f"'{d.val_region}' (regions: {', '.join(s['regions']) or 'none'})")
        if region is not None and region not in s["regions"]:
            raise ConfigError(w, rkey, f"scene '{s['name']}' ({s['file']}) has no region '{region}' "
                                       f"(regions: {', '.join(s['regions']) or 'none'})")
    return out


def _model_channels(cfg, bands: int | None, classes: int | None) -> tuple[int | None, int | None]:
    m = cfg.model
    enc = m.encoder
    want = enc.in_chans if enc.in_chans is not None else (len(enc.bands) if enc.bands else None)
    w = cfg.source_file
    if want is not None and bands is not None and int(want) != bands:
        raise ConfigError(w, "model.encoder.in_chans", f"the model takes {want} bands but the scenes have {bands}; "
                                                       f"set model.encoder.in_chans (or bands) to match")
    k = m.num_classes
    if k is not None and classes is not None and int(k) != classes:
        raise ConfigError(w, "model.num_classes", f"is {k} but the scenes have {classes} classes")
    return (bands if bands is not None else want), (classes if classes is not None else k)


def check_grid(cfg, ranks: int, align: int, hw: tuple[int, int],
               shapes: list[tuple[int, int]] = ()) -> tuple[int, tuple[int, int]]:
    """``(sp, grid)`` of the run on ``ranks`` ranks for a scene of ``hw``; raises when
    sp does not divide the ranks or a tile would be thinner than ``align``, in ``hw``
    or any of ``shapes`` (the other scenes, turned ones under rot90: as the trainer)."""
    from .data import fitting_grid, grid_fits
    from .validation import check_mesh

    w = cfg.source_file
    if cfg.data.mode == "crop":
        return 1, (1, 1)
    sp, fixed = check_mesh(cfg, ranks), cfg.grid()
    need = [tuple(hw), *shapes]
    grid = fixed or fitting_grid(hw, sp, align, need)
    bad = [s for s in need if grid is None or not grid_fits(grid, s, align)]
    if bad:
        what = f"{grid[0]}x{grid[1]} tiles do not fit" if grid else f"no grid of {sp} tiles fits"
        rot = " (data.augment.rot90 also turns the training scenes)" if cfg.data.augment.rot90 else ""
        raise ConfigError(w, "mesh.grid" if fixed else "mesh.sp", f"{what} a {bad[0][0]}x{bad[0][1]} scene{rot}: "
                                                                  f"each tile needs at least {align} px (the model's "
                                                                  f"alignment) per side")
    return sp, grid


def check_resume_scenes(cfg, scenes: list[dict]) -> None:
    """The checkpoint that ``train.resume`` would continue from was trained on the
    scenes' bands (count and names) and classes (names); ``scenes``: from
    :func:`scene_headers`. The trainer refuses such a resume too, but only once the
    ranks have opened the scenes: this refuses it before they start (and in
    ``train --check``). A missing or damaged checkpoint is left to ``check_resume``."""
    from . import checkpoint as ckpt

    seen = [s for s in scenes if s.get("fetched")]
    if cfg.train.resume == "none" or not seen:
        return
    where = Path(cfg.out_dir) / "checkpoints" if cfg.train.resume == "auto" else Path(cfg.train.resume)
    try:
        root, tag, man = ckpt.find_checkpoint(where)
    except (ckpt.CheckpointError, OSError):
        return
    s = seen[0]
    have = {"in_chans": s["bands"], "band_names": s["band_names"] or None,
            "classes": s["classes"]}
    old = {"in_chans": man.get("in_chans"), "band_names": man.get("band_names") or None,
           "classes": [c.get("name") if isinstance(c, dict) else c for c in man.get("classes") or []] or None}
    ckpt._refuse(root / tag, [(k, old[k], have[k]) for k in have
                              if old[k] is not None and have[k] is not None and old[k] != have[k]])


def preflight(cfg, ranks: int = 1) -> dict:
    """Run every check (module docstring); returns ``{"scenes", "in_chans",
    "num_classes", "sp", "grid", "notes"}``. Raises ConfigError on the first problem."""
    import torch

    from .validation import check_train_config

    check_train_config(cfg)
    check_encoder_kwargs(cfg)
    scenes = scene_headers(cfg)
    seen = [s for s in scenes if s["fetched"]]
    notes = [f"sample '{s['ref']}' is not fetched yet: rank 0 fetches it at the start (not checked)"
             for s in scenes if not s["fetched"]]
    bands = seen[0]["bands"] if seen else None
    classes = len(seen[0]["classes"]) if seen and seen[0]["classes"] is not None else None
    in_chans, num_classes = _model_channels(cfg, bands, classes)
    check_resume_scenes(cfg, scenes)
    if cfg.deepspeed.precision != "fp32" and not torch.cuda.is_available():
        notes.append(f"deepspeed.precision {cfg.deepspeed.precision} needs a GPU; on this CPU-only machine the run "
                     f"trains in fp32")
    return {"scenes": scenes, "in_chans": in_chans, "num_classes": num_classes, "notes": notes}


__all__ = ["preflight", "check_encoder_kwargs", "scene_headers", "check_grid", "check_resume_scenes"]
