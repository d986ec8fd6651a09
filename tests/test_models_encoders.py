"""Registered encoders (rest_ds/models/encoders): exact under SPIM, checkpoint loading, band adaptation.

Multi-process part: every encoder (timm ``vit_*`` with and without class
token, timm ``samvit_*``, transformers' ``SamVisionEncoder``, the Prithvi-EO-2.0
ViT with temporal/location encodings and two frames, a timm CNN) feeding the
registered UPerNet and linear decoders, at small sizes (width 64-96, 2-3
blocks), on uneven tiles aligned to the encoder's ``align`` of grids 1x2, 2x2
and 1x3: output, input grad, every parameter grad and every parameter after one
SGD step, in training mode, compared with one process. Global attention runs
as Ulysses (4 heads, no class token, sp 2 and 4), as all-gather of K/V (4 heads
on sp 3: not divisible; class tokens), and with SAM's relative-position bias
(K/V gathered in global token order); windowed blocks stay local. Some cases
use activation checkpointing, one DropPath (shared RNG over sp; not combined
with checkpointing, whose backward recompute redraws the mask outside SPIM's
shared RNG: an open SPIM issue), one a samvit
scene that is not a window multiple (padded at the scene's bottom/right by the
model).
Non-square SAM scenes (64 x 128) run through transformers' square-only
``SamVisionEncoder`` (hf_sam.py resizes it).

Precision: float64 at 1e-10 for every case, float32 at 1e-5 for the
well-conditioned ones (docs/design.md's contract). Two things keep the float32
comparison meaningful: the linear head has no norm (a BatchNorm right after the
features cancels the gradient of the last bias exactly, leaving rounding noise
of a zero gradient), and transformers' SAM is re-initialised with std 0.02
(its default ``initializer_range`` of 1e-10 makes every gradient ~1e-17).

One spawn per grid runs every case (tests/harness.py).
"""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rest_ds.models.encoders  # noqa: F401  (registers the encoders)
from rest_ds.models.encoders import bands as B
from rest_ds.models.encoders.prithvi import PRITHVI_VARIANTS, sincos_3d
from rest_ds.models.registry import ENCODERS, build_encoder
from rest_ds.spim import SpatialMesh, TileLayout, check_aligned
from rest_ds.spim.attention import choose_algorithm
from rest_ds.spim.verify import compare_sharded

from .harness import TOL, run_grid
from .nets import Seg, randomize_positions, scene


# --- models under test (module level: the ranks unpickle them) -----------------

def vit(head="linear", ckpt=False, cls=False, heads=4, drop_path=0.0):
    enc = build_encoder("timm_vit", model_name="vit_tiny_patch16_224", img_size=(64, 96), indices=[0, 2], depth=3,
                        embed_dim=heads * (16 if heads == 4 else 32), num_heads=heads, patch_size=8,
                        class_token=cls, drop_path_rate=drop_path, grad_checkpointing=ckpt)
    return Seg(enc, head)


def samvit(head="linear", ckpt=False, size=(64, 128)):
    enc = build_encoder("timm_vit", model_name="samvit_base_patch16", img_size=size, indices=[0, 1], depth=2,
                        embed_dim=64, num_heads=2, patch_size=8, window_size=4, global_attn_indexes=(1,),
                        use_rel_pos=True, neck_chans=32, norm=True, grad_checkpointing=ckpt)
    return Seg(randomize_positions(enc), head)


def hfsam(head="linear", ckpt=False, size=(64, 128)):
    enc = build_encoder("hf_sam", img_size=size, variant=None, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, patch_size=8, window_size=4, global_attn_indexes=[1],
                        output_channels=32, indices=[0], initializer_range=0.02, grad_checkpointing=ckpt)
    return Seg(randomize_positions(enc), head)


def prithvi(head="linear", ckpt=False, frames=1):
    enc = build_encoder("prithvi_vit", embed_dim=64, depth=3, num_heads=4, patch_size=8, indices=[0, 2],
                        coords_encoding=("time", "location"), coords_scale_learn=True, num_frames=frames,
                        grad_checkpointing=ckpt)
    return Seg(enc, head, coords=True)


def cnn(head="linear"):
    return Seg(build_encoder("timm_cnn", model_name="resnet10t", out_indices=(1, 2, 3, 4)), head)


def _double(factory):
    return factory().double()


# --- cases and layouts ----------------------------------------------------------

# uneven tiles (none is the even split) aligned to 8 (ViTs with patch 8) and 32 (windowed ViTs: patch 8 x
# window 4; the CNN's deepest stride) of a 64 x 96 and a 64 x 128 scene
L8 = {(1, 2): TileLayout((0, 64), (0, 40, 96)), (2, 2): TileLayout((0, 24, 64), (0, 56, 96)),
      (1, 3): TileLayout((0, 64), (0, 24, 64, 96))}
