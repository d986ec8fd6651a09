"""Training data, config validation and metrics (single process, fast), on the
synthetic scene of tests/train_scene.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.train_scene import TINY_MODEL, make_scene, tiny_config, write_config


# --- config validation --------------------------------------------------------------------------
@pytest.fixture()
def scene(tmp_path):
    return make_scene(tmp_path / "scene")


def _load(tmp_path, cfg, overrides=()):
    from rest_ds.train.config import load_config

    return load_config(write_config(tmp_path / "c.yaml", cfg), overrides)


def test_config_defaults_and_overrides(tmp_path, scene):
    cfg = _load(tmp_path, tiny_config(scene, tmp_path / "run"),
                ["optimizer.lr=1e-4", "mesh.grid=2x1", "deepspeed.zero_stage=3", "model.decoder.channels=8",
                 "data.augment.crop=[0.5, 1.0]"])
    assert cfg.optimizer.lr == 1e-4 and isinstance(cfg.optimizer.lr, float)   # '1e-4' is a YAML string
    assert cfg.grid() == (2, 1) and cfg.deepspeed.zero_stage == 3
    assert cfg.model.decoder.channels == 8
    assert cfg.data.augment.crop == [0.5, 1.0]
    assert cfg.train.steps == 4 and cfg.schedule.name == "cosine"
    assert cfg.data.scenes == [str(scene)]
    # integers in scientific notation: YAML 1.1 reads 5e8 as a string, 4.0e+6 as a float
    big = _load(tmp_path, tiny_config(scene, tmp_path / "run"),
                ["deepspeed.reduce_bucket_size=5e8", "deepspeed.allgather_bucket_size=4.0e+6"])
    assert (big.deepspeed.reduce_bucket_size, big.deepspeed.allgather_bucket_size) == (500_000_000, 4_000_000)
    assert all(isinstance(v, int) for v in (big.deepspeed.reduce_bucket_size, big.deepspeed.allgather_bucket_size))
    again = _load(tmp_path, cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override, key, words", [
    (["data.scens=[a]"], "data.scens", "did you mean 'scenes'"),
    (["trian.steps=3"], "trian", "did you mean 'train'"),
    (["data.mode=crops"], "data.mode", "not one of whole, crop"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage", "0, 1, 2 or 3"),
    (["train.steps=0"], "train.steps", ">= 1"),
    (["train.steps=ten"], "train.steps", "expected an integer"),
    (["train.steps=2.5e0"], "train.steps", "expected an integer, got 2.5"),
    (["optimizer.lr=-1"], "optimizer.lr", "> 0"),
    (["optimizer.betas=[0.9, 1.5]"], "optimizer.betas[1]", "must be in [0, 1), got 1.5"),
    (["data.min_labelled=2"], "data.min_labelled", "must be in [0, 1], got 2.0"),
    (["finetune.layer_decay=0"], "finetune.layer_decay", "must be in (0, 1], got 0.0"),
    (["train.threads=0"], "train.threads", "must be >= 1, got 0"),
    (["mesh.grid=2by1"], "mesh.grid", "PHxPW"),
    (["mesh.sp=3", "mesh.grid=2x1"], "mesh.grid", "mesh.sp is 3"),
    (["data.mode=crop", "mesh.sp=2"], "mesh.sp", "sp must be 1"),
    (["deepspeed.config={zero_optimization: {stage: 1}}"], "deepspeed.config.zero_optimization", "zero_stage"),
    (["model.decoder.norm=batch"], "model.decoder.norm", "bn, gn, ln, none"),
    (["model.decoder.colour=1"], "model.decoder.colour", "unknown key"),
    (["train.class_weights=inverse"], "train.class_weights", "sqrt_inv"),
    (["optimizer.betas=[0.9]"], "optimizer.betas", "two numbers"),
    (["train.steps"], "train.steps", "KEY=VALUE"),
    (["optimizer.lr=.inf"], "optimizer.lr", "must be a finite number > 0"),           # trained to NaN
    (["optimizer.lr=1e300"], "optimizer.lr", "1e+300 does not fit fp32"),   # was torch's RuntimeError
    (["finetune.encoder_lr=-.inf"], "finetune.encoder_lr", "finite"),
])
def test_bad_config_is_named(tmp_path, scene, override, key, words):
    from rest_ds.train.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _load(tmp_path, tiny_config(scene, tmp_path / "run"), override)
    msg = str(e.value)
    assert key in msg and words in msg, msg


def test_model_yaml_reference_and_missing_file(tmp_path, scene):
    from rest_ds.train.config import ConfigError

    (tmp_path / "m.yaml").write_text(yaml.safe_dump(TINY_MODEL))
    cfg = _load(tmp_path, {**tiny_config(scene, tmp_path / "run"), "model": "m.yaml"}, ["model.decoder.channels=12"])
    assert cfg.model.encoder.name == "prithvi_vit" and cfg.model.decoder.channels == 12
    with pytest.raises(ConfigError, match="model config 'nope.yaml' not found"):
        _load(tmp_path, {**tiny_config(scene, tmp_path / "run"), "model": "nope.yaml"})


def test_cli_names_bad_key(tmp_path, scene, capsys):
    from rest_ds.cli import main

    cfg = write_config(tmp_path / "c.yaml", tiny_config(scene, tmp_path / "run"))
    assert main(["train", "--config", str(cfg), "optimizer.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optimizer.lrr" in err and "did you mean 'lr'" in err and "Traceback" not in err
    assert main(["train", "--config", str(cfg), "--print-config", "train.steps=7"]) == 0
    assert "steps: 7" in capsys.readouterr().out


# --- metrics -------------------------------------------------------------------------------------
def test_confusion_and_metrics_against_definitions():
    from rest_ds.train.metrics import confusion_matrix, segmentation_metrics

    rng = np.random.default_rng(0)
    t = rng.integers(0, 4, size=(50, 60))
    t[rng.random(t.shape) < 0.1] = -100
    p = np.where(rng.random(t.shape) < 0.7, t, rng.integers(0, 4, size=t.shape))
    p[t == -100] = 3
    conf = confusion_matrix(torch.from_numpy(p), torch.from_numpy(t), 4)
    keep = t != -100
    assert conf.sum() == keep.sum()
    for a in range(4):
        for b in range(4):
            assert conf[a, b] == ((t == a) & (p == b)).sum()
    m = segmentation_metrics(conf, ["a", "b", "c", "d"])
    ious, f1s = [], []
    for c in range(4):
        tp = ((t == c) & (p == c)).sum()
        fp = ((t != c) & keep & (p == c)).sum()
        fn = ((t == c) & (p != c)).sum()
        ious.append(tp / (tp + fp + fn))
        f1s.append(2 * tp / (2 * tp + fp + fn))
        assert m["per_class"]["abcd"[c]]["IoU"] == pytest.approx(ious[-1])
    assert m["mIoU"] == pytest.approx(np.mean(ious))
    assert m["mF1"] == pytest.approx(np.mean(f1s))
    oa = (p[keep] == t[keep]).mean()
    assert m["OA"] == pytest.approx(oa)
    pe = sum((t[keep] == c).mean() * (p[keep] == c).mean() for c in range(4))
    assert m["kappa"] == pytest.approx((oa - pe) / (1 - pe))
    json.dumps(m)


def test_metrics_absent_class_not_averaged():
    from rest_ds.train.metrics import segmentation_metrics

    conf = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    m = segmentation_metrics(conf)
    assert m["per_class"]["2"]["IoU"] is None
    assert m["mIoU"] == pytest.approx(np.mean([5 / 8, 3 / 6]))


# --- data ----------------------------------------------------------------------------------------
def test_whole_scene_tiles_assemble_to_the_padded_scene(tmp_path, scene):
    """Each rank's training tile is the matching slice of the padded augmented scene."""
    from rest_ds.data import open_scene, prepare_scene
    from rest_ds.spim.mesh import SpatialMesh
    from rest_ds.train.config import load_config
    from rest_ds.train.data import OpenScene, WholeSceneData

    cfg = load_config(data=tiny_config(scene, tmp_path / "run"))
    reader, summary, stats = prepare_scene(scene)
    sc = OpenScene(reader, stats, summary)
    align, grid = 8, (2, 3)
    whole = WholeSceneData([sc], cfg, SpatialMesh.single(), (1, 1), align)
    for micro in range(3):
        X, Y, L = whole.batch(micro)
        assert X.shape[-2] % align == 0 and X.shape[-1] % align == 0
        for r in range(grid[0]):
            for c in range(grid[1]):
                mesh = SpatialMesh(1, 6, grid, r * grid[1] + c, None, None, tuple(range(6)))
                x, y, layout = WholeSceneData([sc], cfg, mesh, grid, align).batch(micro)
                rows, cols = layout.tile(r, c)
                assert torch.equal(x[0], X[0][:, rows, cols]) and torch.equal(y[0], Y[0][rows, cols])
        assert (Y == -100).any() and (Y >= 0).any()
    reader.close()



