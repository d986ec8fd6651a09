"""Fine-tuning foundation encoders: run-time scene sizes under SPIM.

ViT encoders built for one scene size (``img_size``) run on another: a
non-square scene and the 90-degree rotation of the build size (what the
``rot90`` augmentation feeds them). The position table (and SAM's
relative-position tables) are resampled once, on the replicated parameter, to
the *global* token grid of the input, and each rank adds its tile of it. A 1x2
grid (uneven tiles) is compared with one process: output, input gradient, every
parameter gradient and every parameter after one SGD step, float64 at 1e-10.
One spawn runs every case (tests/harness.py).
"""
from __future__ import annotations

import functools

import pytest
import torch

from rest_ds.spim import SpatialMesh, TileLayout
from rest_ds.spim.verify import compare_sharded

from .harness import init_deepspeed_rank, run_grid
from .nets import Seg, randomize_positions, scene

P = functools.partial


def vit_enc(cls=False):
    from rest_ds.models.registry import build_encoder

    enc = build_encoder("timm_vit", model_name="vit_tiny_patch16_224", img_size=(64, 96), indices=[0, 1], depth=2,
                        embed_dim=64, num_heads=4, patch_size=8, class_token=cls)
    return Seg(randomize_positions(enc), "linear")


def samvit_enc():
    from rest_ds.models.registry import build_encoder

    enc = build_encoder("timm_vit", model_name="samvit_base_patch16", img_size=(64, 128), indices=[0, 1], depth=2,
                        embed_dim=64, num_heads=2, patch_size=8, window_size=4, global_attn_indexes=(1,),
                        use_rel_pos=True, neck_chans=32, norm=True)
    return Seg(randomize_positions(enc), "linear")


def hfsam_enc():
    from rest_ds.models.registry import build_encoder

    enc = build_encoder("hf_sam", img_size=(64, 128), variant=None, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, patch_size=8, window_size=4, global_attn_indexes=[1],
                        output_channels=32, indices=[0])
    return Seg(randomize_positions(enc), "linear")


def _double(f):
    return f().double()


# name -> (factory, input H x W, 1x2 layout). Built at 64 x 96 (ViT) / 64 x 128 (SAM); inputs: the rotation of
# that size and another non-square size; uneven tiles on the encoder's alignment (8; 32 for windows of 4 x 8 px)
CASES = {
    "vit-rotated": (vit_enc, (96, 64), TileLayout((0, 96), (0, 24, 64))),
    "vit_cls-other": (P(vit_enc, True), (48, 112), TileLayout((0, 48), (0, 64, 112))),
    "samvit-rotated": (samvit_enc, (128, 64), TileLayout((0, 128), (0, 32, 64))),
    "samvit-other": (samvit_enc, (96, 160), TileLayout((0, 96), (0, 96, 160))),
    "hf_sam-rotated": (hfsam_enc, (128, 64), TileLayout((0, 128), (0, 32, 64))),
    "hf_sam-other": (hfsam_enc, (96, 160), TileLayout((0, 96), (0, 64, 160))),
}


def _run_sizes(grid):
    mesh = SpatialMesh.build(grid=grid)
    return {name: compare_sharded(P(_double, f), scene((2, 3, *hw), torch.float64), mesh, layout, train=True,
                                  step=True, seed=3)
            for name, (f, hw, layout) in CASES.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_vit_encoders_take_the_scene_size_at_run_time_under_spim(case):
    factory, hw, _ = CASES[case]
    torch.manual_seed(0)
    model = factory()
    built = tuple(model.encoder.model.patch_embed.img_size if hasattr(model.encoder, "model")
                  else model.encoder.img_size)
    assert built != hw  # the input is not the size the encoder was built for
    rep = run_grid(_run_sizes, (1, 2))[case]
    assert rep.refused is None, rep.refused
    names = {n for n, _ in model.named_parameters()}
    assert {f"grad {n}" for n in names} <= set(rep.errors)
    assert {f"param after step {n}" for n in names} <= set(rep.errors)
    assert {"output[0]", "input grad"} <= set(rep.errors)
    worst = max(rep.errors, key=rep.errors.get)
    print(f"1x2 {case} {hw}: max rel error {rep.errors[worst]:.2e} ({worst})")
    bad = rep.failures(1e-10)
    assert not bad, sorted(bad.items(), key=lambda kv: -kv[1])[:8]


# --- pretrained weights as users have them ------------------------------------------------------

def _tiny_sam_model():
    from transformers import SamConfig, SamModel

    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=64,
                  window_size=4, global_attn_indexes=[1], mlp_dim=64, initializer_range=0.02)
    torch.manual_seed(0)
    return SamModel(SamConfig(vision_config=vision))


