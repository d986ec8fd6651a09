"""``rest-ds segment``: whole-scene inference into a georeferenced GeoTIFF on P ranks.

Every rank loads the exported model (checkpoint.py), reads only its tile of
the (padded) scene, computes its tile of the class map and writes only that
window of the output GeoTIFF; no rank holds the whole map.

* ``mode='whole'`` (REST): the model is parallelized over the P ranks, so each
  tile's logits are the whole-scene logits to fp32 rounding (docs/design.md
  section 2), so the map equals one process's except at top-2 ties within
  that rounding.
* ``mode='slide'`` (the cropping baseline): each rank averages the logits of
  the ``crop x crop`` windows overlapping its tile (inference.py); bit-identical
  for any P.

Output: single-band ``uint8`` GeoTIFF with the input's CRS and transform,
tiled (256 x 256) and DEFLATE-compressed, a colour table from the class
colours, class names as band metadata (``class_<value>=<name>``), nodata 255
on every pixel whose input is nodata. Pixel values are the classes' raw label
values when they are integers in 0..254 (``values='auto'``; e.g. 1..7 for
nc-landsat7, as in its ``strata.tif``), else the class ids 0..K-1. Optional:
per-class probabilities (float32, one band per class, nodata NaN) and a PNG
preview of the map.

Writing: rank 0 creates the file, then the ranks write their windows one
after the other (a GeoTIFF cannot be written by several processes at once);
the output folder must be shared by all ranks.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..data import DataError, SceneReader
from ..data.stats import BandStats
from ..spim import SpatialMesh, parallelize
from ..spim.tiling import TileLayout, choose_grid
from .checkpoint import CheckpointError, read_export
from .inference import padded_shape, predict_slide, predict_whole, read_padded

NODATA = 255


def exported_model_config(model_cfg: dict) -> dict:
    """The model config of an export without its weight sources: the export holds
    every weight, so the pretrained files the training run started from
    (``encoder.checkpoint``, ``init_from``) are not read again."""
    mcfg = {**model_cfg, "init_from": None}
    if isinstance(mcfg.get("encoder"), dict):
        mcfg["encoder"] = {**mcfg["encoder"], "checkpoint": None}
    return mcfg


def load_exported_model(path: str | os.PathLike):
    """``(model in eval mode, meta)`` from an exported model (``rest-ds export``)."""
    from .engine import build_model

    meta, sd = read_export(path)
    model, _ = build_model(exported_model_config(meta["model"]), num_classes=meta["num_classes"],
                           in_chans=meta["in_chans"])
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not match the model config (missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]})")
    model.eval()
    return model, meta


def class_values(meta: dict, values: str = "auto") -> np.ndarray:
    """The pixel value written for each class id (see the module docstring)."""
    K = int(meta["num_classes"])
    raw = [c.get("value") for c in meta.get("classes") or []]
    ok = len(raw) == K and all(isinstance(v, (int, float)) and float(v).is_integer() and 0 <= v < NODATA
                               for v in raw)
    if values == "raw" and not ok:
        raise CheckpointError("--values raw: the classes' raw values are not integers in 0..254")
    if values == "ids" or (values == "auto" and not ok):
        return np.arange(K, dtype=np.uint8)
    return np.asarray([int(v) for v in raw], dtype=np.uint8)


def _check_grid_fits(grid: tuple[int, int] | None, padded: tuple[int, int], align: int, input: str,
                     hw: tuple[int, int]) -> None:
    """A ``--grid`` whose tiles would be thinner than one alignment unit (SPIM's tiling
    error names no option) is refused naming ``--grid`` and the scene."""
    if grid is not None and (padded[0] // align < grid[0] or padded[1] // align < grid[1]):
        from ..data import DataError

        unit = f"{align} px (the model's alignment)" if align > 1 else "1 px"
        raise DataError(input, f"--grid {grid[0]}x{grid[1]}: the tiles do not fit the {hw[0]}x{hw[1]} scene; each "
                               f"needs at least {unit} per side")


MAP_SUFFIXES = (".tif", ".tiff")


def _input_files(ref: str, cache: str | None) -> list[Path]:
    """The files a segment input reads (the raster, or a scene YAML and its files)."""
    from ..data.samples import SAMPLES, sample_dir
    from ..data.scene import Scene

    p = Path(ref)
    if ref in SAMPLES and not p.exists():
        folder = sample_dir(ref, cache)
        return [f for f in folder.iterdir() if f.is_file()] if folder.is_dir() else []
    if p.is_dir() and (p / "scene.yaml").is_file():
        p = p / "scene.yaml"
    out = [p] if p.exists() else []
    if p.suffix.lower() in (".yaml", ".yml") and p.is_file():
        try:
            out += [Path(f) for f in Scene.from_yaml(p).files()]
        except Exception:  # a broken description is reported when the scene is opened
            pass
    return out


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(input: str, output: str, *, probs: str | None = None, preview: str | None = None,
                  overwrite: bool = False, cache: str | None = None) -> None:
    """Refuse, before any compute, outputs that would destroy an input or each other,
    a map or probabilities file not named ``.tif``/``.tiff`` (GeoTIFF is what is
    written), a preview not named ``.png``, a folder that cannot be written, and an
    existing output without ``overwrite``. Raises
    :class:`~rest_ds.data.DataError` naming the path."""
    from ..data import DataError
    from ..data.samples import unwritable_folder

    outs = [("--output", Path(output))] + [(k, Path(v)) for k, v in (("--probs", probs), ("--preview", preview)) if v]
    for flag, p in outs:
        want = (".png",) if flag == "--preview" else MAP_SUFFIXES
        if p.suffix.lower() not in want:
            kind = "a PNG" if flag == "--preview" else "a GeoTIFF"
            raise DataError(p, f"{flag} writes {kind}; name it {' or '.join('NAME' + w for w in want)}")
        if p.is_dir():
            raise DataError(p, f"{flag} is a directory")
    for i, (f1, p1) in enumerate(outs):
        for f2, p2 in outs[i + 1:]:
            if _same_file(p1, p2):
                raise DataError(p1, f"{f1} and {f2} are the same file; give them different names")
    inputs = _input_files(input, cache)
    for flag, p in outs:
        for src in inputs:
            if _same_file(p, src):
                raise DataError(p, f"{flag} is an input of the scene ({src}); writing it would destroy the input")
        if p.exists() and not overwrite:
            raise DataError(p, f"{flag} exists; pass --overwrite to replace it")
        blocked = unwritable_folder(p)
        if blocked is not None:
            raise DataError(p, f"{flag}: cannot write into {blocked} (not a writable folder)")


def _ctx():
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist.barrier
    return 0, 1, (lambda: None)


def _open_input(ref: str, meta: dict, cache: str | None, rank: int, barrier) -> SceneReader:
    from .data import band_order_problem, resolve_scene

    err = None
    scene = None
    if rank == 0:
        try:
            scene = resolve_scene(ref, cache, fetch=True)
        except BaseException as e:
            err = e
    barrier()
    if err is not None:
        raise err
    if rank != 0:
        scene = resolve_scene(ref, cache, fetch=False)
    import warnings

    from ..data import DataWarning

    with warnings.catch_warnings():  # datum-only CRS differences of the label: 'rest-ds data info' reports them
        warnings.simplefilter("ignore", DataWarning)
        reader = SceneReader(scene, expected_bands=int(meta["in_chans"]))
    bad = band_order_problem(meta.get("band_names"), scene.band_names)
    if bad:  # the model would read each band as another one: silently wrong maps
        reader.close()
        raise DataError(scene.source_file or ref, f"the scene {bad} (the model was trained on "
                                                  f"{', '.join(map(str, meta['band_names']))})")
    return reader


def _stats(reader: SceneReader, meta: dict, which: str, cache, rank: int, barrier) -> BandStats:
    if which == "model":
        n = meta["normalization"]
        return BandStats(tuple(n["mean"]), tuple(n["std"]), "model")
    from ..data import prepare_scene

    err, out = None, None
    for turn in (0, 1):  # rank 0 scans and caches first
        if (rank == 0) == (turn == 0):
            try:
                r, _, out = prepare_scene(reader.scene, expected_bands=reader.shape[0], cache_dir=cache)
                r.close()
            except BaseException as e:
                err = e
        barrier()
    if err is not None:
        raise err
    return out


def _profile(reader: SceneReader, count: int, dtype: str, nodata) -> dict:
    _, H, W = reader.shape
    block = 256
    prof = {"driver": "GTiff", "width": W, "height": H, "count": count, "dtype": dtype, "nodata": nodata,
            "compress": "deflate", "tiled": True, "blockxsize": block, "blockysize": block, "BIGTIFF": "IF_SAFER"}
    if reader.crs is not None:
        prof["crs"] = reader.crs
    if reader.transform is not None:
        prof["transform"] = reader.transform
    return prof


def write_windows(path: Path, profile: dict, window: tuple[slice, slice], data: np.ndarray | None, *, rank: int,
                  world: int, barrier, colormap: dict | None = None, tags: dict | None = None,
                  band_tags: dict | None = None) -> None:
    """Rank 0 creates ``path``; then rank by rank each writes ``data`` (``bands x h x w``)
    into its ``window`` (every rank calls this)."""
    import rasterio
    from rasterio.windows import Window

    tmp = path.with_name(f".{path.name}.partial")
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(tmp, "w", **profile) as dst:
            if colormap is not None:
                dst.write_colormap(1, colormap)
            if tags:
                dst.update_tags(**tags)
            for b, t in (band_tags or {}).items():
                dst.update_tags(b, **t)
    barrier()
    for r in range(world):
        if r == rank and data is not None:
            rows, cols = window
            with rasterio.open(tmp, "r+") as dst:
                dst.write(data, window=Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start))
        barrier()
    if rank == 0:
        os.replace(tmp, path)  # a crash never leaves a half-written map under the final name
    barrier()


def preview_png(map_path: Path, png: Path, max_side: int = 1024) -> None:
    """A colour PNG of a class map (decimated to ``max_side``; nodata transparent)."""
    import rasterio
    from PIL import Image

    with rasterio.open(map_path) as src:
        f = max(1, math.ceil(max(src.height, src.width) / max_side))
        a = src.read(1, out_shape=(math.ceil(src.height / f), math.ceil(src.width / f)))
        cmap = src.colormap(1)
    rgba = np.zeros(a.shape + (4,), np.uint8)
    for v, c in cmap.items():
        if v != NODATA:
            rgba[a == v] = c
    rgba[a == NODATA] = 0
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(png)


def segment(checkpoint: str, input: str, output: str, *, mode: str = "whole", crop: int | None = None,
            overlap: int | None = None, probs: str | None = None, preview: str | None = None,
            grid: tuple[int, int] | None = None, stats: str = "model", cache: str | None = None,
            values: str = "auto", threads: int | None = None, log=None, overwrite: bool = False) -> dict:
    """Segment the scene ``input`` (sample name, scene YAML or raster) into
    ``output``; call on every rank of a job (or in one process). Returns a
    summary (the same on every rank). Outputs are checked first (:func:`check_outputs`)."""
    from .engine import set_threads

    t0 = time.monotonic()
    rank, world, barrier = _ctx()
    check_outputs(input, output, probs=probs, preview=preview, overwrite=overwrite, cache=cache)
    set_threads(threads)
    model, meta = load_exported_model(checkpoint)
    # a GPU per rank under nccl (or a single process on a GPU machine); gloo ranks compute on the CPU
    gpu = torch.cuda.is_available() and (not dist.is_initialized() or dist.get_backend() == "nccl")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0) if gpu else None
    if device is not None:
        model.to(device)
    K, align = int(meta["num_classes"]), int(meta.get("align") or 1)
    reader = _open_input(input, meta, cache, rank, barrier)
    try:
        st = _stats(reader, meta, stats, cache, rank, barrier)
        C, H, W = reader.shape
        with torch.no_grad():
            if mode == "whole":
                Hp, Wp = padded_shape((H, W), align)
                g = grid or choose_grid(Hp, Wp, world, align)
                _check_grid_fits(grid, (Hp, Wp), align, input, (H, W))
                layout = TileLayout.even(Hp, Wp, g, align)
                mesh = SpatialMesh.build(sp=world, grid=g) if world > 1 else SpatialMesh.single()
                if world > 1:
                    parallelize(model, mesh, align=align)
                rows, cols = layout.tile(*mesh.coord)
                img, _, valid = read_padded(reader, rows, cols, (H, W), stats=st, with_label=False)
                x = torch.from_numpy(img)[None]
                logits = predict_whole(model, mesh, layout, x if device is None else x.to(device))[0].cpu()
            elif mode == "slide":
                trained = int(meta.get("crop_size") or 128)
                crop = crop or trained
                if overlap is None:  # the training run's overlap goes with its crop size; another --crop: crop / 4
                    overlap = int(meta.get("slide_overlap") or crop // 4) if crop == trained else crop // 4
                if overlap >= crop:
                    from ..data import DataError

                    raise DataError(None, f"--overlap {overlap} must be smaller than the window (--crop {crop}"
                                          f"{'' if crop != trained else ', the training crop size'})")
                g = grid or choose_grid(H, W, world, 1)
                _check_grid_fits(grid, (H, W), 1, input, (H, W))
                layout = TileLayout.even(H, W, g, 1)
                rows, cols = layout.tile(*divmod(rank, g[1]))
                logits, _ = predict_slide(model, reader, st, rows, cols, crop=crop, overlap=overlap, align=align,
                                          num_classes=K, progress=rank == 0 and sys.stderr.isatty(), device=device)
                _, _, valid = read_padded(reader, rows, cols, (H, W), stats=st, with_label=False)
            else:
                raise ValueError(f"mode must be 'whole' or 'slide', not {mode!r}")
        if g[0] * g[1] != world:
            raise ValueError(f"grid {g[0]}x{g[1]} has {g[0] * g[1]} tiles but the job has {world} ranks")
        r1, c1 = min(rows.stop, H), min(cols.stop, W)
        h, w = r1 - rows.start, c1 - cols.start
        logits = logits[:, :h, :w].float()
        valid = valid[:h, :w]
        vals = class_values(meta, values)
        pred = vals[logits.argmax(0).numpy()]
        pred[~valid] = NODATA
        window = (slice(rows.start, r1), slice(cols.start, c1))
        classes = meta.get("classes") or [{"name": str(k), "color": None} for k in range(K)]
        cmap = {int(vals[k]): tuple(int(v) for v in (classes[k].get("color") or (128, 128, 128))) + (255,)
                for k in range(K)}
        cmap[NODATA] = (0, 0, 0, 0)
        out = Path(output)
        write_windows(out, _profile(reader, 1, "uint8", NODATA), window, pred[None], rank=rank, world=world,
                      barrier=barrier, colormap=cmap,
                      tags={"rest_ds_mode": mode, "rest_ds_model": str(checkpoint)},
                      band_tags={1: {f"class_{int(vals[k])}": classes[k]["name"] for k in range(K)}})
        if probs:
            p = torch.softmax(logits, 0).numpy().astype(np.float32)
            p[:, ~valid] = np.nan
            write_windows(Path(probs), _profile(reader, K, "float32", float("nan")), window, p, rank=rank,
                          world=world, barrier=barrier,
                          band_tags={k + 1: {"class": classes[k]["name"]} for k in range(K)})
        if preview and rank == 0:
            preview_png(out, Path(preview))
        barrier()
        counts = np.bincount(pred[valid].astype(np.int64), minlength=256)[vals].tolist() if valid.any() else [0] * K
    finally:
        reader.close()
    summary = {"output": str(output), "mode": mode, "ranks": world, "grid": list(g), "shape": [H, W],
               "tile": [[rows.start, r1], [cols.start, c1]], "seconds": time.monotonic() - t0,
               "rank_class_counts": counts}
    if log is not None and rank == 0:
        log(f"segment {input} -> {output}: {mode}, {world} rank(s), grid {g[0]}x{g[1]}, {H}x{W} px "
            f"[{summary['seconds']:.1f} s]")
    return summary


def _segment_rank(kwargs: dict) -> dict:
    """Entry point of a locally spawned rank (rest_ds.spim.spawn)."""
    if "inputs" in kwargs:
        return segment_batch(**kwargs)
    return segment(**kwargs)


# --- many scenes in one launch ---------------------------------------------------------------------
SCENE_SUFFIXES = (".tif", ".tiff", ".yaml", ".yml", ".vrt", ".h5", ".hdf5", ".jp2")
BATCH_MANIFEST = "segment_batch.json"


def expand_inputs(refs: list[str]) -> list[str]:
    """Scene references from ``--input`` values, in order, duplicates dropped: a
    sample name, scene YAML or raster as is; a folder: its scene files (a folder
    with a ``scene.yaml`` is one scene); a glob pattern (``*``, ``?``, ``[``); a
    list file ``@FILE`` (one reference per line, ``#`` comments; relative to the
    file). Sorted within a folder or glob, so every rank expands them alike.
    Raises ValueError naming a value that matches nothing."""
    import glob

    out: list[str] = []
    for ref in refs:
        if ref.startswith("@"):
            lst = Path(ref[1:])
            if not lst.is_file():
                raise ValueError(f"--input {ref}: list file not found")
            lines = [ln.split("#", 1)[0].strip() for ln in lst.read_text().splitlines()]
            items = [str(lst.parent / ln) if not Path(ln).is_absolute() and (lst.parent / ln).exists() else ln
                     for ln in lines if ln]
            found = expand_inputs(items)
        elif any(c in ref for c in "*?["):
            found = sorted(str(p) for p in glob.glob(ref) if Path(p).suffix.lower() in SCENE_SUFFIXES or
                           (Path(p) / "scene.yaml").is_file())
        elif Path(ref).is_dir() and not (Path(ref) / "scene.yaml").is_file():
            d = Path(ref)
            found = sorted(str(p) for p in d.iterdir()
                           if (p.is_file() and p.suffix.lower() in SCENE_SUFFIXES and not p.name.startswith("."))
                           or (p.is_dir() and (p / "scene.yaml").is_file()))
        else:
            found = [ref]
        if not found:
            raise ValueError(f"--input {ref}: no scene found (folders: {', '.join(SCENE_SUFFIXES)} files)")
        out += [f for f in found if f not in out]
    return out


def batch_outputs(inputs: list[str], outdir: str) -> list[Path]:
    """One map per scene in ``outdir``: ``<name>.tif`` (a scene YAML or a folder with
    a scene.yaml: its parent folder's name when the file is called scene.yaml).
    Raises ValueError when two scenes would write the same file."""
    outs, seen = [], {}
    for ref in inputs:
        p = Path(ref)
        stem = p.name if p.is_dir() else (p.parent.name if p.name in ("scene.yaml", "scene.yml") else p.stem)
        o = Path(outdir) / f"{stem}.tif"
        if o in seen:
            raise ValueError(f"scenes {seen[o]} and {ref} would both write {o}; rename one or segment them apart")
        seen[o] = ref
        outs.append(o)
    return outs


def segment_batch(checkpoint: str, inputs: list[str], output: str, *, overwrite: bool = False, log=None,
                  **kwargs) -> dict:
    """Segment every scene of ``inputs`` (already expanded, :func:`expand_inputs`)
    into the folder ``output``, one ``<name>.tif`` each, in one job (call on every
    rank). A scene whose map a previous batch into this folder finished (recorded
    in ``segment_batch.json``, and the file still there) is skipped unless
    ``overwrite``; one that was started but not finished is redone. Other
    existing files are refused as in :func:`check_outputs`. ``kwargs`` go to
    :func:`segment` (``--probs``/``--preview`` are not supported per scene).
    Returns ``{"done": [...], "skipped": [...], "seconds": s, "results": [summaries]}``."""
    import json

    rank, world, barrier = _ctx()
    t0 = time.monotonic()
    outdir = Path(output)
    if rank == 0:
        outdir.mkdir(parents=True, exist_ok=True)
    barrier()
    man_path = outdir / BATCH_MANIFEST
    outs = batch_outputs(inputs, output)

    def read_manifest() -> dict:
        try:
            return json.loads(man_path.read_text())
        except (OSError, ValueError):
            return {}

    def write_manifest(m: dict) -> None:
        if rank == 0:
            tmp = man_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(m, indent=1))
            os.replace(tmp, man_path)

    man = read_manifest()
    done, skipped, results = [], [], []
    for ref, out in zip(inputs, outs):
        entry = man.get(out.name) or {}
        if not overwrite and entry.get("status") == "done" and out.is_file():
            skipped.append(str(out))
            if log is not None and rank == 0:
                log(f"segment {ref}: {out} is done (skipped; --overwrite redoes it)")
            continue
        ours = entry.get("status") == "started"  # a map this batch began and did not finish: redo it
        man[out.name] = {"input": ref, "status": "started", "model": str(checkpoint)}
        write_manifest(man)
        barrier()
        res = segment(checkpoint, ref, str(out), overwrite=overwrite or ours, log=log, **kwargs)
        man[out.name].update(status="done", seconds=round(res["seconds"], 3))
        write_manifest(man)
        done.append(str(out))
        results.append(res)
    barrier()
    return {"done": done, "skipped": skipped, "seconds": time.monotonic() - t0, "results": results,
            "ranks": world, "output": str(outdir)}


__all__ = ["segment", "segment_batch", "expand_inputs", "batch_outputs", "check_outputs", "load_exported_model", "class_values", "write_windows", "preview_png", "NODATA"]
