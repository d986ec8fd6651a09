"""The public SPIM surface that train/ and users rely on instead of private attributes:
``from_local`` for integer label tiles (dims (1, 2) of (B, H, W), with a layout),
``to_local``, and ``rng_state`` / ``set_rng_state`` (the grid-invariant stream's
position, for checkpoints).

The label case runs on 2 gloo ranks (1x2, uneven tiles): the wrapped tiles
gathered back equal the whole label map, the whole-scene loss through SPIM
equals one process's, and a tile of the wrong size is refused on its rank.
In the same run: ``x.shape`` / ``x.ndim`` / ``x.dim()`` / ``x.size()`` of
SpatialTensors (read from the stored global shape, without a dispatch) equal
the dispatched getters and the global shape, for grid and token layouts.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rest_ds.spim import SPIMError, rng_state, set_rng_state, to_local
from rest_ds.spim.rng import install
from tests.harness import TOL64, run_ranks

SHAPE = (2, 3, 10, 13)   # (B, C, H, W): 13 columns over 2 tiles at align 1 are uneven (6 / 7)


def _labels_rank():
    import torch.distributed as dist

    from rest_ds.spim import SpatialMesh, TileLayout, from_local, gather
    from rest_ds.spim.verify import rel_error

    mesh = SpatialMesh.build(grid=(1, 2))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    y = torch.randint(0, SHAPE[1], (SHAPE[0],) + SHAPE[2:], generator=gen)
    y[0, 0, :5] = -100
    layout = TileLayout.even(SHAPE[2], SHAPE[3], mesh.grid, 1)
    rows, cols = layout.tile(*mesh.coord)
    ys = from_local(y[:, rows, cols].contiguous(), mesh, dims=(1, 2), layout=layout)
    xs = from_local(x[..., rows, cols].contiguous(), mesh, layout=layout)
    out = {"label_dtype": str(ys.dtype), "label_shape": tuple(ys.shape), "tile_cols": cols.stop - cols.start,
           "gathered_equal": bool(torch.equal(gather(ys), y)),
           "to_local_is_tile": bool(torch.equal(to_local(ys), y[:, rows, cols])),
           "loss_error": rel_error(F.cross_entropy(xs, ys, ignore_index=-100),
                                   F.cross_entropy(x, y, ignore_index=-100))}
    views = {"grid": xs, "permuted": xs.permute(0, 2, 3, 1), "tokens": xs.flatten(2).transpose(1, 2),
             "in_place": xs.clone().mul_(2.0)}
    out["shapes"] = {k: {"attr": tuple(v.shape), "ndim": v.ndim, "dim": v.dim(), "ndimension": v.ndimension(),
                         "size": tuple(v.size()), "dispatched": tuple(torch.Tensor.shape.__get__(v)),
                         "dispatched_dim": torch.Tensor.dim(v), "local": tuple(v.to_local().shape)}
                     for k, v in views.items()}
    wrong = y[:, rows, : cols.stop - cols.start - 1].contiguous()   # one column short
    try:
        from_local(wrong, mesh, dims=(1, 2), layout=layout)
        out["wrong_size"] = None
    except SPIMError as e:
        out["wrong_size"] = str(e)
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def labels():
    return run_ranks(_labels_rank, 2)


def test_global_shape_without_dispatch(labels):
    B, C, H, W = SHAPE
    expect = {"grid": SHAPE, "permuted": (B, H, W, C), "tokens": (B, H * W, C), "in_place": SHAPE}
    for r in labels:
        for k, g in expect.items():
            got = r["shapes"][k]
            assert got["attr"] == got["size"] == got["dispatched"] == g, (k, got)
            assert got["ndim"] == got["dim"] == got["ndimension"] == got["dispatched_dim"] == len(g), (k, got)
            assert got["local"] != g  # the tile is smaller: the test tells global from local


def test_from_local_wraps_label_tiles(labels):
    for r in labels:
        assert r["label_dtype"] == "torch.int64" and r["label_shape"] == (SHAPE[0],) + SHAPE[2:]
        assert r["gathered_equal"] and r["to_local_is_tile"]
        assert r["loss_error"] <= TOL64, r["loss_error"]
    assert sorted(r["tile_cols"] for r in labels) == [6, 7]


def test_from_local_refuses_a_tile_of_the_wrong_size(labels):
    for r in labels:
        assert r["wrong_size"] is not None and "the layout gives it" in r["wrong_size"], r["wrong_size"]


def test_to_local_passes_plain_tensors_through():
    t = torch.ones(3)
    assert to_local(t) is t


def _dropout_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5))


def test_rng_state_round_trip_replays_the_draws():
    torch.manual_seed(0)
    m = _dropout_model()
    assert rng_state(m) is None                       # no stream before install / parallelize
    install(m, seed=5)
    x = torch.ones(4, 8)
    state = rng_state(m)
    first, second = m(x), m(x)
    assert not torch.equal(first, second)             # the stream moved on
    set_rng_state(m, state)
    assert torch.equal(m(x), first)                   # and is put back exactly
    # a copy of the model given the same position draws the same masks (a resumed run)
    torch.manual_seed(0)
    other = _dropout_model()
    install(other, seed=99)
    set_rng_state(other, state)
    assert torch.equal(other(x), first)
    set_rng_state(other, state["cpu"])                # older checkpoints stored the CPU state alone
    assert torch.equal(other(x), first)


def test_set_rng_state_refuses_bad_input():
    m = _dropout_model()
    with pytest.raises(SPIMError, match="no SPIM random stream"):
        set_rng_state(m, {"cpu": torch.get_rng_state(), "cuda": None})
    set_rng_state(m, None)                            # nothing to restore: a no-op
    install(m, seed=1)
    with pytest.raises(SPIMError, match="expected the dict"):
        set_rng_state(m, {"cpu": "abc"})