def test_sam_save_pretrained_folder_loads_with_a_report(tmp_path):
    from rest_ds.models.registry import build_encoder

    sam = _tiny_sam_model()
    sam.save_pretrained(tmp_path / "sam")
    ref = sam.vision_encoder.state_dict()
    enc = build_encoder("hf_sam", img_size=(64, 96), variant=None, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=64,
                        in_chans=6, checkpoint=str(tmp_path / "sam"))
    own = enc.sam.state_dict()
    torch.testing.assert_close(own["layers.1.attn.qkv.weight"], ref["layers.1.attn.qkv.weight"])
    w3, w6 = ref["patch_embed.projection.weight"], own["patch_embed.projection.weight"]
    assert w6.shape[1] == 6  # timm's tile rule: the 3 filters repeated, scaled by 3/6
    torch.testing.assert_close(w6, torch.cat([w3, w3], 1) * 0.5)
    assert own["pos_embed"].shape == (1, 8, 12, 32) and ref["pos_embed"].shape == (1, 8, 8, 32)
    rep = enc.load_report
    print(rep)
    assert str(tmp_path / "sam" / "model.safetensors") in rep
    assert f"{len(ref)} tensors loaded, 0 missing" in rep
    from safetensors import safe_open

    with safe_open(str(tmp_path / "sam" / "model.safetensors"), "pt") as f:
        n_other = len([k for k in f.keys() if not k.startswith("vision_encoder.")])
    assert n_other > 0 and f"{n_other} unexpected dropped" in rep  # prompt encoder + mask decoder
    assert "2 resized (layers.1.attn.rel_pos_w, pos_embed)" in rep
    assert "3 -> 6 bands by rule 'tile'" in rep


