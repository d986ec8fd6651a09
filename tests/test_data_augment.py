"""Rank-consistent augmentation: the tiles of the sp ranks of a grid, each read by
its own reader (a simulated rank) from only its source window, re-assemble to
the augmented whole scene, which equals an independent numpy reference
(crop, rot90, flip, gain/shift/noise) of a whole-scene read."""
from __future__ import annotations

import numpy as np
import pytest

from rest_ds.data import (AugmentConfig, AugmentPlan, DataError, IOCounter, Scene, SceneReader, gaussian_field,
                          plan_augmentation, prepare_scene, read_rank_tile, read_tile, scene_layout)
from tests.rasters import cube, labelled_scene

CONFIG = AugmentConfig(flip=True, rot90=True, crop=(0.5, 1.0), brightness=0.2, shift=0.1, noise=0.3)
GRIDS = [(1, 2), (2, 1), (2, 2), (2, 3)]
SEEDS = range(20)   # covers all 8 symmetries (asserted below)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aug")
    a = cube("float32", (3, 23, 31), seed=21)
    path, a, lab = labelled_scene(tmp, image=a)
    reader, _, stats = prepare_scene(path)
    reader.close()
    return Scene.from_yaml(path), stats


def reference(reader: SceneReader, stats, plan: AugmentPlan):
    """Whole-scene read, then the plan applied with plain numpy on the whole array."""
    C, H, W = reader.shape
    raw, valid = reader.read_image(slice(0, H), slice(0, W))
    ids = reader.read_label(slice(0, H), slice(0, W))
    x = stats.normalize(raw)
    r0, c0, h, w = plan.crop
    x, valid, ids = x[:, r0:r0 + h, c0:c0 + w], valid[r0:r0 + h, c0:c0 + w], ids[r0:r0 + h, c0:c0 + w]
    x, valid, ids = (np.rot90(x, plan.k, axes=(1, 2)), np.rot90(valid, plan.k), np.rot90(ids, plan.k))
    if plan.flip:
        x, valid, ids = x[:, :, ::-1], valid[:, ::-1], ids[:, ::-1]
    Ho, Wo = x.shape[1:]
    y = x * np.asarray(plan.gain, np.float32)[:, None, None] + np.asarray(plan.shift, np.float32)[:, None, None]
    y = y + np.float32(plan.noise) * gaussian_field(plan.noise_seed, C, (Ho, Wo), slice(0, Ho), slice(0, Wo))
    y[:, ~valid] = 0
    ids = ids.copy()
    ids[~valid] = -100
    return y, ids


