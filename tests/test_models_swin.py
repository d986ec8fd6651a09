"""Swin under SPIM: the sharded ``torch.roll`` and timm / transformers Swin encoders, exact.

Multi-process part, one spawn per grid (tests/harness.py): on uneven tiles of a
1x2 grid (128 x 320 scene, columns 0:256 | 256:320) and a 3x1 grid (320 x 96,
rows 0:128 | 128:256 | 256:320), both aligned to the test Swins' 128 (patch 4 x
window 4 x 2**3), and a 2x2 grid (192 x 320, rows 0:128 | 128:192, columns
0:256 | 256:320: both axes split, rolls and timm v1 only):

* ``torch.roll`` / ``Tensor.roll`` on NCHW and channels-last maps: shifts of
  both signs, over one or both grid dims, larger than a tile and larger than
  the scene, together with a roll of a non-sharded dim; the wrap-around
  crosses the scene's border (the last tile sends to the first);
* timm ``swin_tiny_patch4_window7_224`` (v1), ``swinv2_tiny_window8_256`` and
  transformers' ``SwinBackbone`` at tiny widths (24 wide, depths 2-1-2-1,
  windows of 4, so stage 1 and stage 3 have shifted blocks) feeding the
  registered UPerNet or linear decoder. The deepest maps (4 x 10 and 10 x 3
  tokens) are not window multiples: the models pad at the scene's
  bottom/right. swinv2 (and transformers' Swin on 1x2) run with activation
  checkpointing (non-reentrant, replayed by SPIM). Output, input gradient,
  every parameter gradient and every parameter after one SGD step, train
  mode, float64 at 1e-10; timm v1 also in float32 at 1e-5. transformers' backbone normalises each output stage, so it
  feeds the linear head (no norm): under UPerNet's BatchNorm after a 1x1 conv
  those LayerNorm biases have an exactly zero gradient.

transformers' Swin has separate q/k/v projections: the key bias's gradient is
exactly zero in exact arithmetic (softmax is invariant to adding q.b_k to
every score of a query), so both sides' values are rounding noise and have no
meaningful relative error; those biases (one per block) are left out of the
comparison, and only they.
"""
from __future__ import annotations

import functools
import re

import pytest
import timm
import torch
from torch import nn

import rest_ds.models.encoders  # noqa: F401  (registers the encoders)
from rest_ds.models.encoders.bands import HLS, adapt_input_weight
from rest_ds.models.encoders.swin import swin_align
from rest_ds.models.registry import build_encoder
from rest_ds.spim import SpatialMesh, TileLayout, check_aligned
from rest_ds.spim.verify import compare_sharded

from .harness import TOL, grid_id, run_grid, selected
from .nets import Seg, scene
LAYOUTS = {(1, 2): TileLayout((0, 128), (0, 256, 320)), (3, 1): TileLayout((0, 128, 256, 320), (0, 96)),
           (2, 2): TileLayout((0, 128, 192), (0, 256, 320))}