def _timm_vit(img, **kw):
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img, depth=2, embed_dim=64,
                             num_heads=2, patch_size=8, **kw)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_checkpoint_file_loads_with_a_report(tmp_path, fmt):
    from rest_ds.models.registry import build_encoder

    torch.manual_seed(0)
    src = _timm_vit(32)  # a checkpoint at another size, with its classifier
    sd = src.state_dict()
    path = tmp_path / f"vit.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save({"model": sd, "epoch": 3}, path)
    enc = build_encoder("timm_vit", model_name="vit_tiny_patch16_224", img_size=(64, 96), depth=2, embed_dim=64,
                        num_heads=2, patch_size=8, indices=[1], checkpoint=str(path))
    torch.testing.assert_close(enc.model.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    rep = enc.load_report
    print(rep)
    assert str(path) in rep and "2 unexpected dropped (head." in rep and "head.weight" in rep
    assert "1 resized (pos_embed)" in rep and "bands unchanged" in rep


def test_pickled_objects_are_refused(tmp_path):
    from rest_ds.models.encoders.common import read_state_dict

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": functools.partial(print, "x")}, path)
    with pytest.raises(ValueError, match="not a weights-only torch file"):
        read_state_dict(path)


def test_prithvi_released_layout_pt_loads_with_a_report(tmp_path):
    from rest_ds.models.registry import build_encoder

    kw = dict(embed_dim=64, depth=2, num_heads=4, patch_size=8)
    torch.manual_seed(0)
    src = build_encoder("prithvi_vit", **kw)
    sd = {f"encoder.{k}": v for k, v in src.state_dict().items()}
    sd["encoder.pos_embed"] = torch.zeros(1, 1 + 4 * 4, 64)
    sd["decoder.decoder_embed.weight"] = torch.zeros(32, 64)
    torch.save(sd, tmp_path / "Prithvi_EO_V2_tiny.pt")
    enc = build_encoder("prithvi_vit", **kw, bands=["BLUE", "GREEN", "RED", "NIR_NARROW"],
                        checkpoint=str(tmp_path / "Prithvi_EO_V2_tiny.pt"))
    torch.testing.assert_close(enc.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    rep = enc.load_report
    print(rep)
    assert "0 missing" in rep and "2 unexpected dropped" in rep
    assert "6 -> 4 bands by rule 'name'" in rep


def _seg_cfg(num_classes=3, init_from=None):
    return {"num_classes": num_classes, "init_from": init_from,
            "encoder": {"name": "timm_vit", "in_chans": 4,
                        "kwargs": {"model_name": "vit_tiny_patch16_224", "img_size": [64, 64], "depth": 2,
                                   "embed_dim": 64, "num_heads": 2, "patch_size": 8, "indices": [0, 1]}},
            "neck": {"name": "simple_pyramid", "kwargs": {"scales": [2, 1], "in_index": None, "norm": "ln"}},
            "decoder": {"name": "upernet", "channels": 16, "norm": "gn", "kwargs": {"pool_scales": [1, 2]}}}


def test_init_from_an_export_starts_a_new_model(tmp_path):
    from rest_ds.models.config import ConfigError, build_segmentor
    from rest_ds.train.checkpoint import export_model

    torch.manual_seed(0)
    trained = build_segmentor(_seg_cfg())
    export_model({k: v.detach() for k, v in trained.state_dict().items()}, {"num_classes": 3},
                 tmp_path / "model.safetensors")
    torch.manual_seed(1)
    model = build_segmentor(_seg_cfg(init_from=str(tmp_path / "model.safetensors")))
    for (n, a), (_, b) in zip(trained.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n
    rep = model.load_reports[-1]
    print(rep)
    assert f"{len(trained.state_dict())} tensors loaded, 0 missing, 0 unexpected dropped" in rep
    with pytest.raises(ConfigError, match="model.init_from.*shape mismatch"):
        build_segmentor(_seg_cfg(num_classes=5, init_from=str(tmp_path / "model.safetensors")))
    with pytest.raises(ConfigError, match="model.init_from.*does not exist"):
        build_segmentor(_seg_cfg(init_from=str(tmp_path / "nope.safetensors")))


def test_weight_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    import yaml

    from rest_ds.train.config import load_config

    (tmp_path / "cfg").mkdir()
    cfg = _seg_cfg(init_from="weights/model.safetensors")
    cfg["encoder"]["checkpoint"] = "weights/vit.pth"
    (tmp_path / "cfg" / "run.yaml").write_text(yaml.safe_dump({"model": cfg, "data": {"scenes": ["nc-landsat7"]}}))
    monkeypatch.chdir(tmp_path)
    c = load_config(tmp_path / "cfg" / "run.yaml")
    assert c.model.encoder.checkpoint == str(tmp_path / "cfg" / "weights" / "vit.pth")
    assert c.model.init_from == str(tmp_path / "cfg" / "weights" / "model.safetensors")


# --- fine-tuning controls under DeepSpeed ZeRO 1-3 and SPIM (sp=2) ---------------------------------

FT_MODEL = {  # a small Prithvi-style ViT (embedding + 2 blocks) + UPerNet, GroupNorm
    "encoder": {"name": "prithvi_vit",
                "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "indices": [0, 1]}},
    "decoder": {"name": "upernet", "channels": 16, "norm": "gn", "dropout": 0.0, "kwargs": {"pool_scales": [1, 2]}},
}
FT_SHAPE = (1, 4, 44, 58)
# name -> (ZeRO stage, finetune section)
FT_CASES = {
    "z1-freeze2-llrd": (1, {"freeze_layers": 2, "layer_decay": 0.5, "encoder_lr": 5e-3}),
    "z2-freeze_encoder-unfreeze1": (2, {"freeze_encoder": True, "unfreeze_step": 1}),
    "z3-freeze1-llrd": (3, {"freeze_layers": 1, "layer_decay": 0.7}),
    "z2-lora": (2, {"lora": {"r": 4, "alpha": 8}}),
}


def _ft_cfg(finetune):
    from rest_ds.train.config import load_config

    return load_config(data={"model": FT_MODEL, "data": {"scenes": ["s"]}, "optimizer": {"name": "adamw", "lr": 1e-2,
                                                                        "weight_decay": 0.05, "eps": 1e-3},
                             "schedule": {"name": "constant"}, "train": {"steps": 2}, "finetune": finetune})


def _ft_case(stage, finetune):
    import deepspeed
    import torch.distributed as dist
    import torch.nn.functional as F

    from rest_ds.spim import SpatialMesh, from_local, parallelize
    from rest_ds.spim.tiling import TileLayout
    from rest_ds.spim.verify import rel_error
    from rest_ds.train import deepspeed_compat as dsc
    from rest_ds.train.engine import build_model, make_optimizer, make_scheduler
    from rest_ds.train.finetune import apply_freezing, apply_lora, describe, merge_lora, param_groups
    from rest_ds.train.metrics import pixel_loss

    cfg = _ft_cfg(finetune)
    mesh = SpatialMesh.build(grid=(1, 2))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(FT_SHAPE, generator=gen)
    y = torch.randint(0, 3, (1,) + FT_SHAPE[2:], generator=gen)

    def build():
        torch.manual_seed(0)
        m = build_model(FT_MODEL, num_classes=3, in_chans=4)[0]
        frozen = apply_lora(m, cfg) | apply_freezing(m, cfg)
        groups = param_groups(m, cfg, frozen)
        return m, frozen, groups

    model, frozen, groups = build()
    line = describe(model, groups, frozen)
    no_wd = sorted(n for n, p in model.named_parameters() for g in groups if not g["decay"]
                   and any(p is q for q in g["params"]))
    lrs = sorted({round(g["lr_scale"], 6) for g in groups})
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    layout = TileLayout.even(FT_SHAPE[2], FT_SHAPE[3], (1, 2), model.align)
    rows, cols = layout.tile(*mesh.coord)
    parallelize(model, mesh, align=model.align)
    opt = make_optimizer(model, cfg, groups)
    zero = {"stage": stage, **({"memory_efficient_linear": False} if stage == 3 else {})}
    engine, _, _, sched = dsc.initialize(
        model, opt, {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
                     "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9},
        lr_scheduler=make_scheduler(opt, cfg))
    xs = from_local(x[..., rows, cols].contiguous(), mesh, layout=layout)
    ys = from_local(y[..., rows, cols].contiguous(), mesh, dims=(1, 2), layout=layout)
    after = []
    for _ in range(2):
        engine.backward(pixel_loss(engine(xs), ys))
        engine.step()
        ps = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in ps], enabled=stage == 3):
            after.append({n: p.detach().clone() for n, p in ps})
    out = None
    if dist.get_rank() == 0:  # the same groups and schedule on the whole scene in one process
        ref, _, rgroups = build()
        ropt = make_optimizer(ref, cfg, rgroups)
        rsched = make_scheduler(ropt, cfg)
        err = {}
        for s in range(2):
            ropt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            ropt.step()
            rsched.step()
            for n, q in ref.named_parameters():
                err[f"step {s + 1} {n}"] = rel_error(after[s][n], q.detach())
        merged = None
        if cfg.finetune.lora is not None:  # the adapters merged into plain weights give the same model
            ref.eval()
            plain = build_model(FT_MODEL, num_classes=3, in_chans=4)[0].eval()
            lc = cfg.finetune.lora
            plain.load_state_dict(merge_lora(ref.state_dict(), lc.r, lc.alpha), strict=True)
            with torch.no_grad():
                merged = rel_error(plain(x), ref(x))
        out = {"merged": merged, "line": line, "frozen": sorted(frozen), "error": max(err.values()),
               "worst": max(err, key=err.get),
               "unchanged": [sorted(n for n in init if torch.equal(after[s][n], init[n])) for s in range(2)],
               "lrs": lrs, "no_wd": no_wd}
    box = [out]
    dist.broadcast_object_list(box, src=0)
    engine.destroy()
    return box[0]


def _ft_all(cases):
    init_deepspeed_rank()
    return {name: _ft_case(*c) for name, c in cases.items()}


@pytest.fixture(scope="module")
def ft_results():
    from rest_ds.spim.spawn import spawn

    return spawn(_ft_all, 2, FT_CASES, timeout_s=900)[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(FT_CASES))
def test_finetune_controls_under_zero_and_spim(ft_results, case):
    r = ft_results[case]
    stage, ft = FT_CASES[case]
    print(f"{case}: {r['line']}; max rel error vs one process {r['error']:.1e} ({r['worst']})")
    assert r["error"] <= 1e-5, (r["worst"], r["error"])
    frozen = set(r["frozen"])
    if "lora" in ft:  # only the adapters train in the encoder; the decoder trains
        assert frozen and all(n.startswith("encoder.") and ".lora_" not in n for n in frozen)
        assert "encoder.blocks.0.attn.qkv.base_layer.weight" in frozen and "encoder.blocks.0.norm1.weight" in frozen
        assert set(r["unchanged"][1]) == frozen
        assert r["merged"] is not None and r["merged"] <= 1e-6, r["merged"]
        return
    if ft.get("freeze_encoder"):
        assert frozen and all(n.startswith("encoder.") for n in frozen)
        assert "encoder.blocks.1.mlp.fc2.weight" in frozen
    else:
        k = ft["freeze_layers"]  # layer 0: patch embedding + class token; layer 1: block 0
        assert "encoder.patch_embed.proj.weight" in frozen and "encoder.cls_token" in frozen
        assert ("encoder.blocks.0.attn.qkv.weight" in frozen) == (k >= 2)
        assert not any(n.startswith("encoder.blocks.1.") for n in frozen)
    # frozen parameters do not change (bit for bit); every other parameter does
    if ft.get("unfreeze_step") == 1:
        assert set(r["unchanged"][0]) == frozen     # step 1: lr 0 for the frozen groups
        assert r["unchanged"][1] == []              # step 2: they train
    else:
        assert set(r["unchanged"][0]) == set(r["unchanged"][1]) == frozen
    if "layer_decay" in ft:  # layer i of L = 2 blocks at s * d^(3 - i); the final norm (layer 3) at s
        d, s, k = ft["layer_decay"], ft.get("encoder_lr", 1e-2) / 1e-2, ft["freeze_layers"]
        assert r["lrs"] == sorted({1.0, s} | {round(s * d ** (3 - i), 6) for i in range(k, 3)})
    assert "decoder.fpn_bottleneck.0.weight" not in r["no_wd"]
    assert {"encoder.blocks.1.norm1.weight", "encoder.blocks.1.attn.qkv.bias"} <= set(r["no_wd"])


@pytest.mark.slow
@pytest.mark.launcher
def test_lora_run_exports_merged_plain_weights(tmp_path):
    """Launcher run with LoRA (2 steps, ZeRO-2, sp=2) -> export has plain keys -> segment on 2 ranks."""
    from safetensors import safe_open

    from tests.harness import launch, rest_ds
    from tests.train_scene import make_scene, tiny_config, write_config

    scene = make_scene(tmp_path / "scene")
    cfg = tiny_config(scene, tmp_path / "run", train__steps=2, train__eval_interval=2)
    cfg["finetune"] = {"lora": {"r": 4, "alpha": 8}}
    p, _ = launch(["train", "--config", str(write_config(tmp_path / "lora.yaml", cfg))], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "finetune: " in p.stdout and " frozen;" in p.stdout
    e = rest_ds(["export", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "m.safetensors")],
                tmp_path)
    assert e.returncode == 0, e.stderr[-3000:]
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    assert "encoder.blocks.0.attn.qkv.weight" in keys
    s = rest_ds(["segment", "--checkpoint", str(tmp_path / "m.safetensors"), "--input", str(scene), "--output",
                 str(tmp_path / "map.tif"), "--nproc", "2"], tmp_path)
    assert s.returncode == 0, s.stderr[-3000:]


def test_synthetic_scene_has_disjoint_train_val_test_regions(tmp_path):
    """`rest-ds data synthetic` scenes (SYNTHETIC data) can be trained and validated on out of the box."""
    import numpy as np

    from rest_ds.data import open_scene
    from rest_ds.data.samples import synthetic_hyperspectral

    for fmt in ("hdf5", "mat"):
        path = synthetic_hyperspectral(tmp_path / fmt, format=fmt, bands=8, height=50, width=70)
        with open_scene(path) as r:
            masks = {k: r.read_region(k, slice(0, 50), slice(0, 70)) for k in ("train", "val", "test")}
            lab = r.read_label(slice(0, 50), slice(0, 70))
        total = sum(m.astype(int) for m in masks.values())
        assert (total == 1).all()                       # disjoint, covering the scene
        assert masks["train"].mean() > 0.5 and masks["val"].any() and masks["test"].any()
        for m in masks.values():                        # several classes in every region
            assert len(np.unique(lab[m & (lab >= 0)])) >= 3


def test_checkpoint_mismatch_error_names_the_fix():
    """A file that does not fit the encoder is refused naming the keys and what to change: a wrapper's key
    prefix (the exact rename), another size (shapes), another depth, another architecture."""
    from rest_ds.models.encoders.common import load_strict

    def net(width=4, depth=2):
        return torch.nn.Sequential(torch.nn.Linear(3, width), *[torch.nn.Linear(width, width) for _ in range(depth)])

    model = net()
    cases = {
        "prefix": ({f"encoder.{k}": v for k, v in model.state_dict().items()},
                   "the file's keys start with 'encoder.'", "k.removeprefix('encoder.')"),
        "size": (net(width=5).state_dict(), "checkpoint (5, 3) vs model (4, 3)", "another model size"),
        "depth": (net(depth=3).state_dict(), "unexpected: 3.weight, 3.bias", "another depth"),
        "architecture": ({"conv.weight": torch.zeros(1)}, "missing: 0.weight", "another architecture"),
    }
    for name, (sd, keys, fix) in cases.items():
        with pytest.raises(ValueError) as e:
            load_strict(model, sd, "enc")
        msg = str(e.value)
        assert keys in msg and fix in msg.splitlines()[-1] and msg.splitlines()[-1].startswith("  fix: "), (name, msg)
    fixed = {k.removeprefix("encoder."): v for k, v in cases["prefix"][0].items()}  # the rename the hint gives
    load_strict(model, fixed, "enc")
