"""`rest-ds train` end to end through the real `deepspeed` launcher (2 CPU ranks, gloo, ZeRO-2).

One training run (4 steps, evaluation and checkpoints every 2) is shared by
the tests: its outputs, a resumed run from its step-2 checkpoint (the losses
of steps 3 and 4 must equal the uninterrupted run's), and export of its final
checkpoint segmented on 1 and 3 ranks (the map must equal the 2-rank map and
the training-time evaluation).
"""
from __future__ import annotations

import glob
import json
import shutil

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.launcher]  # the real deepspeed launcher and rest-ds CLI

from tests.harness import free_port, launch, read_csv, rest_ds
from tests.train_scene import make_scene, tiny_config, write_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("launcher")
    scene = make_scene(d / "scene")
    cfg = write_config(d / "tiny.yaml", tiny_config(scene, d / "run"))
    port = free_port()
    p, secs = launch(["train", "--config", str(cfg)], d, port=port)
    # DeepSpeed's CPU all-reduce files of this job (named after its master port), left after it ended
    shm_left = sorted(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"))
    return {"dir": d, "scene": scene, "config": cfg, "out": d / "run", "proc": p, "seconds": secs,
            "shm_left": shm_left}


@pytest.mark.timeout(900)
def test_two_rank_train_through_deepspeed_launcher(run):
    p, out = run["proc"], run["out"]
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    log = p.stdout
    print(f"launcher run: {run['seconds']:.1f} s")
    assert "2 rank(s) (gloo" in log and "sp=2 grid" in log and "ZeRO 2" in log
    for s in range(1, 5):
        assert f"step {s}/4  loss" in log
    assert "eval step 2: mIoU" in log and "eval step 4: mIoU" in log and "done: 4 step(s) (0->4)" in log
    rows = read_csv(out / "train_log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    losses = [float(r["loss"]) for r in rows]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    evals = read_csv(out / "eval_log.csv")
    assert [int(r["step"]) for r in evals] == [2, 4]
    metrics = json.loads((out / "metrics.json").read_text())
    m = metrics["eval"]
    assert m["step"] == 4 and 0 <= m["mIoU"] <= 1 and m["pixels"] > 0
    assert set(m["per_class"]) == {"water", "field", "forest"}
    assert (out / "training_curve.png").stat().st_size > 1000
    ck = out / "checkpoints"
    assert (ck / "latest").read_text() == "step_0000004"
    assert sorted(x.name for x in ck.iterdir() if x.is_dir() and not x.name.startswith(".")) == \
        ["step_0000002", "step_0000004"]
    assert not any((ck / ".partial").iterdir())
    man = json.loads((ck / "step_0000004" / "rest_ds.json").read_text())
    assert man["step"] == 4 and man["world_size"] == 2 and man["zero_stage"] == 2 and man["mesh"]["sp"] == 2
    assert run["shm_left"] == []  # each rank unlinked its DeepSpeed /dev/shm buffer


@pytest.mark.timeout(900)
def test_resumed_run_continues_with_the_same_losses(run, tmp_path):
    assert run["proc"].returncode == 0
    out_b = tmp_path / "resumed"
    (out_b / "checkpoints").mkdir(parents=True)
    shutil.copytree(run["out"] / "checkpoints" / "step_0000002", out_b / "checkpoints" / "step_0000002")
    (out_b / "checkpoints" / "latest").write_text("step_0000002")
    p, secs = launch(["train", "--config", str(run["config"]), f"output_dir={out_b}"], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "steps 2->4" in p.stdout
    a = {int(r["step"]): float(r["loss"]) for r in read_csv(run["out"] / "train_log.csv")}
    b = {int(r["step"]): float(r["loss"]) for r in read_csv(out_b / "train_log.csv")}
    assert sorted(b) == [3, 4]
    diffs = {s: abs(a[s] - b[s]) / abs(a[s]) for s in (3, 4)}
    print(f"resume: uninterrupted {[a[3], a[4]]} resumed {[b[3], b[4]]} rel. diff {diffs} [{secs:.1f} s]")
    assert max(diffs.values()) <= 1e-6, diffs
    ea = read_csv(run["out"] / "eval_log.csv")[-1]
    eb = read_csv(out_b / "eval_log.csv")[-1]
    assert ea["step"] == eb["step"] == "4" and float(ea["mIoU"]) == pytest.approx(float(eb["mIoU"]), abs=1e-6)


@pytest.mark.timeout(900)
def test_export_then_segment_on_other_rank_counts(run, tmp_path):
    import rasterio

    assert run["proc"].returncode == 0
    model = tmp_path / "model" / "tiny.safetensors"
    p = rest_ds(["export", "--checkpoint", str(run["out"]), "--output", str(model)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    meta = json.loads(model.with_suffix(".json").read_text())
    assert meta["step"] == 4 and meta["trained_with"]["world_size"] == 2 and meta["num_classes"] == 3
    # an existing export is not replaced by accident (as segment's outputs), and is with --overwrite
    before = model.stat().st_mtime_ns
    p = rest_ds(["export", "--checkpoint", str(run["out"]), "--output", str(model)], tmp_path)
    assert p.returncode != 0 and "exists; pass --overwrite" in p.stderr and model.stat().st_mtime_ns == before
    p = rest_ds(["export", "--checkpoint", str(run["out"]), "--output", str(model), "--overwrite"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(model.with_suffix(".json").read_text())["sha256"] == meta["sha256"]
    maps = {}
    for P in (1, 3):
        out = tmp_path / f"map{P}.tif"
        p = rest_ds(["segment", "--checkpoint", str(model), "--input", str(run["scene"]), "--output", str(out),
                     "--nproc", str(P)], tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        with rasterio.open(out) as src:
            maps[P] = src.read(1)
    assert np.array_equal(maps[1], maps[3])
    # the exported model reproduces the 2-rank training-time evaluation of the val region
    from rest_ds.data import open_scene
    from rest_ds.train.metrics import confusion_matrix, segmentation_metrics

    with open_scene(run["scene"]) as r:
        lab = r.read_label(slice(0, r.shape[1]), slice(0, r.shape[2]))
        lab[~r.read_region("val", slice(0, r.shape[1]), slice(0, r.shape[2]))] = -100
        _, valid = r.read_image(slice(0, r.shape[1]), slice(0, r.shape[2]))
    lab[~valid] = -100
    ids = np.where(maps[1] == 255, 0, maps[1].astype(np.int64) - 1)       # raw values 1..3 -> ids
    m = segmentation_metrics(confusion_matrix(ids, lab, 3))
    ev = read_csv(run["out"] / "eval_log.csv")[-1]
    assert m["mIoU"] == pytest.approx(float(ev["mIoU"]), abs=1e-9)
