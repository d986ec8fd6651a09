"""`rest-ds segment` over many scenes in one launch (SYNTHETIC GeoTIFFs the test writes).

Three scenes of different sizes given as several --input, a folder, a quoted
glob and an @list file; one map per scene in the output folder, each equal to
the map of a one-scene run; a rerun skips the finished scenes, redoes one that
was started and not finished, and --overwrite redoes all.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a model fitted in-process, segment on 2 ranks

from tests.train_scene import make_scene


def _read(p):
    import rasterio

    with rasterio.open(p) as src:
        return src.read(1)


@pytest.fixture(scope="module")
def scenes(model_and_scene, tmp_path_factory):  # model_and_scene: tests/conftest.py
    d = tmp_path_factory.mktemp("batch")
    (d / "in").mkdir()
    for name, (h, w) in {"a": (61, 101), "b": (48, 40), "c": (33, 70)}.items():
        make_scene(d / f"s_{name}", height=h, width=w)
        shutil.copy(d / f"s_{name}" / "image.tif", d / "in" / f"{name}.tif")
    return d


def _main(args):
    from rest_ds.cli import main

    return main(["segment", *args])


def test_many_scenes_one_launch_then_skip_on_rerun(model_and_scene, scenes, capsys):  # noqa: F811
    model = str(model_and_scene["model"])
    d = scenes
    ins = [str(d / "in" / f"{n}.tif") for n in "abc"]
    out = d / "maps"
    assert _main(["--checkpoint", model, "--input", ins[0], "--input", ins[1], "--input", ins[2],
                  "--output", str(out), "--nproc", "2"]) == 0
    log = capsys.readouterr().out
    assert "3 scene(s) done, 0 already done" in log
    singles = {}
    for n, ref in zip("abc", ins):
        one = d / f"one_{n}.tif"
        assert _main(["--checkpoint", model, "--input", ref, "--output", str(one), "--nproc", "2"]) == 0
        singles[n] = _read(one)
        assert np.array_equal(_read(out / f"{n}.tif"), singles[n]), n
    man = json.loads((out / "segment_batch.json").read_text())
    assert {k: v["status"] for k, v in man.items()} == {"a.tif": "done", "b.tif": "done", "c.tif": "done"}
    capsys.readouterr()
    # rerun: a folder input; 'b' was started and not finished (a crash): it is redone, the others skipped
    man["b.tif"]["status"] = "started"
    (out / "segment_batch.json").write_text(json.dumps(man))
    assert _main(["--checkpoint", model, "--input", str(d / "in"), "--output", str(out), "--nproc", "2"]) == 0
    log = capsys.readouterr().out
    assert "1 scene(s) done, 2 already done (skipped)" in log and "b.tif" in log
    # a glob and an @list file name the same scenes; --overwrite redoes all of them (one rank)
    (d / "list.txt").write_text("# scenes\nin/a.tif\nin/c.tif\n")
    assert _main(["--checkpoint", model, "--input", str(d / "in" / "[ab].tif"), "--input", f"@{d / 'list.txt'}",
                  "--output", str(out), "--overwrite"]) == 0
    assert "3 scene(s) done, 0 already done" in capsys.readouterr().out
    for n in "abc":
        assert np.array_equal(_read(out / f"{n}.tif"), singles[n]), n


def test_batch_input_errors(model_and_scene, scenes, capsys):  # noqa: F811
    model = str(model_and_scene["model"])
    d = scenes
    assert _main(["--checkpoint", model, "--input", str(d / "in" / "*.nope"), "--input", str(d / "in" / "a.tif"),
                  "--output", str(d / "x")]) == 2
    assert "no scene found" in capsys.readouterr().err
    assert _main(["--checkpoint", model, "--input", str(d / "in"), "--output", str(d / "x.tif")]) == 2
    assert "it is a folder" in capsys.readouterr().err
    (d / "other").mkdir()
    (d / "other" / "a.tif").write_bytes(b"")
    assert _main(["--checkpoint", model, "--input", str(d / "in"), "--input", str(d / "other" / "a.tif"),
                  "--output", str(d / "y")]) == 2
    assert "would both write" in capsys.readouterr().err