L32 = {(1, 2): TileLayout((0, 64), (0, 96, 128)), (2, 2): TileLayout((0, 32, 64), (0, 32, 128)),
       (1, 3): TileLayout((0, 64), (0, 32, 96, 128))}
GRIDS = list(L8)
P = functools.partial
# name -> (factory, input shape, layouts, global attention: (kind, heads) or None). kind 'plain': Ulysses
# when heads % sp == 0, else all-gather of K/V; 'prefix' (class token): all-gather; 'bias' (SAM's
# relative-position bias as attn_mask): K/V gathered in global token order
MODELS = {
    "vit-linear": (vit, (2, 3, 64, 96), L8, ("plain", 4)),
    "vit-upernet-ckpt": (P(vit, "upernet", True), (2, 3, 64, 96), L8, ("plain", 4)),
    "vit_cls_droppath-upernet": (P(vit, "upernet", False, True, 3, 0.3), (2, 3, 64, 96), L8, ("prefix", 3)),
    "samvit-linear": (samvit, (2, 3, 64, 128), L32, ("bias", 2)),
    "samvit-upernet-ckpt": (P(samvit, "upernet", True), (2, 3, 64, 128), L32, ("bias", 2)),
    "hf_sam-upernet": (P(hfsam, "upernet"), (2, 3, 64, 128), L32, ("bias", 2)),
    "hf_sam-linear-ckpt": (P(hfsam, "linear", True), (2, 3, 64, 128), L32, ("bias", 2)),
    "prithvi-upernet": (P(prithvi, "upernet"), (2, 6, 64, 96), L8, ("prefix", 4)),
    "prithvi_2frames-linear-ckpt": (P(prithvi, "linear", True, 2), (2, 6, 2, 64, 96), L8, ("prefix", 4)),
}
FP32 = ("vit-linear", "vit_cls_droppath-upernet", "samvit-upernet-ckpt", "hf_sam-upernet",
        "prithvi_2frames-linear-ckpt")
EXTRA = {  # one grid each, float64 (the timm CNN path is also covered by test_spim_models)
    (1, 2): {"timm_cnn-linear": (cnn, (2, 3, 64, 128), TileLayout((0, 64), (0, 96, 128)), None),
             "timm_cnn-upernet": (P(cnn, "upernet"), (2, 3, 64, 128), TileLayout((0, 64), (0, 32, 128)), None),
             # one sample, one token row: (1, 1, 1, w, D) -> (1, w, D) must read as tokens (the class token
             # is concatenated along dim 1), not as a batchless one-row grid
             "prithvi_one_row-linear": (prithvi, (1, 6, 8, 96), TileLayout((0, 8), (0, 40, 96)), ("prefix", 4))},
    (2, 2): {},
    # 13 tokens wide: windows of 4 need padding at the scene's right border
    (1, 3): {"samvit_104-linear": (P(samvit, "linear", False, (64, 104)), (2, 3, 64, 104),
                                   TileLayout((0, 64), (0, 32, 64, 104)), ("bias", 2))},
}


def grid_cases(grid) -> dict:
    """case -> (factory, input shape, layout, attention, dtype)"""
    out = {}
    for name, (f, shape, layouts, attn) in MODELS.items():
        out[f"{name}-fp64"] = (P(_double, f), shape, layouts[grid], attn, torch.float64)
        if name in FP32:
            out[f"{name}-fp32"] = (f, shape, layouts[grid], attn, torch.float32)
    for name, (f, shape, layout, attn) in EXTRA[grid].items():
        out[f"{name}-fp64"] = (P(_double, f), shape, layout, attn, torch.float64)
    return out


def _run_grid(grid):
    mesh = SpatialMesh.build(grid=grid)
    out = {}
    for name, (factory, shape, layout, attn, dtype) in grid_cases(grid).items():
        rep = compare_sharded(factory, scene(shape, dtype), mesh, layout, train=True, step=True, seed=3)
        out[name] = (rep, attention_path(attn, mesh))
    return out


def attention_path(attn, mesh) -> str | None:
    """How SPIM runs the case's global attention (rest_ds/spim/ops/linear.py, attention.py)."""
    if attn is None:
        return None
    kind, heads = attn
    if kind == "plain":
        return choose_algorithm(heads, mesh)
    return {"prefix": "allgather (class token)", "bias": "K/V gathered (attn bias)"}[kind]


