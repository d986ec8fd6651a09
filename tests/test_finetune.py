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

from .harness import run_grid
from .test_models_encoders import Seg, _randomize, scene

P = functools.partial


def vit_enc(cls=False):
    from rest_ds.models.registry import build_encoder

    enc = build_encoder("timm_vit", model_name="vit_tiny_patch16_224", img_size=(64, 96), indices=[0, 1], depth=2,
                        embed_dim=64, num_heads=4, patch_size=8, class_token=cls)
    return Seg(_randomize(enc), "linear")


def samvit_enc():
    from rest_ds.models.registry import build_encoder

    enc = build_encoder("timm_vit", model_name="samvit_base_patch16", img_size=(64, 128), indices=[0, 1], depth=2,
                        embed_dim=64, num_heads=2, patch_size=8, window_size=4, global_attn_indexes=(1,),
                        use_rel_pos=True, neck_chans=32, norm=True)
    return Seg(_randomize(enc), "linear")


def hfsam_enc():
    from rest_ds.models.registry import build_encoder

    enc = build_encoder("hf_sam", img_size=(64, 128), variant=None, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, patch_size=8, window_size=4, global_attn_indexes=[1],
                        output_channels=32, indices=[0])
    return Seg(_randomize(enc), "linear")


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


@pytest.mark.timeout(900)
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