def test_auto_grid_splits_every_scene_and_its_rotation():
    """auto_grid looked at the first training scene only, as it is: under rot90 the turned scene (or a
    smaller validation scene) could not be split and SPIM's tiling failed on every rank naming no key."""
    from types import SimpleNamespace

    from rest_ds.train.data import auto_grid, grid_fits, grid_shapes

    def sc(h, w):
        return SimpleNamespace(reader=SimpleNamespace(shape=(3, h, w)))

    wide, small = [sc(64, 200)], [sc(40, 20)]
    assert auto_grid(wide, 4, 32) == (1, 4)                                   # least halo, as before
    need = grid_shapes(wide, [], rot90=True)
    assert need == [(64, 200), (200, 64)] and not grid_fits((1, 4), (200, 64), 32)
    assert auto_grid(wide, 4, 32, need) == (2, 2)                             # fits both orientations
    assert auto_grid(small, 2, 32, grid_shapes(small, [], rot90=False)) == (2, 1)
    assert auto_grid(small, 2, 32, grid_shapes(small, [], rot90=True)) is None
    assert auto_grid(wide, 4, 32, grid_shapes(wide, [sc(40, 150)], rot90=False)) == (1, 4)
    assert auto_grid(wide, 4, 32, grid_shapes(wide, [sc(40, 90)], rot90=False)) == (2, 2)  # val: 3 units wide
    assert auto_grid(wide, 4, 32, grid_shapes(wide, [sc(20, 90)], rot90=False)) is None    # and 1 unit high
    assert grid_shapes(wide, small, rot90=True, crop=True) == [(40, 20)]     # a crop sets the training size


