"""``rest-ds bench``: a real (tiny) scaling study on 1 and 2 gloo ranks.

One study (a timm ``test_resnet`` + UPerNet conv model from a training config,
a synthetic 64 x 96 scene, layouts 1 and 1x2, 1 warm-up + 2 steps and one
inference pass each) runs through the command line; the tests check that the
JSON, CSV and PNGs are written with sane fields, that the halo bytes SPIM
measured in the training steps equal the analytic volume from the layer
geometry, and that DeepSpeed's gradient reduction moved the ring all-reduce
volume of the parameters. The planning and efficiency rules are checked on
their own (no ranks).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from rest_ds.cli import main
from rest_ds.train.bench import Layout, efficiencies, parse_layout, parse_scene, plan_jobs, square_grid

CONFIG = """\
name: bench-test
model:
  encoder: {name: timm_cnn, in_chans: 4, kwargs: {model_name: test_resnet, out_indices: [1, 2, 3, 4]}}
  decoder: {name: upernet, channels: 16, norm: gn, dropout: 0.0, kwargs: {pool_scales: [1, 2], ppm_norm: none}}
data: {scenes: [nc-landsat7]}
deepspeed: {zero_stage: 2, gradient_clipping: 1.0}
optimizer: {name: adamw, lr: 1.0e-3}
train: {steps: 10}
"""
H, W = 64, 96
PLOTS = ("throughput.png", "efficiency.png", "breakdown.png", "memory.png")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    cfg = d / "conv.yaml"
    cfg.write_text(CONFIG)
    out = d / "out"
    code = main(["bench", "--config", str(cfg), "--scenes", f"{H}x{W}", "--layouts", "1,1x2", "--steps", "2",
                 "--warmup", "1", "--infer", "1", "--out", str(out), "--timeout", "600"])
    assert code == 0
    return out, json.loads((out / "bench.json").read_text())


@pytest.mark.slow
def test_outputs_written_with_sane_fields(study):
    out, doc = study
    assert doc["schema"] == 1
    runs = {r["key"]: r for r in doc["runs"]}
    assert sorted(runs) == [f"{H}x{W}x4|1", f"{H}x{W}x4|1x2"]
    for key, r in runs.items():
        P = r["ranks"]
        assert (r["dp"], r["sp"], r["scene"]["height"], r["scene"]["width"], r["scene"]["bands"]) == (1, P, H, W, 4)
        assert r["scene"]["synthetic"] and r["device"] == "cpu" and r["backend"] == "gloo"
        assert r["steps"] == 2 and len(r["step_s_all"]) == 2 and r["step_s"] > 0
        assert math.isclose(r["pixels_per_s"], H * W / r["step_s"], rel_tol=1e-9)
        assert math.isclose(r["pixels_per_s_per_rank"], r["pixels_per_s"] / P, rel_tol=1e-9)
        ph = r["phases_s"]
        for p in ("data", "forward", "loss", "backward", "optimizer", "other"):
            assert ph[p] >= 0, (key, p)
        assert ph["forward"] > 0 and ph["backward"] > 0 and ph["optimizer"] > 0
        # the phases are medians of a partition of each step: they cannot add up to much more than a step
        assert sum(v for k, v in ph.items() if k != "loop") <= 1.5 * max(r["step_s_all"])
        assert all(v >= 0 for v in r["phases_cpu_s"].values())
        mem = r["memory"]
        assert len(mem["rss_peak_mib"]) == P and min(mem["rss_peak_mib"]) > 50 and mem["cuda_peak_mib"] is None
        assert r["infer_s"] > 0 and math.isclose(r["infer_pixels_per_s"], H * W / r["infer_s"], rel_tol=1e-9)
        assert r["model"]["params"] > 100_000 and r["model"]["encoder"] == "timm_cnn"
        # rest-ds plan --calibration loads the config a run names
        assert Path(r["config"]).is_file() and r["config_name"] == "conv" and r["overrides"] == []
    one, two = runs[f"{H}x{W}x4|1"], runs[f"{H}x{W}x4|1x2"]
    assert one["efficiency"]["strong"] == 1.0 and one["efficiency"]["weak"] is None
    assert math.isclose(two["efficiency"]["strong"], two["pixels_per_s"] / (2 * one["pixels_per_s"]), rel_tol=1e-9)
    assert two["grid"] == [1, 2]
    assert not one["bytes_analytic"] and "halo" not in one["bytes"]
    # SPIM's own collectives ran on 2 ranks, and their time was attributed
    assert any(k.startswith("spim:") for k in two["comm_s"]) and any(k.startswith("ds:") for k in two["comm_s"])
    with open(out / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["key"] for r in rows] == [r["key"] for r in doc["runs"]]
    assert float(rows[1]["pixels_per_s"]) == pytest.approx(two["pixels_per_s"])
    assert "phases_s.backward" in rows[0] and "efficiency.strong" in rows[0] and "bytes.halo" in rows[1]
    # the scene's model FLOPs (a conv model: no attention) are the same work on 1 and 2 ranks
    assert one["flops_per_step"] == two["flops_per_step"] and one["flops_per_step"]["attention"] == 0
    assert one["flops_per_step"]["total"] > 1e8
    assert math.isclose(two["flops_per_s_per_rank"], two["flops_per_step"]["total"] / two["step_s"] / 2, rel_tol=1e-9)
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


@pytest.mark.slow
def test_measured_bytes_equal_analytic(study):
    _, doc = study
    two = [r for r in doc["runs"] if r["ranks"] == 2][0]
    ana = two["bytes_analytic"]
    assert "error" not in ana, ana
    # the halos of every conv, pool and resampling layer, forward and backward, to the byte
    assert two["bytes"]["halo"] > 0
    assert two["bytes"]["halo"] == ana["halo"]
    # DeepSpeed ZeRO-2: the ring all-reduce volume of the gradients (+ the gradient-norm scalars of
    # clipping) and the all-gather of the updated parameter partitions
    n = two["model"]["params"]
    assert ana["ds:all_reduce"] == 2 * 4 * n and ana["ds:all_gather"] == 4 * n
    assert ana["ds:all_reduce"] <= two["bytes"]["ds:all_reduce"] <= ana["ds:all_reduce"] + 1024
    assert ana["ds:all_gather"] <= two["bytes"]["ds:all_gather"] <= ana["ds:all_gather"] + 1024


def test_layout_and_scene_parsing():
    assert parse_layout("2") == Layout(1, 2, None)
    assert parse_layout("1x3") == Layout(1, 3, (1, 3))
    assert parse_layout("dp2") == Layout(2, 1, None)
    assert parse_layout("dp2:2x2") == Layout(2, 4, (2, 2)) and parse_layout("dp2:2x2").ranks == 8
    assert parse_layout("dp3:2").label == "dp3:2"
    for bad in ("", "x2", "2x", "dp", "dp0", "0", "2x0", "abc"):
        with pytest.raises(ValueError):
            parse_layout(bad)
    assert parse_scene("real") is None and parse_scene("64x96") == (64, 96, None)
    assert parse_scene("64x96x6") == (64, 96, 6)
    for bad in ("64", "0x64", "64x64x0", "ax64"):
        with pytest.raises(ValueError):
            parse_scene(bad)
    assert square_grid(1) == (1, 1) and square_grid(2) == (1, 2) and square_grid(6) == (2, 3) and square_grid(4) == (2, 2)


def test_weak_plan_and_efficiencies(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    jobs = plan_jobs(str(cfg), [], ["real"], [Layout(1, 1), Layout(1, 2), Layout(1, 4, (1, 4))], ["32x48"],
                     steps=1, warmup=0, infer=0, out=tmp_path, classes=3, make_scenes=False)
    weak = [j for j in jobs if j["weak_base"]]
    assert [(j["ranks"], j["grid"], j["scene_name"]) for j in weak] == [
        (1, "1x1", "weak 32x48x4 (32x48)"), (2, "1x2", "weak 32x48x4 (32x96)"), (4, "1x4", "weak 32x48x4 (32x192)")]
    assert [j["grid"] for j in jobs if not j["weak_base"]] == [None, None, "1x4"]
    variant = plan_jobs(str(cfg), ["train.steps=3"], ["real"], [Layout(1, 2)], [], steps=1, warmup=0, infer=0,
                        out=tmp_path, classes=3, make_scenes=False)
    assert [j["key"] for j in variant] == ["real|2|train.steps=3"]

    def run(key, ranks, name, pps, base=None, flops=None):
        return {"key": key, "config": "c", "ranks": ranks, "pixels_per_s": pps, "pixels_per_s_per_rank": pps / ranks,
                "scene": {"name": name, "height": 8, "width": 8, "weak_base": base}, "flops_per_s_per_rank": flops}

    runs = [run("a1", 1, "s", 100.0), run("a2", 2, "s", 180.0), run("a4", 4, "s", 300.0), run("o2", 2, "other", 50.0),
            run("w1", 1, "w", 10.0, "b", 4.0), run("w2", 2, "w2", 19.0, "b", 4.2), run("v1", 1, "v", 10.0, "c"),
            run("v2", 2, "v2", 16.0, "c")]
    efficiencies(runs)
    eff = {r["key"]: r["efficiency"] for r in runs}
    assert eff["a1"] == {"strong": 1.0, "weak": None, "weak_work": None} and eff["a2"]["strong"] == pytest.approx(0.9)
    assert eff["a4"]["strong"] == pytest.approx(0.75) and eff["o2"]["strong"] is None
    assert eff["w1"]["weak"] == 1.0 and eff["w1"]["weak_work"] == 1.0
    assert eff["w2"] == {"strong": None, "weak": pytest.approx(0.95), "weak_work": pytest.approx(1.05)}
    # no FLOP count (a model the meta-device counter cannot trace): no work-normalised figure
    assert eff["v2"] == {"strong": None, "weak": pytest.approx(0.8), "weak_work": None}


def test_model_flops_counts_attention_and_convs():
    """model_flops against the closed form: a 4 x 4 patch conv (3 -> D channels; forward 2 N D K, backward of
    its weight only, the input needs no gradient: 2 N D K) then self-attention over the N tokens (QK^T and AV
    forward 2 x 2 N^2 D, backward 4 x 2 N^2 D: 12 N^2 D); quadratic in N, so a scene twice as wide has 4 x the
    attention work and 2 x the conv work."""
    import torch.nn.functional as F

    from rest_ds.train.bench import model_flops

    D, K = 8, 3 * 4 * 4

    class Patches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(3, D, 4, stride=4)

        def forward(self, x):
            t = self.proj(x)
            B, _, h, w = t.shape
            q = t.flatten(2).transpose(1, 2).reshape(B, h * w, 2, D // 2).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, q, q)
            return o.transpose(1, 2).reshape(B, h * w, D).transpose(1, 2).reshape(B, D, h, w)

    for H, W in ((16, 16), (16, 32), (24, 40)):
        N = H * W // 16
        f = model_flops(Patches(), (1, 3, H, W))
        assert f == {"total": 12 * N * N * D + 4 * N * D * K, "attention": 12 * N * N * D}, (H, W, f)


def test_bad_input_exits_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    assert main(["bench", "--config", str(cfg), "--layouts", "2y"]) == 2
    assert "not a layout" in capsys.readouterr().err
    assert main(["bench", "--config", str(cfg), "--scenes", "64"]) == 2
    assert main(["bench", "--config", str(cfg), "--weak", "real"]) == 2
    assert main(["bench", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["bench", "--config", str(cfg), "train.stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err
