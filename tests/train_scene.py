"""The small synthetic training scene and the tiny model/config that the
training, segmentation, launcher and plan tests share (SYNTHETIC data, made
for tests only): ``make_scene`` writes a 4-band float32 GeoTIFF whose classes
are learnable from the band values, a nodata corner, a 3-class label GeoTIFF
and train/val regions; ``tiny_config`` a config for a few fast steps on it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

TINY_MODEL = {  # a small Prithvi-style ViT + UPerNet with GroupNorm
    "encoder": {"name": "prithvi_vit",
                "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "indices": [0, 1]}},
    "decoder": {"name": "upernet", "channels": 16, "norm": "gn", "dropout": 0.0, "kwargs": {"pool_scales": [1, 2]}},
}
CLASSES = [{"value": 1, "name": "water", "color": "#1f78b4"}, {"value": 2, "name": "field", "color": "#ffff73"},
           {"value": 3, "name": "forest", "color": "#33782c"}]
NODATA = -9999.0
EPSG = 32119
TRANSFORM = (30.0, 0.0, 600000.0, 0.0, -30.0, 200000.0)


def make_scene(folder: Path, height: int = 64, width: int = 88, bands: int = 4, seed: int = 0, *,
               stats: bool = False, nan_at: tuple[int, int] | None = None) -> Path:
    """Write ``image.tif``, ``label.tif`` and ``scene.yaml`` into ``folder``;
    returns the YAML path. ``nan_at``: a NaN in band 0 at that pixel (a corrupt
    file; only the rank reading it notices when the scene is not scanned)."""
    import rasterio
    from rasterio.transform import Affine

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    cls = ((np.sin(xx / 9.0) + np.cos(yy / 7.0) + 0.3 * rng.standard_normal((height, width))) > 0.4).astype(int)
    cls += (np.hypot(yy - height * 0.6, xx - width * 0.65) < height * 0.25).astype(int) * 2
    cls = np.clip(cls, 0, 2)
    means = rng.uniform(-1, 1, size=(3, bands)) * 3
    img = (means[cls].transpose(2, 0, 1) + 0.5 * rng.standard_normal((bands, height, width))).astype(np.float32)
    img = img * 100 + 1000
    corner = (yy + xx) < 10                       # nodata triangle
    img[:, corner] = NODATA
    if nan_at is not None:
        img[0, nan_at[0], nan_at[1]] = np.nan
    label = (cls + 1).astype(np.uint8)
    label[:3, -5:] = 0                              # unlabeled
    prof = {"driver": "GTiff", "width": width, "height": height, "transform": Affine(*TRANSFORM),
            "crs": f"EPSG:{EPSG}"}
    with rasterio.open(folder / "image.tif", "w", count=bands, dtype="float32", nodata=NODATA, **prof) as dst:
        dst.write(img)
    with rasterio.open(folder / "label.tif", "w", count=1, dtype="uint8", nodata=255, **prof) as dst:
        dst.write(label[None])
    desc = {"name": f"synthetic-{seed}", "image": {"path": "image.tif"}, "label": {"path": "label.tif", "unlabeled": [0]},
            "classes": CLASSES, "band_names": [f"b{i}" for i in range(bands)],
            "regions": {"train": {"windows": [[0, height, 0, width * 5 // 8]]},
                        "val": {"windows": [[0, height, width * 5 // 8, width]]}}}
    if stats:
        ok = img[:, ~corner & ~np.isnan(img).any(0)]
        desc["stats"] = {"mean": [float(v) for v in ok.mean(1)], "std": [float(v) for v in ok.std(1)]}
    path = folder / "scene.yaml"
    path.write_text(yaml.safe_dump(desc, sort_keys=False))
    return path


def tiny_config(scene: Path, out: Path, **over) -> dict:
    """A config mapping for a few fast steps on the synthetic scene."""
    cfg = {
        "name": "tiny", "output_dir": str(out), "seed": 0, "model": TINY_MODEL,
        "data": {"scenes": [str(scene)], "augment": {"flip": True, "rot90": True}},
        "deepspeed": {"zero_stage": 2},
        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"name": "cosine", "warmup_steps": 1},
        "train": {"steps": 4, "log_interval": 1, "eval_interval": 2, "checkpoint_interval": 2, "progress": False},
    }
    for k, v in over.items():
        sec, key = k.split("__")
        cfg.setdefault(sec, {})[key] = v
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