def test_text_overrides_keep_their_text(tmp_path, scene):
    """YAML reads name=0x10 as 16, name=yes as True, mesh.grid=0x2 as 2 ('2' is not PHxPW named no typo);
    a str-typed key takes the text as written, other keys keep YAML's value."""
    from rest_ds.train.config import ConfigError

    cfg = _load(tmp_path, tiny_config(scene, tmp_path / "run"),
                ["name=0x10", "train.resume=123", "data.cache=yes", "train.steps=12", "mesh.sp=null"])
    assert (cfg.name, cfg.train.resume, cfg.data.cache, cfg.train.steps, cfg.mesh.sp) == ("0x10", "123", "yes", 12, None)
    with pytest.raises(ConfigError, match="mesh.grid: grid '0x2' needs at least one row"):
        _load(tmp_path, tiny_config(scene, tmp_path / "run"), ["mesh.grid=0x2"])


@pytest.mark.launcher  # one `rest-ds train` subprocess (refused before DeepSpeed starts: ~5 s)
def test_train_region_without_a_labelled_pixel_is_refused(tmp_path, scene):
    """A train region whose labels all lie on nodata imagery (or are unlabeled) trained silently at
    loss 0; has_labelled_pixel finds it (image validity applied, several row blocks read), and
    `rest-ds train` refuses it (and such a val region) naming the key (exit 2, nothing written)."""
    from rest_ds.data import prepare_scene
    from rest_ds.train.data import OpenScene, has_labelled_pixel
    from tests.harness import rest_ds

    desc = yaml.safe_load(scene.read_text())
    W = 88
    desc["regions"].update({"nodata": {"windows": [[0, 3, 0, 5]]},          # labelled, but in the nodata corner
                            "unlabeled": {"windows": [[0, 3, W - 5, W]]},   # label 0 = unlabeled
                            "late": {"windows": [[60, 61, 40, 41]]}})      # one pixel, in the last block
    scene.write_text(yaml.safe_dump(desc, sort_keys=False))
    reader, summary, stats = prepare_scene(scene)
    sc = OpenScene(reader, stats, summary)
    found = {reg: has_labelled_pixel([sc], reg, block_rows=8) for reg in ("nodata", "unlabeled", "late", "train")}
    assert found == {"nodata": False, "unlabeled": False, "late": True, "train": True}
    assert has_labelled_pixel([sc], None)
    reader.close()
    for key, words in (("train_region", "of the training scenes"), ("val_region", "of the validation scenes")):
        cfg = tiny_config(scene, tmp_path / "run")
        cfg["data"][key] = "nodata"     # (the val region evaluated to mIoU NaN)
        p = rest_ds(["train", "--config", str(write_config(tmp_path / "c.yaml", cfg))], tmp_path, timeout=300)
        assert p.returncode == 2 and f"data.{key}: no labelled pixel in region 'nodata' {words}" in p.stderr, p.stderr
        assert not (tmp_path / "run" / "checkpoints").exists()