def _param_names(factory) -> set[str]:
    torch.manual_seed(0)
    return {n for n, _ in factory().named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("grid,case", [pytest.param(g, c, id=f"{g[0]}x{g[1]}-{c}")
                                       for g in GRIDS for c in grid_cases(g)])
def test_encoder_segmentor_exact_under_spim(grid, case):
    factory, shape, layout, attn, dtype = grid_cases(grid)[case]
    rep, algo = run_grid(_run_grid, grid)[case]
    assert rep.refused is None, rep.refused
    assert rep.grid == grid and layout.grid == grid
    # every parameter got a gradient on both sides and was compared, before and after the step
    names = _param_names(factory)
    missing = {f"grad {n}" for n in names} - set(rep.errors)
    assert not missing, sorted(missing)[:8]
    assert {f"param after step {n}" for n in names} <= set(rep.errors)
    assert {"output[0]", "input grad"} <= set(rep.errors)
    if attn:  # the global attention exchanged tokens
        assert rep.comm_bytes.get("all_to_all", 0) > 0, rep.comm_bytes
    worst = max(rep.errors, key=rep.errors.get)
    print(f"{grid[0]}x{grid[1]} {case} [{algo}]: max rel error {rep.errors[worst]:.2e} ({worst}) "
          f"over {len(rep.errors)} tensors")
    bad = rep.failures(TOL[dtype])
    assert not bad, f"{len(bad)} of {len(rep.errors)} above {TOL[dtype]}: " + ", ".join(
        f"{k}={v:.2e}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:8])


def test_cases_cover_both_attention_algorithms():
    # 4 heads, no class token: Ulysses on sp 2 and 4, all-gather of K/V on sp 3 (heads not divisible)
    assert MODELS["vit-linear"][3] == MODELS["vit-upernet-ckpt"][3] == ("plain", 4)
    for sp, algo in ((2, "ulysses"), (4, "ulysses"), (3, "allgather")):
        assert attention_path(MODELS["vit-linear"][3], SimpleNamespace(sp=sp)) == algo


def test_layouts_are_uneven_and_aligned():
    for layouts, align, shape in ((L8, 8, (64, 96)), (L32, 32, (64, 128))):
        for grid, layout in layouts.items():
            assert layout.grid == grid and layout.shape == shape
            check_aligned(layout.rows, align)
            check_aligned(layout.cols, align)
            assert layout != TileLayout.even(*shape, grid, align)
    for name, (f, shape, layouts, _) in MODELS.items():
        torch.manual_seed(0)
        enc = f().encoder
        assert enc.align == (8 if layouts is L8 else 32), name


# --- registry, shapes -------------------------------------------------------------

def test_registry_names():
    expected = {"timm_vit", "hf_sam", "prithvi_vit", "timm_cnn", *PRITHVI_VARIANTS}
    assert expected <= set(ENCODERS)
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("no_such_encoder")


def test_feature_shapes_match_contract():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 96)
    encs = [
        build_encoder("timm_vit", model_name="vit_tiny_patch16_224", img_size=(64, 96), indices=2, depth=3),
        build_encoder("timm_vit", model_name="samvit_base_patch16", img_size=(64, 96), indices=[-1], depth=2,
                      embed_dim=32, num_heads=2, window_size=2, global_attn_indexes=(1,), neck_chans=16),
        build_encoder("hf_sam", img_size=(64, 96), variant=None, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, patch_size=8, window_size=4, global_attn_indexes=[1],
                      output_channels=16, indices=[0, 1], neck=False),
        build_encoder("timm_cnn", model_name="resnet10t", out_indices=(2, 3)),
    ]
    for enc in encs:
        with torch.no_grad():
            feats = enc(x)
        assert [f.shape[1] for f in feats] == enc.out_channels
        assert [(64 // s, 96 // s) for s in enc.strides] == [tuple(f.shape[2:]) for f in feats]
        assert all(enc.align % s == 0 for s in enc.strides)
    assert encs[0].strides == [16, 16] and encs[0].align == 16 and len(encs[0].model.blocks) == 3
    assert encs[1].align == 32 and len(encs[1].model.blocks) == 2
    assert encs[2].align == 32 and encs[2].out_channels == [32, 32] and isinstance(encs[2].sam.neck, nn.Identity)
    assert encs[3].strides == [8, 16] and encs[3].align == 16
    # Prithvi: one frame (4-D input), and two frames concatenated or averaged over time
    p = build_encoder("prithvi_vit", embed_dim=32, depth=2, num_heads=2, patch_size=16, indices=[0, 1])
    assert [tuple(f.shape) for f in p(torch.randn(2, 6, 64, 96))] == [(2, 32, 4, 6)] * 2
    for fusion, width in (("concat", 64), ("mean", 32)):
        p = build_encoder("prithvi_vit", embed_dim=32, depth=2, num_heads=2, patch_size=16, num_frames=2,
                          temporal_fusion=fusion)
        assert p.out_channels == [width]
        assert [tuple(f.shape) for f in p(torch.randn(2, 6, 2, 64, 96))] == [(2, width, 4, 6)]
    with pytest.raises(ValueError, match="multiple of the patch size"):
        build_encoder("timm_vit", model_name="vit_tiny_patch16_224", img_size=(60, 96))
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        build_encoder("timm_vit", model_name="resnet18", img_size=64)
    with pytest.raises(ValueError, match="out of range"):
        build_encoder("timm_vit", model_name="vit_tiny_patch16_224", img_size=64, depth=2, indices=[5])


def test_prithvi_presets_follow_terratorch_configs():
    dims = {"prithvi_eo_v2_300": (1024, 24, 16, 16), "prithvi_eo_v2_600": (1280, 32, 16, 14),
            "prithvi_eo_v2_100": (768, 12, 12, 16), "prithvi_eo_tiny": (256, 4, 4, 16)}
    for name, (d, depth, heads, p) in dims.items():
        assert PRITHVI_VARIANTS[name][:4] == (d, depth, heads, p)
    tiny = build_encoder("prithvi_eo_tiny")
    assert tiny.indices == [0, 1, 2, 3] and tiny.out_channels == [256] * 4 and tiny.align == 16
    assert PRITHVI_VARIANTS["prithvi_eo_v2_300_tl"][4] == ("time", "location")
    # a preset shrunk by kwargs (as a CPU try of a GPU config does) takes its default levels from that depth
    small = build_encoder("prithvi_eo_v2_300", embed_dim=32, depth=8, num_heads=2)
    assert small.indices == [1, 3, 5, 7] and small.out_channels == [32] * 4


def test_factory_refusal_names_the_config_section():
    """A factory's ValueError (a value it cannot take) is a ConfigError naming the file and section."""
    from rest_ds.models.config import ConfigError, build_segmentor

    enc = {"name": "prithvi_vit", "in_chans": 3, "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2,
                                                             "patch_size": 8, "indices": [0, 5]}}
    cfg = {"num_classes": 3, "encoder": enc, "decoder": {"name": "linear"}}
    with pytest.raises(ConfigError, match=r"^x\.yaml: model\.encoder: 'prithvi_vit': .*block index 5 out of range"):
        build_segmentor(cfg, "x.yaml")
    enc["kwargs"]["indices"] = [0, 1]
    cfg["neck"] = {"name": "simple_pyramid", "kwargs": {"scales": [4, 2, 1, 0.5], "in_index": None}}
    with pytest.raises(ConfigError, match=r"^x\.yaml: model\.neck: 'simple_pyramid': .*4 scales and 2 levels"):
        build_segmentor(cfg, "x.yaml")


# --- transformers SAM at another scene size --------------------------------------------------

def _sam_cfg(**kw):
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=16, window_size=4,
                global_attn_indexes=[1], output_channels=16, initializer_range=0.02, **kw)


def _sam_1024_state_dict():
    """A small 'released-style' SAM checkpoint: trained at 1024 (64 x 64 tokens), SamModel key layout."""
    from transformers import SamVisionConfig
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    torch.manual_seed(5)
    enc = SamVisionEncoder(SamVisionConfig(image_size=1024, **_sam_cfg()))
    sd = {f"vision_encoder.{k}": _randomize_t(v) for k, v in enc.state_dict().items()}
    sd["prompt_encoder.shared_embedding.positional_embedding"] = torch.randn(2, 8)  # other SamModel parts: ignored
    return sd


def _randomize_t(v):
    return torch.randn_like(v) * 0.1 if v.is_floating_point() else v


def test_hf_sam_loads_1024_checkpoint_at_another_size():
    sd = _sam_1024_state_dict()
    enc = build_encoder("hf_sam", img_size=(192, 256), variant=None, checkpoint=sd, indices=[0], **_sam_cfg())
    sam = enc.sam
    # absolute table: bicubic to the scene's 12 x 16 token grid
    pos = sd["vision_encoder.pos_embed"]
    want = F.interpolate(pos.permute(0, 3, 1, 2), size=(12, 16), mode="bicubic", align_corners=False)
    assert torch.allclose(sam.pos_embed, want.permute(0, 2, 3, 1), atol=0, rtol=0)
    # global block: rel-pos tables resized to 2n-1 rows; windowed block: unchanged
    g, w = sam.layers[1].attn, sam.layers[0].attn
    assert g.rel_pos_h.shape == (23, 16) and g.rel_pos_w.shape == (31, 16)
    assert torch.equal(w.rel_pos_h, sd["vision_encoder.layers.0.attn.rel_pos_h"])
    assert torch.equal(sam.layers[0].mlp.lin1.weight, sd["vision_encoder.layers.0.mlp.lin1.weight"])
    x = torch.randn(1, 3, 192, 256)
    with torch.no_grad():
        feats = enc(x)
    assert [tuple(f.shape) for f in feats] == [(1, 32, 12, 16), (1, 16, 12, 16)]
    # the load-time resize equals SAM's own forward-time interpolation of the 1024 tables (square scene)
    enc2 = build_encoder("hf_sam", img_size=192, variant=None, checkpoint=sd, **_sam_cfg())
    enc3 = build_encoder("hf_sam", img_size=192, variant=None, **_sam_cfg())
    own = {k[len("vision_encoder."):]: v for k, v in sd.items() if k.startswith("vision_encoder.")}
    own["pos_embed"] = enc2.sam.pos_embed.detach().clone()
    for k in ("layers.1.attn.rel_pos_h", "layers.1.attn.rel_pos_w"):
        own.pop(k)
    enc3.sam.load_state_dict(own, strict=False)
    a3 = enc3.sam.layers[1].attn
    a3.rel_pos_h = nn.Parameter(sd["vision_encoder.layers.1.attn.rel_pos_h"].clone())  # 127 rows, as trained
    a3.rel_pos_w = nn.Parameter(sd["vision_encoder.layers.1.attn.rel_pos_w"].clone())
    x = torch.randn(1, 3, 192, 192)
    with torch.no_grad():
        torch.testing.assert_close(enc2(x)[0], enc3(x)[0], rtol=1e-5, atol=1e-6)


def test_hf_sam_checkpoint_errors():
    sd = _sam_1024_state_dict()
    sd.pop("vision_encoder.neck.conv1.weight")
    with pytest.raises(ValueError, match=r"missing: neck\.conv1\.weight"):
        build_encoder("hf_sam", img_size=128, variant=None, checkpoint=sd, **_sam_cfg())
    with pytest.raises(ValueError, match="original segment-anything checkpoint"):
        build_encoder("hf_sam", img_size=128, variant=None, checkpoint={"image_encoder.pos_embed": torch.zeros(1)},
                      **_sam_cfg())
    with pytest.raises(ValueError, match="unknown variant"):
        build_encoder("hf_sam", img_size=128, variant="vit_x")


# --- timm ViT checkpoints at another scene size ----------------------------------------------------

def test_timm_vit_checkpoint_resampled_to_scene():
    import timm
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(1)
    src = timm.create_model("vit_tiny_patch16_224", embed_dim=64, depth=2, num_heads=2)  # 224: 14 x 14 + cls
    sd = {k: _randomize_t(v) for k, v in src.state_dict().items()}
    mae = {"model": {**sd, "mask_token": torch.zeros(1, 1, 64), "decoder_embed.weight": torch.zeros(8, 64)}}
    enc = build_encoder("timm_vit", model_name="vit_tiny_patch16_224", img_size=(64, 96), embed_dim=64, depth=2,
                        num_heads=2, checkpoint=mae, indices=[0, 1])
    want = resample_abs_pos_embed(sd["pos_embed"], new_size=(4, 6), num_prefix_tokens=1)
    assert torch.equal(enc.model.pos_embed, want)
    assert torch.equal(enc.model.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    # RGB checkpoint into a 13-band Sentinel-2 model (bands by name)
    s2 = build_encoder("timm_vit", model_name="vit_tiny_patch16_224", img_size=64, embed_dim=64, depth=2,
                       num_heads=2, checkpoint=sd, pretrained_bands=B.RGB, bands=B.SENTINEL2)
    w, w0 = s2.model.patch_embed.proj.weight, sd["patch_embed.proj.weight"]
    assert w.shape[1] == 13
    for name, src_i in (("B04", 0), ("B03", 1), ("B02", 2)):
        assert torch.equal(w[:, B.SENTINEL2.index(name)], w0[:, src_i])
    assert torch.allclose(w[:, 0], w0.mean(1) * 3 / 13)
    bad = dict(sd)
    bad["blocks.0.attn.qkv.weight"] = bad["blocks.0.attn.qkv.weight"][:10]
    with pytest.raises(ValueError, match="shape mismatch: blocks.0.attn.qkv.weight"):
        build_encoder("timm_vit", model_name="vit_tiny_patch16_224", img_size=64, embed_dim=64, depth=2,
                      num_heads=2, checkpoint=bad)


def test_timm_samvit_checkpoint_resampled_like_forward_time_interpolation():
    import timm

    kw = dict(embed_dim=32, depth=2, num_heads=2, window_size=4, global_attn_indexes=(1,), neck_chans=16)
    torch.manual_seed(2)
    src = timm.create_model("samvit_base_patch16", img_size=1024, num_classes=0, **kw)
    sd = {k: _randomize_t(v) for k, v in src.state_dict().items()}
    enc = build_encoder("timm_vit", model_name="samvit_base_patch16", img_size=128, checkpoint=sd, norm=True,
                        **kw)
    blk = enc.model.blocks[1].attn
    assert blk.rel_pos_h.shape == (15, 16) and enc.model.pos_embed.shape == (1, 8, 8, 32)
    # the same model with the 1024 relative tables kept: timm's get_rel_pos interpolates them at forward time
    ref = build_encoder("timm_vit", model_name="samvit_base_patch16", img_size=128, norm=True, **kw)
    ref.load_state_dict(enc.state_dict())
    ref.model.blocks[1].attn.rel_pos_h = nn.Parameter(sd["blocks.1.attn.rel_pos_h"].clone())
    ref.model.blocks[1].attn.rel_pos_w = nn.Parameter(sd["blocks.1.attn.rel_pos_w"].clone())
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(enc(x)[-1], ref(x)[-1], rtol=1e-5, atol=1e-6)


def test_timm_cnn_checkpoint_and_bands():
    import timm

    torch.manual_seed(3)
    sd = {k: _randomize_t(v) for k, v in timm.create_model("resnet10t").state_dict().items()}  # with classifier
    enc = build_encoder("timm_cnn", model_name="resnet10t", checkpoint=sd, bands=["red", "green", "blue", "nir"],
                        pretrained_bands=B.RGB)
    w, w0 = enc.model.conv1[0].weight, sd["conv1.0.weight"]
    assert torch.equal(w[:, :3], w0) and torch.allclose(w[:, 3], w0.mean(1) * 3 / 4)
    assert torch.equal(enc.model.layer4[0].conv1.weight, sd["layer4.0.conv1.weight"])
    assert enc.strides == [2, 4, 8, 16, 32] and enc.align == 32


# --- Prithvi-EO-2.0 checkpoint layout ------------------------------------------------

def _prithvi_mae_state_dict(D=64, depth=2, heads=4, p=8, bands=6, frames=1, grid=4, tl=True, dec=32):
    """Key names and shapes of a released Prithvi-EO-2.0 MAE checkpoint (``Prithvi_EO_V2_300M[_TL].pt``),
    written out by hand from TerraTorch's ``PrithviMAE`` (encoder ``PrithviViT`` + ``MAEDecoder``), random
    values, small sizes."""
    g = torch.Generator().manual_seed(11)

    def r(*shape):
        return torch.randn(shape, generator=g) * 0.1

    n = frames * grid * grid
    sd = {"encoder.patch_embed.proj.weight": r(D, bands, 1, p, p), "encoder.patch_embed.proj.bias": r(D),
          "encoder.cls_token": r(1, 1, D), "encoder.pos_embed": sincos_3d(D, (frames, grid, grid), True)[None].float(),
          "encoder.norm.weight": 1 + r(D), "encoder.norm.bias": r(D)}
    if tl:
        sd["encoder.temporal_embed_enc.scale"] = torch.tensor([0.3])
        sd["encoder.location_embed_enc.scale"] = torch.tensor([0.2])
    for prefix, d, nblocks in (("encoder.blocks", D, depth), ("decoder.decoder_blocks", dec, 1)):
        for i in range(nblocks):
            b = f"{prefix}.{i}."
            sd.update({b + "norm1.weight": 1 + r(d), b + "norm1.bias": r(d), b + "attn.qkv.weight": r(3 * d, d),
                       b + "attn.qkv.bias": r(3 * d), b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
                       b + "norm2.weight": 1 + r(d), b + "norm2.bias": r(d), b + "mlp.fc1.weight": r(4 * d, d),
                       b + "mlp.fc1.bias": r(4 * d), b + "mlp.fc2.weight": r(d, 4 * d), b + "mlp.fc2.bias": r(d)})
    sd.update({"decoder.decoder_embed.weight": r(dec, D), "decoder.decoder_embed.bias": r(dec),
               "decoder.mask_token": r(1, 1, dec), "decoder.decoder_pos_embed": r(1, n + 1, dec),
               "decoder.decoder_norm.weight": r(dec), "decoder.decoder_norm.bias": r(dec),
               "decoder.decoder_pred.weight": r(p * p * bands, dec), "decoder.decoder_pred.bias": r(p * p * bands)})
    if tl:
        sd["decoder.temporal_embed_dec.scale"] = torch.tensor([0.5])
        sd["decoder.location_embed_dec.scale"] = torch.tensor([0.5])
    return sd


def _terratorch_sincos_3d(embed_dim, grid_size):
    """TerraTorch's get_3d_sincos_pos_embed (numpy), re-derived here to pin the channel and token order."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(float), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    t, h, w = grid_size
    we, he, te = embed_dim // 16 * 6, embed_dim // 16 * 6, embed_dim // 16 * 4
    wp = np.tile(one(we, np.arange(w)), (t * h, 1))
    hp = np.tile(np.repeat(one(he, np.arange(h)), w, axis=0), (t, 1))
    tp = np.repeat(one(te, np.arange(t)), h * w, axis=0)
    return np.concatenate([np.zeros([1, embed_dim]), np.concatenate((wp, hp, tp), axis=1)], axis=0)


def test_prithvi_sincos_matches_terratorch_formula():
    for dim, grid in ((64, (1, 4, 6)), (1024, (3, 14, 14)), (96, (2, 5, 3))):
        ours = sincos_3d(dim, grid, cls_token=True).numpy()
        np.testing.assert_allclose(ours, _terratorch_sincos_3d(dim, grid), rtol=0, atol=1e-12)


def test_prithvi_loads_released_layout_strictly():
    sd = _prithvi_mae_state_dict()
    enc = build_encoder("prithvi_vit", embed_dim=64, depth=2, num_heads=4, patch_size=8, indices=[0, 1],
                        coords_encoding=("time", "location"), coords_scale_learn=True, checkpoint=sd)
    # every encoder key but the fixed position table was loaded, under the same name
    expected = {k[len("encoder."):] for k in sd if k.startswith("encoder.") and k != "encoder.pos_embed"}
    own = enc.state_dict()
    assert set(own) == expected
    for k in expected:
        assert torch.equal(own[k], sd["encoder." + k]), k
    assert isinstance(enc.temporal_embed_enc.scale, nn.Parameter)
    # forward = TerraTorch's computation: tokens + the whole sin-cos table + time + location, class token first
    x = torch.randn(2, 6, 32, 48)
    tc = torch.tensor([[[2020.0, 120.0]], [[2021.0, 300.0]]])
    lc = torch.tensor([[46.5, 6.6], [-33.9, 18.4]])
    with torch.no_grad():
        feats = enc(x, tc, lc)
        t = enc.patch_embed.proj(x[:, :, None]).flatten(2).transpose(1, 2)
        t = t + torch.from_numpy(_terratorch_sincos_3d(64, (1, 4, 6))[1:]).float()
        t = t + enc.temporal_embed_enc(tc) + enc.location_embed_enc(lc)[:, None]
        t = torch.cat([enc.cls_token.expand(2, -1, -1), t], 1)
        t0 = enc.blocks[0](t)
        t1 = enc.norm(enc.blocks[1](t0))
    for f, ref in zip(feats, (t0, t1)):
        torch.testing.assert_close(f, ref[:, 1:].transpose(1, 2).reshape(2, 64, 4, 6), rtol=1e-5, atol=1e-6)
    # a TL checkpoint into a model without coordinate encodings (TerraTorch drops those keys), and the
    # encoder-only (v1) layout without the 'encoder.' prefix
    plain = build_encoder("prithvi_vit", embed_dim=64, depth=2, num_heads=4, patch_size=8, checkpoint=sd)
    assert not hasattr(plain, "temporal_embed_enc")
    v1 = {k[len("encoder."):]: v for k, v in _prithvi_mae_state_dict(tl=False).items() if k.startswith("encoder.")}
    v1.update({"decoder_embed.weight": torch.zeros(32, 64), "mask_token": torch.zeros(1, 1, 32)})
    build_encoder("prithvi_vit", embed_dim=64, depth=2, num_heads=4, patch_size=8, checkpoint=v1)


def test_prithvi_checkpoint_errors_and_bands():
    sd = _prithvi_mae_state_dict(tl=False)
    kw = dict(embed_dim=64, depth=2, num_heads=4, patch_size=8)
    with pytest.raises(ValueError, match="missing: temporal_embed_enc.scale"):
        build_encoder("prithvi_vit", coords_encoding=("time",), checkpoint=sd, **kw)
    broken = dict(sd)
    broken.pop("encoder.blocks.1.mlp.fc2.bias")
    with pytest.raises(ValueError, match=r"missing: blocks\.1\.mlp\.fc2\.bias"):
        build_encoder("prithvi_vit", checkpoint=broken, **kw)
    with pytest.raises(ValueError, match="unexpected: blocks.2.norm1.weight"):
        build_encoder("prithvi_vit", checkpoint=_prithvi_mae_state_dict(depth=3, tl=False), **kw)
    with pytest.raises(ValueError, match="shape mismatch: patch_embed.proj.weight"):
        build_encoder("prithvi_vit", checkpoint=_prithvi_mae_state_dict(p=16, tl=False), **kw)
    # HLS 6 bands -> Sentinel-2 subset in another order plus a red-edge band without HLS counterpart
    s2 = ["B8A", "B02", "B03", "B04", "B11", "B12", "B05"]
    enc = build_encoder("prithvi_vit", checkpoint=sd, bands=s2, **kw)
    w, w0 = enc.patch_embed.proj.weight, sd["encoder.patch_embed.proj.weight"]
    assert w.shape == (64, 7, 1, 8, 8)
    for i, src in enumerate([3, 0, 1, 2, 4, 5]):  # HLS order: BLUE GREEN RED NIR_NARROW SWIR_1 SWIR_2
        assert torch.equal(w[:, i], w0[:, src])
    torch.testing.assert_close(w[:, 6], w0.mean(1) * 6 / 7)


# --- band adaptation rules ---------------------------------------------------------------

def test_band_rules_values():
    torch.manual_seed(4)
    w = torch.randn(5, 3, 4, 4)
    # name: RGB -> Sentinel-2, matched bands copied exactly, the rest mean * k / c
    a = B.adapt_input_weight(w, B.RGB, B.SENTINEL2)
    assert a.shape == (5, 13, 4, 4)
    assert torch.equal(a[:, 3], w[:, 0]) and torch.equal(a[:, 2], w[:, 1]) and torch.equal(a[:, 1], w[:, 2])
    for i in set(range(13)) - {1, 2, 3}:
        torch.testing.assert_close(a[:, i], w.mean(1) * 3 / 13)
    # mean: the sum over input channels is preserved (constant input -> same activation)
    for c in (1, 2, 7, 13):
        m = B.adapt_input_weight(w, in_chans=c, rule="mean")
        torch.testing.assert_close(m.sum(1), w.sum(1))
        # in float64: the property is exact, while fp32 convs over 3 vs c channels round differently
        # (3e-6 relative on this machine's kernels, above assert_close's fp32 default)
        x = torch.full((1, c, 4, 4), 0.7, dtype=torch.float64)
        torch.testing.assert_close(F.conv2d(x, m.double()), F.conv2d(torch.full((1, 3, 4, 4), 0.7).double(), w.double()))
    # tile: timm's adapt_input_conv
    from timm.models._manipulate import adapt_input_conv

    for c in (1, 5, 8):
        torch.testing.assert_close(B.adapt_input_weight(w, in_chans=c), adapt_input_conv(c, w))
    # same bands, same order: unchanged; a reorder is a permutation
    assert B.adapt_input_weight(w, B.RGB, ["R", "G", "B"]) is w
    assert torch.equal(B.adapt_input_weight(w, B.RGB, ["blue", "green", "red"]), w.flip(1))


def test_band_rule_spectral_interpolates_along_wavelength():
    torch.manual_seed(5)
    w = torch.randn(4, 6, 1, 2, 2)  # a Conv3d (Prithvi) weight, HLS bands
    lam = [B.wavelength(b) for b in B.HLS]
    assert lam == sorted(lam) and lam[2] == 664.6
    dst = [400.0, lam[0], (lam[1] + lam[2]) / 2, lam[1] + 0.25 * (lam[2] - lam[1]), lam[5], 2400.0]
    a = B.adapt_input_weight(w, B.HLS, dst)  # wavelengths -> 'spectral' automatically
    s = 6 / len(dst)
    torch.testing.assert_close(a[:, 0], w[:, 0] * s)                      # below the range: nearest (blue)
    torch.testing.assert_close(a[:, 1], w[:, 0] * s)                      # on a pretrained band
    torch.testing.assert_close(a[:, 2], (w[:, 1] + w[:, 2]) / 2 * s)      # halfway green-red
    torch.testing.assert_close(a[:, 3], (0.75 * w[:, 1] + 0.25 * w[:, 2]) * s)
    torch.testing.assert_close(a[:, 4], w[:, 5] * s)
    torch.testing.assert_close(a[:, 5], w[:, 5] * s)                      # above: nearest (SWIR 2)
    # a 200-band hyperspectral sensor: each row of the mapping sums to k / c, filters linear in wavelength
    # are reproduced exactly inside the pretrained range
    hyper = list(np.linspace(400, 2500, 200))
    M = B.band_mapping(6, 200, B.HLS, hyper)
    torch.testing.assert_close(M.sum(1), torch.full((200,), 6 / 200, dtype=torch.float64))
    lin = torch.tensor(lam, dtype=torch.float64)
    inside = [i for i, l in enumerate(hyper) if lam[0] <= l <= lam[-1]]
    torch.testing.assert_close((M @ lin)[inside] * 200 / 6, torch.tensor(hyper, dtype=torch.float64)[inside])


def test_band_rule_errors_and_names():
    w = torch.randn(2, 3, 1, 1)
    assert B.canonical("B8A") == B.canonical("nir_narrow") == "nir_narrow"
    assert B.canonical("B04") == B.canonical("RED") == B.canonical("r") == "red"
    assert B.wavelength("B11") == B.wavelength("SWIR_1") and B.wavelength("thermal") is None
    with pytest.raises(ValueError, match="2 pretrained band names"):
        B.adapt_input_weight(w, ["red", "green"], B.SENTINEL2)
    with pytest.raises(ValueError, match="needs a centre wavelength"):
        B.adapt_input_weight(w, B.RGB, ["red", "thermal"], rule="spectral")
    with pytest.raises(ValueError, match="band rule must be one of"):
        B.adapt_input_weight(w, B.RGB, ["red"], rule="nearest")
    with pytest.raises(ValueError, match="name one band twice"):
        B.adapt_input_weight(w, ["red", "B04", "blue"], ["red"])
    # unknown names match only themselves
    a = B.adapt_input_weight(w, ["red", "x1", "blue"], ["X1", "thermal"])
    assert torch.equal(a[:, 0], w[:, 1]) and torch.allclose(a[:, 1], w.mean(1) * 3 / 2)
    assert math.isclose(B.band_mapping(3, 4, rule="tile").sum().item(), 3.0)
