"""The shared random stream: DropPath decisions agree across an sp group and
are replayed by activation checkpointing; tile dropout differs per tile and is
replayed too."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rest_ds.spim import SpatialMesh, parallelize, shard
from rest_ds.spim.rng import SharedRNG
from rest_ds.spim.spawn import spawn
from rest_ds.spim.verify import rel_error


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


class DropBlock(nn.Module):
    """conv -> dropout on the tile -> conv, optionally checkpointed."""

    def __init__(self, ckpt: bool):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.ckpt = ckpt

    def body(self, x):
        return self.c2(self.drop(self.c1(x)))

    def forward(self, x):
        return checkpoint(self.body, x, use_reentrant=False) if self.ckpt else self.body(x)


def _rank():
    mesh = SpatialMesh.build(grid=(1, 2))
    x = torch.randn(2, 3, 16, 20, generator=torch.Generator().manual_seed(1))
    grads, masks = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = parallelize(DropBlock(ckpt).train(), mesh, rng_seed=11)
        y = m(shard(x, mesh))
        y.to_local().pow(2).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    # the dropout mask of an all-ones tile (equal 10-column tiles on both ranks)
    ones = shard(torch.ones(1, 1, 16, 20), mesh)
    mask = parallelize(nn.Dropout(0.5).train(), mesh, rng_seed=11)(ones).to_local()
    return {"ckpt_vs_plain": max(rel_error(a, b) for a, b in zip(grads[1], grads[0])), "mask": mask}


@pytest.mark.timeout(300)
def test_tile_dropout_differs_per_tile_and_checkpoint_replays_it():
    a, b = spawn(_rank, 2)
    assert a["ckpt_vs_plain"] < 1e-6 and b["ckpt_vs_plain"] < 1e-6
    assert a["mask"].shape == b["mask"].shape == (1, 1, 16, 10)
    assert not torch.equal(a["mask"], b["mask"])  # an independent mask on each tile
    assert 0.3 < (a["mask"] == 0).float().mean() < 0.7
