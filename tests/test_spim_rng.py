"""Randomness under SPIM (rng.py): the shared stream replays DropPath under
activation checkpointing, and element-wise random ops (dropout and its
channel/alpha variants, rand_like, randn_like, bernoulli_, uniform_, normal_,
rrelu) are a function of the seed and each element's global index, so a model
with them gives the same outputs and gradients on every grid as the plain model
in one process (docs/design.md section 3)."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rest_ds.spim import SpatialMesh, SPIMUnsupportedError, TileLayout, gather, shard
from rest_ds.spim import rng
from rest_ds.spim.rng import SharedRNG
from rest_ds.spim.verify import compare_sharded, rel_error

from .harness import check_report, grid_params, offset_scene, run_grid


def test_checkpoint_replays_droppath_under_shared_rng():
    torch.manual_seed(0)
    a = timm.create_model("vit_tiny_patch16_224", img_size=(32, 32), depth=3, drop_path_rate=0.5, num_classes=0,
                          global_pool="").double().train()
    b = copy.deepcopy(a)
    b.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    outs = []
    for m in (a, b):
        with SharedRNG(7).active():
            out = m(x)
        out.pow(2).sum().backward()
        outs.append(out)
    assert rel_error(outs[1], outs[0]) == 0.0
    assert max(rel_error(p.grad, q.grad) for p, q in zip(b.parameters(), a.parameters())) < 1e-12


def test_counter_generator_matches_splitmix64_and_has_sane_statistics():
    idx = torch.tensor([0, 1, 2, 2 ** 32 + 5, 2 ** 40, 2 ** 62 - 1])
    for seed in (0, 12345, 2 ** 62 - 1):
        want = [rng._s64(rng.mix64(rng.mix64(seed) + (int(i) + 1) * rng._GOLDEN)) for i in idx]
        assert rng.random_bits(seed, idx).tolist() == want
    torch.manual_seed(0)
    with rng.grid_invariant():
        ones = torch.ones(100, 1000)
        kept = F.dropout(ones, 0.3) != 0
        assert abs(kept.float().mean().item() - 0.7) < 0.01
        u = torch.rand_like(ones)
        assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean().item() - 0.5) < 0.01
        z = torch.randn_like(ones.double())
        assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
        assert abs(torch.empty(100000).bernoulli_(0.2).mean().item() - 0.2) < 0.01
        # channel masks: one draw per (sample, channel), constant over the map
        m = F.dropout2d(torch.ones(8, 64, 3, 3), 0.5)
        assert (m.amax((2, 3)) == m.amin((2, 3))).all() and 0.3 < (m[:, :, 0, 0] == 0).float().mean() < 0.7
        # a new draw each call: the seed comes from the (advancing) default stream
        assert not torch.equal(F.dropout(ones, 0.5), F.dropout(ones, 0.5))


class _FakeMesh:
    """Just the geometry a Spec reads (grid, this rank's cell): no process group."""

    def __init__(self, grid, coord):
        self.grid, self.coord, self.sp = grid, coord, grid[0] * grid[1]
        self.sp_index = coord[0] * grid[1] + coord[1]


def test_element_index_is_the_global_index_in_every_layout():
    # Every rank's tile, in grid layout (channels-last, sharded dims 1, 2) and in
    # token layout with prefix tokens, a lead factor (time steps) and a trail
    # factor (heads), on an uneven 2x3 grid: element_index must be the element's
    # row-major index in the whole tensor, which is what the plain run uses.
    from rest_ds.spim.tensor import Spec, wrap

    B, H, W, C, lead, trail, P = 2, 5, 7, 3, 2, 3, 2
    rows, cols = (0, 3, 5), (0, 2, 5, 7)
    grid_full = torch.arange(B * H * W * C).view(B, H, W, C)
    tok = torch.arange(B * (P + lead * H * W * trail) * C).view(B, P + lead * H * W * trail, C)
    tok_grid = tok[:, P:].view(B, lead, H, W, trail, C)
    for r in range(2):
        for c in range(3):
            mesh = _FakeMesh((2, 3), (r, c))
            (r0, r1), (c0, c1) = rows[r:r + 2], cols[c:c + 2]
            g = wrap(grid_full[:, r0:r1, c0:c1].clone(), Spec(mesh, (1, 2), rows, cols))
            assert torch.equal(rng.element_index(g), grid_full[:, r0:r1, c0:c1])
            local = torch.cat([tok[:, :P], tok_grid[:, :, r0:r1, c0:c1].reshape(B, -1, C)], 1)
            t = wrap(local.clone(), Spec(mesh, (1,), rows, cols, prefix=P, lead=lead, trail=trail))
            assert torch.equal(rng.element_index(t), local)
            # a channel mask over (sample, token): the index of the (B, N, 1) mask
            assert torch.equal(rng.element_index(t, 2), local[..., :1] // C)


class Block(nn.Module):
    """conv -> dropout -> DropPath residual; run under non-reentrant checkpointing."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.drop_path = timm.layers.DropPath(0.5)

    def forward(self, x):
        return x + self.drop_path(self.drop(self.conv(x)))


class RandomNet(nn.Module):
    """Every grid-invariant random op in grid layout (B, C, H, W) and in token
    layout (B, 1 + H*W, C) with a class token in front."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 3, padding=1)
        self.drop, self.drop2d = nn.Dropout(0.3), nn.Dropout2d(0.4)
        self.alpha, self.falpha = nn.AlphaDropout(0.2), nn.FeatureAlphaDropout(0.3)
        self.rrelu = nn.RReLU()
        self.cls = nn.Parameter(torch.randn(1, 1, c))
        self.tok_drop = nn.Dropout(0.25)
        self.proj = nn.Linear(c, c)
        self.block = Block(c)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        x = self.drop(self.c1(x))
        x = self.drop2d(x) + self.alpha(x) + self.falpha(x) + self.rrelu(x)
        x = x + 0.1 * torch.rand_like(x) + 0.1 * torch.randn_like(x)
        x = x * torch.empty_like(x).bernoulli_(0.8) + torch.empty_like(x).uniform_(-1, 1) \
            + torch.empty_like(x).normal_(0.5, 2.0)
        B, C, H, W = x.shape
        t = torch.cat([self.cls.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], 1)
        t = self.proj(self.tok_drop(t)) + 0.1 * torch.randn_like(t)
        t = F.dropout(t, 0.2, training=self.training)
        x = t[:, 1:].reshape(B, H, W, C).permute(0, 3, 1, 2)
        x = checkpoint(self.block, x, use_reentrant=False)
        return self.head(x), t[:, 0]


GRIDS = [(1, 1), (1, 2), (2, 2), (2, 3)]
SHAPE = (2, 3, 13, 14)  # 2x3: rows 7 + 6, cols 5 + 5 + 4


def _random_rank(grid):
    mesh = SpatialMesh.build(grid=grid)
    layout = TileLayout.even(SHAPE[2], SHAPE[3], grid, 1)
    x = offset_scene(SHAPE[0], SHAPE[1], SHAPE[2:], torch.float64)
    report = compare_sharded(RandomNet, x, mesh, layout, train=True, step=True, seed=3, dtype=torch.float64)
    # outside any model (no mode): the SpatialTensor rule itself draws the same mask
    ones = torch.ones(1, 2, *SHAPE[2:])
    torch.manual_seed(5)
    mask = gather(F.dropout(shard(ones, mesh, layout), 0.5))
    torch.manual_seed(5)
    with rng.grid_invariant():
        same = torch.equal(mask, F.dropout(ones, 0.5))
    try:  # a random op without a grid-invariant rule is refused by name
        torch.empty_like(shard(ones, mesh, layout)).exponential_()
        refusal = None
    except SPIMUnsupportedError as e:
        refusal = str(e)
    return report, same, refusal


@pytest.mark.parametrize("grid", grid_params(GRIDS, (2, 2)))
def test_random_ops_are_grid_invariant(grid):
    report, same_mask, refusal = run_grid(_random_rank, grid)
    check_report(report.errors, report.refused, 1e-12, f"grid {grid}")
    assert "output[1]" in report.errors and "grad cls" in report.errors and "grad block.conv.weight" in report.errors
    assert same_mask
    assert refusal is not None and "exponential_" in refusal and "grid-invariant" in refusal


def test_checkpoint_recompute_replays_grid_invariant_draws():
    # Block's dropout and DropPath (a plain bernoulli_) inside a non-reentrant
    # checkpoint: the recompute in backward (outside the model's forward) must
    # draw what the forward drew, or the gradients would not match the same
    # model without checkpointing.
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = Block(4).double().train()
        rng.install(m, 9)
        x = torch.randn(3, 4, 6, 7, dtype=torch.float64, requires_grad=True)
        y = checkpoint(m, x, use_reentrant=False) if ckpt else m(x)
        y.pow(2).sum().backward()
        grads.append([x.grad] + [p.grad for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_random_ops_change_the_result():
    # The comparison above must be able to fail: the random ops are live (train
    # differs from eval, and two forwards draw differently), so a tile that drew
    # its own values would not match the one-process run.
    torch.manual_seed(0)
    m = RandomNet().double()
    rng.install(m, 3)
    x = offset_scene(*SHAPE[:2], SHAPE[2:], torch.float64)
    a, b = m.train()(x)[0], m(x)[0]
    assert rel_error(a, b) > 0.1 and rel_error(a, m.eval()(x)[0]) > 0.1


@pytest.mark.parametrize("chunk", [50, 1 << 17])
def test_chunked_draws_equal_the_counter_formula(monkeypatch, chunk):
    # The draws never build the index tensor: _bit_chunks hashes a broadcast sum of
    # per-dim vectors chunk by chunk, and dropout keeps an element by comparing all
    # 64 bits with a shifted threshold. The values must be exactly the reference's,
    # random_bits(seed, counter) of element_index (checked against splitmix64 above),
    # with chunks that split the last dim, group rows, or hold the whole tensor; on
    # plain tensors and on the tiles of an uneven 2x3 grid in grid and token layouts.
    from rest_ds.spim.tensor import Spec, wrap

    monkeypatch.setitem(rng._CHUNK, "cpu", chunk)

    def check(x, kept, seed):
        index = rng.element_index(x, kept)
        assert torch.equal(rng._bits(seed, x, kept), rng.random_bits(seed, index))
        assert torch.equal(rng._bits(seed, x, kept, scale=2, offset=1), rng.random_bits(seed, index * 2 + 1))
        for p, dtype in ((0.1, torch.float32), (0.5, torch.bfloat16), (0.999, torch.float64)):
            u53 = rng._lsr(rng.random_bits(seed, index), 11)
            want = (u53 >= math.ceil(p * 2.0 ** 53)).to(dtype).div_(1 - p)
            assert torch.equal(rng._keep_mask(seed, x, kept, p, dtype, 1 - p), want)

    for shape in [(3, 10, 7), (2, 3, 7, 130), (1, 1, 60), (5,), ()]:
        for kept in [None] + ([2] if len(shape) > 2 else []):
            check(torch.zeros(shape), kept, 2 ** 62 - 7)
    B, H, W, C, lead, trail, P = 2, 9, 11, 3, 2, 3, 2
    rows, cols = (0, 5, 9), (0, 3, 8, 11)
    for r in range(2):
        for c in range(3):
            mesh = _FakeMesh((2, 3), (r, c))
            h, w = rows[r + 1] - rows[r], cols[c + 1] - cols[c]
            check(wrap(torch.zeros(B, h, w, C), Spec(mesh, (1, 2), rows, cols)), None, 11)
            t = wrap(torch.zeros(B, P + lead * h * w * trail, C), Spec(mesh, (1,), rows, cols, prefix=P, lead=lead,
                                                                      trail=trail))
            check(t, None, 12)
            check(t, 2, 13)
    # and through the op: F.dropout in the mode is x * the keep mask
    x = torch.randn(2, 3, 7, 130)
    torch.manual_seed(4)
    seed = rng.draw_seed()
    torch.manual_seed(4)
    with rng.grid_invariant():
        y = F.dropout(x, 0.3)
    keep = rng._lsr(rng.random_bits(seed, rng.element_index(x)), 11) >= math.ceil(0.3 * 2.0 ** 53)
    assert torch.equal(y, x * keep.float().div_(0.7))