GRIDS = list(LAYOUTS)
FAST_GRID = (2, 2)  # the fast tier: the roll cases on 2x2 (corner strips travel through two neighbours)
P = functools.partial
TINY = dict(embed_dim=24, depths=(2, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=4)


class RollNet(nn.Module):
    """1x1 conv -> roll(s) (optionally channels-last) -> 1x1 conv: the convs give
    the roll parameter gradients that depend on where every pixel went."""

    def __init__(self, rolls, channels_last=False, method=False):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        self.rolls, self.channels_last, self.method = rolls, channels_last, method

    def forward(self, x):
        y = self.a(x)
        if self.channels_last:
            y = y.permute(0, 2, 3, 1)
        for shifts, dims in self.rolls:
            y = y.roll(shifts, dims) if self.method else torch.roll(y, shifts=shifts, dims=dims)
        if self.channels_last:
            y = y.permute(0, 3, 1, 2)
        return self.b(torch.tanh(y))


def timm_swin(name="swin_tiny_patch4_window7_224", head="upernet", ckpt=False):
    return Seg(build_encoder("timm_swin", model_name=name, grad_checkpointing=ckpt, **TINY), head)


def hf_swin(head="linear", ckpt=False):
    kw = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
    return Seg(build_encoder("hf_swin", grad_checkpointing=ckpt, **kw), head)


def _double(factory):
    return factory().double()


# rolls: ((shifts, dims), ...) on NCHW (grid dims 2, 3) or NHWC (1, 2)
ROLLS = {
    "roll-nchw-both": (((-2, 3), (2, 3)),),
    "roll-nchw-big": ((130, 2), (-1, 1), (-150, 3)),        # past a tile, one by one (and a channel roll)
    "roll-nhwc-swin": (((-2, -2), (1, 2)), ((2, 2), (1, 2))),  # Swin's shift and shift back
    "roll-nhwc-wrap": (((-200, 97), (2, 1)),),              # larger than a tile, beyond the scene's half
    "roll-nhwc-huge": (((333, -350), (1, 2)),),             # more than the scene
}


def grid_cases(grid) -> dict:
    """case -> (factory, dtype)"""
    out = {}
    for name, rolls in ROLLS.items():
        nhwc = "nhwc" in name
        out[name] = (P(_double, P(RollNet, rolls, nhwc, name.endswith("big"))), torch.float64)  # big: Tensor.roll
    out["timm_swin-upernet-fp64"] = (P(_double, timm_swin), torch.float64)
    if grid == (2, 2):  # both grid axes split: the rolls' corner strips travel through two neighbours
        return out
    out["timm_swinv2-linear-ckpt-fp64"] = (P(_double, P(timm_swin, "swinv2_tiny_window8_256", "linear", True)),
                                           torch.float64)
    ckpt = grid == (1, 2)
    out[f"hf_swin-linear{'-ckpt' * ckpt}-fp64"] = (P(_double, P(hf_swin, "linear", ckpt)), torch.float64)
    if grid == (1, 2):
        out["timm_swin-upernet-fp32"] = (timm_swin, torch.float32)
    return out


def _run_grid(grid, names):
    """The cases ``names`` of ``grid`` (those the run selected), in one spawn."""
    mesh = SpatialMesh.build(grid=grid)
    layout = LAYOUTS[grid]
    return {name: compare_sharded(factory, scene((2, 3, *layout.shape), dtype), mesh, layout, train=True, step=True,
                                  seed=3)
            for name, (factory, dtype) in grid_cases(grid).items() if name in names}


_ZERO_GRAD = re.compile(r"\.attention\.k_proj\.bias$")  # transformers' Swin: exactly zero gradient (see above)


@pytest.mark.parametrize("grid,case", [
    pytest.param(g, c, id=f"{grid_id(g)}-{c}", marks=() if g == FAST_GRID and c.startswith("roll") else pytest.mark.slow)
    for g in GRIDS for c in grid_cases(g)])
def test_swin_and_roll_exact_under_spim(request, grid, case):
    factory, dtype = grid_cases(grid)[case]
    rep = run_grid(_run_grid, grid, selected(request, "case", grid=grid))[case]
    assert rep.refused is None, rep.refused
    torch.manual_seed(0)
    names = {n for n, _ in factory().named_parameters()}
    missing = ({f"grad {n}" for n in names} | {f"param after step {n}" for n in names}) - set(rep.errors)
    assert not missing, sorted(missing)[:8]
    assert {"output[0]", "input grad"} <= set(rep.errors)
    # the rolls crossed tiles (both grids split the rolled axes)
    assert rep.comm_bytes.get("roll", 0) > 0, rep.comm_bytes
    errors = rep.errors
    if case.startswith("hf_swin"):
        skipped = {k for k in errors if _ZERO_GRAD.search(k)}
        assert len(skipped) == 2 * sum(TINY["depths"]), sorted(skipped)  # grad and param after step, per block
        errors = {k: v for k, v in errors.items() if k not in skipped}
    worst = max(errors, key=errors.get)
    print(f"{grid[0]}x{grid[1]} {case}: max rel error {errors[worst]:.2e} ({worst}) over {len(errors)} tensors, "
          f"roll bytes {rep.comm_bytes['roll']}")
    bad = {k: v for k, v in errors.items() if not v <= TOL[dtype]}
    assert not bad, f"{len(bad)} of {len(errors)} above {TOL[dtype]}: " + ", ".join(
        f"{k}={v:.2e}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:8])


def test_swin_align_and_encoder_contract():
    assert swin_align(4, [(7, 7)] * 4) == 224  # Swin-T: patch 4 x window 7 x 2**3
    assert swin_align(4, [(8, 8)] * 4) == 256
    assert swin_align(4, [(7, 7), (7, 7), (7, 7), (6, 6)]) == 1344  # lcm(28, 56, 112, 192)
    x = torch.randn(1, 3, 96, 160)
    torch.manual_seed(0)
    for enc in (build_encoder("timm_swin", **TINY),
                build_encoder("timm_swin", model_name="swinv2_tiny_window8_256", out_indices=(1, 3), **TINY),
                build_encoder("hf_swin", out_indices=[0, 2], embed_dim=24, depths=[2, 1, 2, 1],
                              num_heads=[1, 2, 2, 4], window_size=4)):
        with torch.no_grad():
            feats = enc(x)
        assert [f.shape[1] for f in feats] == enc.out_channels
        assert [(-(-96 // s), -(-160 // s)) for s in enc.strides] == [tuple(f.shape[2:]) for f in feats]
        assert enc.align == 128
    swin_t = build_encoder("timm_swin", embed_dim=24, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4))
    assert swin_t.align == 224
    # always_partition: Swin-T's last stage (7 x 7 at timm's 224) keeps its window and shift, as in mmseg
    last = swin_t.model.layers_3.blocks[1]
    assert last.window_size == (7, 7) and last.shift_size == (3, 3)
    for layout in LAYOUTS.values():
        check_aligned(layout.rows, 128)
        check_aligned(layout.cols, 128)
        sizes = [b - a for a, b in zip(layout.rows[:-1], layout.rows[1:])] + \
            [b - a for a, b in zip(layout.cols[:-1], layout.cols[1:])]
        assert len(set(sizes)) > 1  # uneven tiles
    with pytest.raises(ValueError, match="not a timm swin"):
        build_encoder("timm_swin", model_name="resnet18")
    with pytest.raises(ValueError, match="out_indices"):
        build_encoder("hf_swin", out_indices=[4])


def test_swin_checkpoints_load_with_band_adaptation():
    # a 3-band checkpoint of the full model into 6-band encoders: everything but the patch embedding is
    # copied unchanged, the patch embedding is adapted by band name (bands.py)
    rgb = ["RED", "GREEN", "BLUE"]
    torch.manual_seed(1)
    for name in ("swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"):
        sd = timm.create_model(name, pretrained=False, **TINY).state_dict()
        enc = build_encoder("timm_swin", model_name=name, checkpoint=sd, bands=list(HLS), pretrained_bands=rgb, **TINY)
        own = enc.model.state_dict()
        assert torch.equal(own["patch_embed.proj.weight"],
                           adapt_input_weight(sd["patch_embed.proj.weight"], rgb, list(HLS), 6, "auto"))
        rest = [k for k in own if k != "patch_embed.proj.weight"]
        assert rest and all(torch.equal(own[k], sd[k.replace("layers_", "layers.")]) for k in rest), name
    kw = dict(embed_dim=24, depths=[2, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=4)
    src = build_encoder("hf_swin", **kw).swin.state_dict()
    src["swin.layernorm.weight"] = torch.ones(192)  # a SwinBackbone checkpoint carries the unused final norm
    dst = build_encoder("hf_swin", checkpoint=src, bands=list(HLS), pretrained_bands=rgb, **kw).swin.state_dict()
    key = "swin.embeddings.patch_embeddings.projection.weight"
    assert dst[key].shape[1] == 6 and torch.equal(dst[key], adapt_input_weight(src[key], rgb, list(HLS), 6, "auto"))
    assert all(torch.equal(dst[k], src[k]) for k in dst if k != key)
