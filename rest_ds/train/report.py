"""Compare class maps of one labelled scene: metrics per region, a side-by-side PNG.

``python -m rest_ds.train.report --scene nc-landsat7 --map REST=rest.tif --map cropping=crop.tif
--png comparison.png --json metrics.json`` reads the maps (``rest-ds segment``
outputs: raw class values, nodata 255), the scene's label and regions, and
computes for each map and region (default: ``val`` and ``test``) the confusion
matrix over labelled pixels with valid imagery, mIoU, per-class IoU, OA, F1
and kappa. It prints the mIoUs side by side, writes them as JSON and draws
image | labels | map 1 | map 2 ... as one PNG.

A reporting tool for scenes that fit in memory (the sample scenes); training
and segmentation never hold a whole scene.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np

from .metrics import confusion_matrix, segmentation_metrics


def _ids_of(raw: np.ndarray, values: list[float], nodata: int = 255) -> np.ndarray:
    """Raw class values -> ids 0..K-1 (-1 for nodata / unknown values)."""
    out = np.full(raw.shape, -1, dtype=np.int64)
    for k, v in enumerate(values):
        out[raw == v] = k
    out[raw == nodata] = -1
    return out


def _open_scene_quietly(scene_ref: str, cache: str | None):
    """A reader of a cached scene; its data warnings were shown when it was trained on."""
    from ..data import DataWarning, open_scene
    from .data import resolve_scene

    scene = resolve_scene(scene_ref, cache, fetch=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return open_scene(scene)


def evaluate_maps(scene_ref: str, maps: dict[str, str], regions: list[str], cache: str | None = None) -> dict:
    import rasterio

    reader = _open_scene_quietly(scene_ref, cache)
    with reader:
        _, H, W = reader.shape
        rows, cols = slice(0, H), slice(0, W)
        label = reader.read_label(rows, cols)
        _, valid = reader.read_image(rows, cols)
        label[~valid] = reader.scene.ignore_index
        masks = {r: reader.read_region(r, rows, cols) for r in regions}
        names = reader.scene.class_names
        values = [c.value for c in reader.scene.classes]
        K = len(names)
    out = {"scene": reader.scene.name, "classes": names, "regions": {}, "maps": {}}
    for r, m in masks.items():
        out["regions"][r] = int(((label != reader.scene.ignore_index) & m).sum())
    for name, path in maps.items():
        with rasterio.open(path) as src:
            if (src.height, src.width) != (H, W):
                raise ValueError(f"{path}: map {src.height}x{src.width} does not match the scene {H}x{W}")
            pred = _ids_of(src.read(1), values)
        res = {}
        for r, m in masks.items():
            lab = np.where(m, label, -100)
            res[r] = segmentation_metrics(confusion_matrix(np.where(pred < 0, 0, pred), np.where(pred < 0, -100, lab),
                                                           K), names)
            res[r]["unmapped_labelled_pixels"] = int(((pred < 0) & (lab >= 0)).sum())
        out["maps"][name] = {"path": str(path), **res}
    return out


def comparison_png(scene_ref: str, maps: dict[str, str], png: str | Path, titles: dict[str, str] | None = None,
                   cache: str | None = None, max_side: int = 600) -> None:
    """image (RGB = bands 3, 2, 1, 2-98 % stretch) | labels | each map, decimated to ``max_side``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import rasterio

    reader = _open_scene_quietly(scene_ref, cache)
    with reader:
        C, H, W = reader.shape
        f = max(1, math.ceil(max(H, W) / max_side))
        rows, cols = slice(0, H), slice(0, W)
        img, valid = reader.read_image(rows, cols)
        label = reader.read_label(rows, cols) if reader.label is not None else None
        colors = np.asarray(reader.scene.class_colors, dtype=np.uint8)
        values = [c.value for c in reader.scene.classes]
    bands = [2, 1, 0] if C >= 3 else [0, 0, 0]
    rgb = np.stack([img[b] for b in bands], -1).astype(np.float64)
    for i in range(3):
        v = rgb[..., i][valid]
        lo, hi = np.percentile(v, [2, 98]) if v.size else (0, 1)
        rgb[..., i] = np.clip((rgb[..., i] - lo) / max(hi - lo, 1e-9), 0, 1)
    rgb[~valid] = 1.0

    def colorize(ids):
        out = np.ones(ids.shape + (3,))
        ok = ids >= 0
        out[ok] = colors[ids[ok]] / 255.0
        return out

    panels = [("image (RGB)", rgb)]
    if label is not None:
        panels.append(("labels", colorize(np.where(valid, label, -1))))
    for name, path in maps.items():
        with rasterio.open(path) as src:
            panels.append(((titles or {}).get(name, name), colorize(_ids_of(src.read(1), values))))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2 * H / W + 0.6))
    for ax, (t, a) in zip(np.atleast_1d(axes), panels):
        ax.imshow(a[::f, ::f], interpolation="nearest")
        ax.set_title(t, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from ..cli_args import EXIT_OK, fail

    p = argparse.ArgumentParser(prog="python -m rest_ds.train.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scene", required=True, help="sample name or scene YAML (with label and regions)")
    p.add_argument("--map", action="append", required=True, metavar="NAME=MAP.tif", help="a class map (repeatable)")
    p.add_argument("--regions", nargs="+", default=["val", "test"], help="regions to evaluate (default: val test)")
    p.add_argument("--png", type=Path, help="write image | labels | maps as a PNG")
    p.add_argument("--json", type=Path, help="write the metrics as JSON")
    p.add_argument("--extra", type=Path, help="JSON object merged into the output JSON (e.g. timings)")
    p.add_argument("--cache", help="sample cache")
    a = p.parse_args(argv)
    maps = {}
    for m in a.map:
        if "=" not in m:
            p.error(f"--map {m}: expected NAME=MAP.tif")
        k, v = m.split("=", 1)
        maps[k] = v
    try:
        res = evaluate_maps(a.scene, maps, a.regions, a.cache)
    except Exception as e:
        return fail(f"{type(e).__name__}: {e}")
    if a.extra is not None and a.extra.is_file():
        res.update(json.loads(a.extra.read_text()))
    r0 = a.regions[0]
    names = list(maps)
    w = max(len(n) for n in ["metric"] + names) + 2
    print(f"{'region / metric':<22}" + "".join(f"{n:>{w}}" for n in names))
    for r in a.regions:
        for k in ("mIoU", "OA", "mF1", "kappa"):
            print(f"{r + ' ' + k:<22}" + "".join(f"{res['maps'][n][r][k]:>{w}.4f}" for n in names))
    print(f"per-class IoU ({r0}):")
    for c in res["classes"]:
        vals = [res["maps"][n][r0]["per_class"][c]["IoU"] for n in names]
        print(f"  {c:<20}" + "".join(f"{(v if v is not None else float('nan')):>{w}.4f}" for v in vals))
    if a.json:
        from .checkpoint import atomic_write_json
        atomic_write_json(a.json, res)
    if a.png:
        titles = {n: f"{n} (mIoU {r0} {res['maps'][n][r0]['mIoU']:.3f})" for n in names}
        comparison_png(a.scene, maps, a.png, titles, a.cache)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