@pytest.mark.parametrize("seed", SEEDS)
def test_tiles_reassemble_to_the_augmented_scene(scene, seed):
    desc, stats = scene
    with SceneReader(desc) as reader:
        plan = plan_augmentation(CONFIG, reader.shape, seed=seed, epoch=3, scene=desc.name, dp_rank=1)
        Ho, Wo = plan.out_shape
        full = read_tile(reader, slice(0, Ho), slice(0, Wo), stats=stats, plan=plan)
        want_x, want_y = reference(reader, stats, plan)
    np.testing.assert_allclose(full.image, want_x, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(full.label, want_y)
    for grid in GRIDS:
        layout = scene_layout(plan, grid)
        x = np.full_like(full.image, np.nan)
        y = np.full_like(full.label, 7)
        for i in range(grid[0]):
            for j in range(grid[1]):
                counter = IOCounter()
                with SceneReader(desc, counter=counter) as rank:      # every rank opens the scene itself
                    rank_plan = plan_augmentation(CONFIG, rank.shape, seed=seed, epoch=3, scene=desc.name, dp_rank=1)
                    assert rank_plan == plan                          # same draw without communication
                    t = read_rank_tile(rank, layout, i, j, stats=stats, plan=rank_plan)
                rows, cols = layout.tile(i, j)
                x[:, rows, cols], y[rows, cols] = t.image, t.label
                # what the rank read from disk is exactly its tile's source (rotated shape when k is odd)
                h, w = rows.stop - rows.start, cols.stop - cols.start
                src = (w, h) if plan.k % 2 else (h, w)
                assert counter.reads and all((rec.rows[1] - rec.rows[0], rec.cols[1] - rec.cols[0]) == src
                                             for rec in counter.reads), (grid, i, j)
        np.testing.assert_array_equal(x, full.image, err_msg=f"seed {seed} grid {grid}")
        np.testing.assert_array_equal(y, full.label, err_msg=f"seed {seed} grid {grid}")


def test_the_seeds_cover_all_symmetries_and_crops(scene):
    desc, _ = scene
    plans = [plan_augmentation(CONFIG, (3, 23, 31), seed=s, epoch=3, scene=desc.name, dp_rank=1) for s in SEEDS]
    assert {(p.k, p.flip) for p in plans} == {(k, f) for k in range(4) for f in (False, True)}
    assert any(p.crop[2:] != (23, 31) for p in plans) and any(p.crop[:2] != (0, 0) for p in plans)


def test_same_over_sp_different_over_dp_epoch_scene_seed():
    shape = (4, 100, 120)

    def plan(**kw):
        args = {"seed": 5, "epoch": 2, "scene": "s", "dp_rank": 0, **kw}
        return plan_augmentation(CONFIG, shape, **args)

    base = plan()
    assert plan() == base
    for change in ({"dp_rank": 1}, {"epoch": 3}, {"scene": "t"}, {"seed": 6}):
        assert plan(**change) != base, change
    # enabling one augmentation does not change the others' draws
    no_noise = plan_augmentation(AugmentConfig(flip=True, rot90=True, crop=(0.5, 1.0), brightness=0.2, shift=0.1),
                                 shape, seed=5, epoch=2, scene="s", dp_rank=0)
    assert (no_noise.crop, no_noise.k, no_noise.flip, no_noise.gain) == (base.crop, base.k, base.flip, base.gain)


def test_crop_sides_respect_the_alignment():
    cfg = AugmentConfig(crop=(0.3, 0.9), crop_multiple=16, min_crop=32)
    for s in range(20):
        p = plan_augmentation(cfg, (2, 200, 150), seed=s, epoch=0, scene="x", dp_rank=0)
        r0, c0, h, w = p.crop
        assert h % 16 == 0 and w % 16 == 0 and h >= 32 and w >= 32
        assert 0 <= r0 and r0 + h <= 200 and 0 <= c0 and c0 + w <= 150


def test_gaussian_field_is_window_independent_and_normal():
    f = gaussian_field(123, 3, (64, 80), slice(0, 64), slice(0, 80))
    np.testing.assert_array_equal(gaussian_field(123, 3, (64, 80), slice(10, 33), slice(41, 80)), f[:, 10:33, 41:80])
    assert abs(float(f.mean())) < 0.03 and abs(float(f.std()) - 1) < 0.03
    assert not np.array_equal(gaussian_field(124, 3, (64, 80), slice(0, 64), slice(0, 80)), f)


def test_plan_for_another_scene_shape_is_refused(scene):
    desc, stats = scene
    plan = plan_augmentation(CONFIG, (3, 40, 40), seed=0, epoch=0, scene=desc.name, dp_rank=0)
    with SceneReader(desc) as r:
        with pytest.raises(DataError, match="augmentation plan is for a 40x40 scene, the image is 23x31"):
            read_tile(r, slice(0, 4), slice(0, 4), plan=plan)
        rotated = AugmentPlan((23, 31), (0, 0, 23, 31), k=1)          # a 31x23 augmented scene
        with pytest.raises(DataError, match="tile layout is for a 23x31 scene, the augmented scene is 31x23"):
            read_rank_tile(r, scene_layout(r.shape, (1, 2)), 0, 0, plan=rotated)
