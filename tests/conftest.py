"""Shared test set-up.

The machine has 2 cores shared by every rank of a multi-process test: one
thread per process (children inherit the environment; spawn() also sets it),
and the repo root on sys.path so rank processes can import ``tests.*`` and
``rest_ds`` even without the editable install.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Every rank of the model tests imports timm and transformers' SAM (seconds each on
# 2 shared cores): the forkserver that spawn() starts imports them once instead.
from rest_ds.spim.spawn import preload  # noqa: E402

preload("timm", "transformers.models.sam.modeling_sam")


@pytest.fixture(scope="module")
def model_and_scene(tmp_path_factory):
    """The tiny ViT + UPerNet fitted for 25 steps in one process on a 61 x 101
    synthetic scene (not multiples of the alignment) so its logits are decisive,
    exported (safetensors + JSON); for the segment tests."""
    import torch
    import torch.nn.functional as F

    from rest_ds.data import prepare_scene
    from rest_ds.train.checkpoint import export_model
    from rest_ds.train.engine import build_model
    from rest_ds.train.inference import padded_shape, read_padded
    from tests.train_scene import CLASSES, TINY_MODEL, make_scene

    d = tmp_path_factory.mktemp("segment")
    scene = make_scene(d / "scene", height=61, width=101)          # not multiples of the alignment
    reader, _, stats = prepare_scene(scene)
    torch.manual_seed(0)
    model, mcfg = build_model(TINY_MODEL, num_classes=3, in_chans=4)
    H, W = reader.shape[1:]
    Hp, Wp = padded_shape((H, W), model.align)
    img, lab, _ = read_padded(reader, slice(0, Hp), slice(0, Wp), (H, W), stats=stats, region="train")
    reader.close()
    x, y = torch.from_numpy(img)[None], torch.from_numpy(lab)[None]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        opt.zero_grad()
        F.cross_entropy(model(x), y, ignore_index=-100).backward()
        opt.step()
    meta = {"model": mcfg, "align": model.align, "num_classes": 3, "in_chans": 4,
            "classes": [{"value": c["value"], "name": c["name"], "color": [int(c["color"][i:i + 2], 16)
                                                                          for i in (1, 3, 5)]} for c in CLASSES],
            "ignore_index": -100, "band_names": None, "crop_size": 32, "slide_overlap": 8,
            "normalization": {"mean": list(stats.mean), "std": list(stats.std)}}
    out, _ = export_model(model.state_dict(), meta, d / "model" / "tiny.safetensors")
    return {"dir": d, "model": out, "image": d / "scene" / "image.tif"}