def test_window_cache_gives_the_same_tiles_and_keeps_its_windows(tmp_path, scene):
    """With a WindowCache every training tile (flips, rotations, photometric terms,
    nodata fill, region) equals the uncached read, the disk is read once per source
    window, a caller writing into its tile does not change the kept window, and the
    memory bound holds (a window over the bound is not kept)."""
    from rest_ds.data import WindowCache, prepare_scene
    from rest_ds.spim.mesh import SpatialMesh
    from rest_ds.train.config import load_config
    from rest_ds.train.data import OpenScene, WholeSceneData

    cfg = load_config(data=tiny_config(scene, tmp_path / "run"),
                      overrides=["data.augment.brightness=0.2", "data.augment.noise=0.1"])
    reader, summary, stats = prepare_scene(scene)
    sc = OpenScene(reader, stats, summary)
    grid, align = (1, 2), 8
    mesh = SpatialMesh(1, 2, grid, 1, None, None, (0, 1))
    plain = WholeSceneData([sc], cfg, mesh, grid, align)
    cache = WindowCache(64)
    cached = WholeSceneData([sc], cfg, mesh, grid, align, cache=cache)
    for micro in list(range(12)) * 2:  # every micro-step twice: the second time from the cache
        x0, y0, l0 = plain.batch(micro)
        x1, y1, l1 = cached.batch(micro)
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and l0 == l1
        x1.fill_(7.0), y1.fill_(3)  # the caller owns its tile
    assert cache.misses <= 8 and cache.hits >= 16  # at most 8 source windows (4 rotations x flip)
    assert (y0 == -100).any() and (x0 != 0).any()
    kept = len(cache._entries)
    assert 0 < cache.nbytes <= 64 * 2 ** 20
    from rest_ds.data import read_tile
    win = (slice(0, 40), slice(8, 80))
    for region in ("train", "val", None, "train"):  # the region is part of the key; the kept arrays are not handed out
        for st in (stats, None):
            ref = read_tile(reader, *win, stats=st, region=region)
            got = read_tile(reader, *win, stats=st, region=region, cache=cache)
            assert np.array_equal(ref.image, got.image) and np.array_equal(ref.label, got.label)
            got.image[:] = 5.0
            got.label[:] = 1
    tiny = WindowCache(0.001)  # ~1 KiB: no window fits, every read goes to disk
    again = WholeSceneData([sc], cfg, mesh, grid, align, cache=tiny)
    assert torch.equal(again.batch(3)[0], plain.batch(3)[0]) and tiny.nbytes == 0 and kept >= 1
    reader.close()

# --- shipped configs ------------------------------------------------------------------------------
CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    from rest_ds.train.config import load_config

    cfg = load_config(path)
    assert cfg.data.scenes and cfg.model.encoder.name


def test_main_job_configs_share_model_and_budget():
    """REST and the cropping baseline: same model, optimiser, schedule and steps; the crop
    batch holds as many pixels as a rank's tile of the (padded) whole scene."""
    from rest_ds.train.config import load_config
    from rest_ds.train.engine import build_model
    from rest_ds.train.inference import padded_shape

    root = Path(__file__).resolve().parent.parent / "configs"
    rest, crop = load_config(root / "nc_landsat7_rest.yaml"), load_config(root / "nc_landsat7_crop.yaml")
    assert rest.model == crop.model and rest.optimizer == crop.optimizer and rest.schedule == crop.schedule
    assert rest.train.steps == crop.train.steps and rest.deepspeed == crop.deepspeed
    assert rest.data.mode == "whole" and crop.data.mode == "crop"
    model, _ = build_model(rest.model, num_classes=7, in_chans=6)
    H, W = padded_shape((443, 489), model.align)                 # nc-landsat7, 2 ranks
    assert crop.data.crops_per_rank * crop.data.crop_size ** 2 == H * W // 2


def test_scenes_with_bands_in_another_order_are_refused(tmp_path, scene):
    """A second training scene holding the same bands in another order trained silently on mixed-up
    inputs (only the band count was compared). scene_headers (run by `rest-ds train` before the ranks
    start and by --check) names the scene and the image.bands that reads it in order; with that fix the
    scene reads the first scene's bands; names compare by spectral role (B04 = red)."""
    import rasterio

    from rest_ds.config_schema import ConfigError
    from rest_ds.data import open_scene
    from rest_ds.train.data import band_order_problem
    from rest_ds.train.preflight import scene_headers

    other = make_scene(tmp_path / "other", seed=0)
    with rasterio.open(other.parent / "image.tif") as src:
        prof, img = src.profile, src.read()
    with rasterio.open(other.parent / "image.tif", "w", **prof) as dst:
        dst.write(img[[2, 0, 3, 1]])                                  # stored in another order
    desc = yaml.safe_load(other.read_text())
    desc["band_names"], desc["name"] = ["b2", "b0", "b3", "b1"], "other"
    other.write_text(yaml.safe_dump(desc, sort_keys=False))
    cfg = tiny_config(scene, tmp_path / "run")
    cfg["data"]["scenes"].append(str(other))
    with pytest.raises(ConfigError) as e:
        scene_headers(_load(tmp_path, cfg))
    assert "data.scenes: scene 'other'" in str(e.value) and "image.bands: [1, 3, 0, 2]" in str(e.value)
    desc["image"] = {"path": "image.tif", "bands": [1, 3, 0, 2]}       # the fix the message names
    desc["band_names"] = ["b0", "b1", "b2", "b3"]
    other.write_text(yaml.safe_dump(desc, sort_keys=False))
    assert len(scene_headers(_load(tmp_path, cfg))) == 2
    with open_scene(other) as r, open_scene(scene) as s:
        whole = (slice(0, 64), slice(0, 88))
        assert np.array_equal(r.read_image(*whole)[0], s.read_image(*whole)[0])
    assert band_order_problem(["B02", "B03", "B04"], ["blue", "green", "red"]) is None
    assert band_order_problem(["b0", "b1"], None) is None
    assert band_order_problem(["B1", "B2"], ["B2", "B3"]) is None           # other sensors' numbers: allowed


def test_classes_without_a_labelled_pixel_are_named(tmp_path, scene):
    """A label holding one class of three trained silently (val mIoU 1.0, kappa NaN); the trainer now
    warns naming the classes no training scene has a pixel of (from the scan's counts)."""
    import rasterio

    from rest_ds.data import prepare_scene
    from rest_ds.train.data import OpenScene, classes_without_pixels

    def opened(path):
        reader, summary, stats = prepare_scene(path, recompute=True)
        return OpenScene(reader, stats, summary)

    full = opened(scene)
    assert classes_without_pixels([full]) == []
    other = make_scene(tmp_path / "one")
    with rasterio.open(other.parent / "label.tif", "r+") as dst:
        lab = dst.read(1)
        lab[(lab > 0) & (lab < 255)] = 2                                   # every labelled pixel is 'field'
        dst.write(lab, 1)
    one = opened(other)
    assert classes_without_pixels([one]) == ["water", "forest"]
    assert classes_without_pixels([one, full]) == []                      # another scene holds them
    assert classes_without_pixels([OpenScene(one.reader, one.stats, None)]) is None   # not scanned: unknown
    full.reader.close(), one.reader.close()
