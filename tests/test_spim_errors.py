"""Bad input ends a SPIM job cleanly: the same clear SPIMError on every rank
(nobody left waiting in a collective), and a rank that dies alone brings the job
down quickly. Plus unit tests of the tile geometry (no processes)."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from rest_ds.spim import SpatialMesh, from_local, gather, parallelize, shard
from rest_ds.spim.errors import SPIMError, SPIMUnsupportedError
from rest_ds.spim.spawn import RankError, spawn
from rest_ds.spim.tiling import (TileLayout, check_aligned, choose_grid, factorisations, grid_cost, split_extent,
                                 tile_sizes)

from .harness import run_ranks
from .nets import CustomFunction

NO_ERROR = "no error"


# --- models used by the cases ---------------------------------------------------------
class MergeChannelsRows(nn.Module):
    def forward(self, x):
        # (B, C, H, W) -> (B, C*H, W) interleaves the channels with the sharded rows
        # (x.flatten(1), which keeps (C, H, W) whole in row-major order, is exact)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class ShiftThroughPairs(nn.Module):
    def forward(self, x):
        # through pairs of the flattened grid (a layout that cuts it: index-mapped) and back, one
        # pair later: values cross the tile borders, so it must be refused, not computed on the tile
        B, C, H, W = x.shape
        y = x.reshape(B, C, H * W // 2, 2)
        return torch.nn.functional.pad(y, [0, 0, 1, 0])[:, :, :-1].reshape(B, C, H, W)


class Roll(nn.Module):
    def forward(self, x):
        # without dims torch.roll shifts the flattened tensor: that mixes the sharded dims with the
        # others (a roll over given grid dims is exact, tests/test_models_swin.py)
        return torch.roll(x, shifts=1)


class RepeatInterleave(nn.Module):
    def forward(self, x):
        # GCViT's global query: a map copied to every window of the batch (each rank holds a tile)
        return x.repeat_interleave(2, dim=0)


class ReentrantCheckpoint(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        return checkpoint(self.conv, x, use_reentrant=True)


class Wrapper(nn.Module):
    def __init__(self, tail: nn.Module):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Sequential(nn.ReLU(), tail)

    def forward(self, x):
        return self.head(self.stem(x))


def _catch(fn) -> tuple[str, str]:
    """(exception type, message) of what ``fn`` raised on this rank."""
    try:
        fn()
    except Exception as e:  # recorded whatever it is; the test asserts the type
        return type(e).__name__, str(e)
    return NO_ERROR, ""


# --- cases on a 2x2 grid (4 ranks) ------------------------------------------------------
def _grid2x2_cases() -> dict[str, tuple[str, str]]:
    mesh = SpatialMesh.build(grid=(2, 2))
    rank = dist.get_rank()
    r, c = mesh.coord
    torch.manual_seed(0)
    out = {}

    def no_output_rows():
        # Rows split 3 + 2; a 4x4 stride-4 conv has one output row, owned by the first tile row:
        # the second tile row would own nothing.
        model = parallelize(nn.Conv2d(3, 4, 4, stride=4), mesh)
        model(shard(torch.randn(1, 3, 5, 8), mesh))

    def misaligned():
        # Row tiles of 5 and 11 px, column tiles of 8: not on multiples of 8.
        from_local(torch.randn(1, 2, 5 if r == 0 else 11, 8), mesh, align=8)

    def aligned_ok():
        # Control: tiles of 8 and 11 are fine (only the last tile takes a remainder).
        from_local(torch.randn(1, 2, 8 if r == 0 else 11, 8), mesh, align=8)

    def channels_mismatch():
        model = parallelize(nn.Conv2d(3, 4, 3, padding=1), mesh)
        model(torch.randn(1, 4 if rank == 1 else 3, 6, 6))

    def row_heights_mismatch():
        # Grid row 0 holds ranks 0 and 1: rank 1's tile is one row taller than rank 0's.
        model = parallelize(nn.Conv2d(3, 4, 3, padding=1), mesh)
        model(torch.randn(1, 3, 7 if rank == 1 else 6, 6))

    def merge_rows_sharded():
        parallelize(Wrapper(MergeChannelsRows()), mesh)(torch.randn(1, 3, 6, 6))

    def roll_sharded():
        parallelize(Wrapper(Roll()), mesh)(torch.randn(1, 3, 6, 6))

    def shift_through_pairs():
        parallelize(Wrapper(ShiftThroughPairs()), mesh)(torch.randn(1, 3, 6, 6))

    def repeat_interleave_sharded():
        parallelize(Wrapper(RepeatInterleave()), mesh)(torch.randn(1, 3, 6, 6))

    def custom_function():
        parallelize(Wrapper(CustomFunction()), mesh)(torch.randn(1, 3, 6, 6))

    def reentrant_checkpoint():
        parallelize(Wrapper(ReentrantCheckpoint()), mesh)(torch.randn(1, 3, 6, 6, requires_grad=True))

    for name, fn in [("no_output_rows", no_output_rows), ("misaligned", misaligned), ("aligned_ok", aligned_ok),
                     ("channels_mismatch", channels_mismatch), ("row_heights_mismatch", row_heights_mismatch),
                     ("merge_rows_sharded", merge_rows_sharded), ("roll_sharded", roll_sharded),
                     ("shift_through_pairs", shift_through_pairs),
                     ("repeat_interleave_sharded", repeat_interleave_sharded),
                     ("custom_function", custom_function), ("reentrant_checkpoint", reentrant_checkpoint)]:
        out[name] = _catch(fn)
        dist.barrier()  # a case that left a rank behind would hang here and time out the test
    return out


# --- cases on 3 ranks ----------------------------------------------------------------------
def _three_rank_cases() -> dict[str, tuple[str, str]]:
    rank = dist.get_rank()
    out = {"sp_not_dividing_world": _catch(lambda: SpatialMesh.build(sp=2))}
    out["grid_not_dividing_world"] = _catch(lambda: SpatialMesh.build(grid=(2, 2)))
    rows3, cols3 = SpatialMesh.build(grid=(3, 1)), SpatialMesh.build(grid=(1, 3))

    def exact(model_fn, shape, mesh):
        # Once refused ("tiles smaller than the op's halo"): the halo reaches past the adjacent
        # tile, which the far exchange (one all-to-all) now serves exactly.
        torch.manual_seed(0)  # the same weights and scene on every rank
        model, x = model_fn(), torch.randn(shape)
        ref = model(x)
        got = gather(parallelize(model, mesh)(shard(x, mesh)))
        err = float((got - ref).abs().max() / ref.abs().max())
        if not err <= 1e-5:
            raise AssertionError(f"max relative error {err:.2e}")

    def halo_too_small():
        # 7x7 conv (halo 3) on tiles of 2 rows: the halo reaches past the neighbouring tile.
        exact(lambda: nn.Conv2d(3, 4, 7, padding=3), (1, 3, 6, 5), rows3)

    def halo_too_small_deep():
        # Input tiles of 4 rows are fine; after the stride-2 conv they have 2 rows.
        exact(lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 7, padding=3)),
              (1, 3, 12, 5), rows3)

    def col_halo_too_small():
        exact(lambda: nn.Conv2d(3, 4, 5, padding=2), (1, 3, 8, 3), cols3)

    def no_output_cols():
        # Truly impossible: column tiles of 2, 2, 2 and a stride-4 conv with one output column,
        # which the middle tile would not own.
        parallelize(nn.Conv2d(3, 4, 4, stride=4), cols3)(shard(torch.randn(1, 3, 4, 6), cols3))

    def row_heights_mismatch():
        parallelize(nn.Conv2d(3, 4, 3, padding=1), cols3)(torch.randn(1, 3, 5 if rank == 2 else 6, 4))

    for name, fn in [("halo_too_small", halo_too_small), ("halo_too_small_deep", halo_too_small_deep),
                     ("col_halo_too_small", col_halo_too_small), ("row_heights_mismatch", row_heights_mismatch),
                     ("no_output_cols", no_output_cols)]:
        out[name] = _catch(fn)
        dist.barrier()
    return out


def _one_rank_raises():
    mesh = SpatialMesh.build(grid=(1, 2))
    if dist.get_rank() == 1:
        raise ValueError("boom")
    t = torch.ones(4)
    dist.all_reduce(t, group=mesh.sp_group)  # rank 0 waits here for a rank that is gone
    return t.sum().item()


@pytest.fixture(scope="module")
def grid2x2():
    return run_ranks(_grid2x2_cases, 4, timeout_s=300, collective_timeout_s=60)


@pytest.fixture(scope="module")
def three_ranks():
    return run_ranks(_three_rank_cases, 3, timeout_s=300, collective_timeout_s=60)


def _same_error_everywhere(results, case, exc_type=SPIMError):
    got = [res[case] for res in results]
    names = {exc_type.__name__} | {t.__name__ for t in exc_type.__subclasses__()}
    for rank, (t, msg) in enumerate(got):
        assert t in names, f"rank {rank}: expected {exc_type.__name__}, got {t}: {msg}"
    assert len({msg for _, msg in got}) == 1, f"ranks disagree: {got}"
    return got[0][1]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", ["halo_too_small", "halo_too_small_deep", "col_halo_too_small"])
def test_tiles_smaller_than_halo_are_exact(three_ranks, case):
    # 3x1 / 1x3 tiles of 2 px under 5x5 / 7x7 convs: the halo comes from beyond the adjacent tile
    assert all(res[case] == (NO_ERROR, "") for res in three_ranks), [res[case] for res in three_ranks]


@pytest.mark.timeout(600)
def test_thin_tile_that_owns_no_output_on_1x3(three_ranks):
    msg = _same_error_everywhere(three_ranks, "no_output_cols")
    assert "grid col 1" in msg and "owns no output cols" in msg, msg
    assert msg.startswith("module '"), msg  # names the layer


@pytest.mark.timeout(600)
def test_tile_that_owns_no_output(grid2x2):
    msg = _same_error_everywhere(grid2x2, "no_output_rows")
    assert "owns no output rows" in msg and "module '<root>' (Conv2d)" in msg, msg


@pytest.mark.timeout(600)
def test_misaligned_tiles(grid2x2):
    msg = _same_error_everywhere(grid2x2, "misaligned")
    assert "not aligned" in msg and "[5]" in msg and "alignment 8" in msg, msg
    assert all(res["aligned_ok"] == (NO_ERROR, "") for res in grid2x2)


@pytest.mark.timeout(600)
def test_mismatched_channels(grid2x2):
    msg = _same_error_everywhere(grid2x2, "channels_mismatch")
    assert "do not form a grid" in msg and "sp rank 1 has size 4 on dim 1" in msg, msg


@pytest.mark.timeout(600)
def test_mismatched_row_heights(grid2x2, three_ranks):
    msg = _same_error_everywhere(grid2x2, "row_heights_mismatch")
    assert "sp rank 1 (grid 0,1) has a 7x6 tile" in msg, msg
    msg = _same_error_everywhere(three_ranks, "row_heights_mismatch")
    assert "sp rank 2 (grid 0,2) has a 5x4 tile" in msg, msg


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case, op", [("merge_rows_sharded", "reshape"), ("roll_sharded", "roll"),
                                      ("shift_through_pairs", "reshape"),
                                      ("repeat_interleave_sharded", "repeat_interleave")])
def test_unsupported_op_names_module(grid2x2, case, op):
    msg = _same_error_everywhere(grid2x2, case, SPIMUnsupportedError)
    assert "module 'head.1'" in msg and op in msg, msg
    if op == "reshape":
        assert "would mix or cut the sharded dims" in msg, msg


@pytest.mark.timeout(600)
def test_custom_autograd_function_is_refused_by_name(grid2x2):
    # applied to a SpatialTensor it would run on the wrapper and detach the tile's graph
    msg = _same_error_everywhere(grid2x2, "custom_function", SPIMUnsupportedError)
    assert "module 'head.1'" in msg and "autograd.Function" in msg and "_Double" in msg, msg
    msg = _same_error_everywhere(grid2x2, "reentrant_checkpoint", SPIMUnsupportedError)
    assert "CheckpointFunction" in msg and "use_reentrant=False" in msg, msg


@pytest.mark.timeout(600)
def test_mesh_must_divide_world(three_ranks):
    msg = _same_error_everywhere(three_ranks, "sp_not_dividing_world")
    assert "world size 3 is not divisible by sp=2" in msg, msg
    msg = _same_error_everywhere(three_ranks, "grid_not_dividing_world")
    assert "not divisible by sp=4" in msg, msg


@pytest.mark.timeout(600)
def test_error_on_one_rank_ends_the_job():
    t0 = time.monotonic()
    with pytest.raises(RankError) as info:
        spawn(_one_rank_raises, 2, timeout_s=120, collective_timeout_s=20)
    elapsed = time.monotonic() - t0
    assert info.value.rank == 1 and info.value.exc_type == "ValueError" and "boom" in str(info.value)
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"


def _exiting_rank():
    SpatialMesh.build(grid=(1, 2))
    if dist.get_rank() == 1:
        os._exit(0)
    time.sleep(30)


@pytest.mark.timeout(120)
def test_spawn_reports_a_rank_that_exits_without_a_result():
    t0 = time.monotonic()
    with pytest.raises(RankError) as info:
        spawn(_exiting_rank, 2, timeout_s=60)
    assert info.value.rank == 1 and info.value.exc_type == "ProcessDied"
    assert time.monotonic() - t0 < 20


# --- tile geometry (no processes) ----------------------------------------------------------
@pytest.mark.parametrize("n, parts, align", [(10, 3, 1), (100, 3, 32), (97, 4, 8), (64, 2, 32), (5, 5, 1), (33, 1, 16)])
def test_split_extent(n, parts, align):
    part = split_extent(n, parts, align)
    sizes = tile_sizes(part)
    assert part[0] == 0 and part[-1] == n and len(part) == parts + 1
    assert all(b % align == 0 for b in part[1:-1])
    assert all(s >= align for s in sizes)
    # As even as the alignment allows: interior tiles differ by at most one unit,
    # and only the last tile holds the remainder n % align.
    units = [s // align for s in sizes[:-1]] + [(sizes[-1] - n % align) // align]
    assert max(units) - min(units) <= 1
    assert all(s % align == 0 for s in sizes[:-1]) and (sizes[-1] - n % align) % align == 0


def test_split_extent_remainder_on_last_tile():
    assert split_extent(100, 3, 32) == (0, 32, 64, 100)
    assert split_extent(10, 3) == (0, 4, 7, 10)


@pytest.mark.parametrize("n, parts, align", [(20, 3, 8), (2, 3, 1), (31, 1, 32), (10, 0, 1), (10, 2, 0)])
def test_split_extent_too_small(n, parts, align):
    with pytest.raises(SPIMError):
        split_extent(n, parts, align)


def _halo_cost(h, w, grid):
    return (grid[0] - 1) * w + (grid[1] - 1) * h


@pytest.mark.parametrize("h, w, sp, want", [
    (64, 64, 4, (2, 2)),      # square: 2x2 has the shortest interior border
    (32, 256, 4, (1, 4)),     # wide strip: cut across the short side
    (256, 32, 4, (4, 1)),     # tall strip
    (60, 60, 6, (3, 2)),      # 2x3 and 3x2 tie: more rows wins
    (60, 90, 6, (2, 3)),
    (90, 60, 6, (3, 2)),
    (50, 50, 3, (3, 1)),      # prime sp: only strips
])
def test_choose_grid(h, w, sp, want):
    got = choose_grid(h, w, sp)
    assert got == want
    assert got[0] * got[1] == sp
    assert _halo_cost(h, w, got) == min(_halo_cost(h, w, g) for g in factorisations(sp))


def test_choose_grid_prefers_even_tiles_to_a_shorter_border():
    # 448 x 560 in 112 px units: 1x2 splits the columns 224 / 336 (largest tile 448 x 336), 2x1 the
    # rows 224 / 224 (224 x 560): 2x1 wins though its border is longer
    assert choose_grid(448, 560, 2, align=112) == (2, 1)
    assert grid_cost(448, 560, (1, 2), 112) == (448 * 336, 448, -1)
    assert grid_cost(448, 560, (2, 1), 112) == (224 * 560, 560, -2)
    assert grid_cost(448, 560, (4, 1), 112) == (112 * 560, 3 * 560, -4) and grid_cost(448, 560, (8, 1), 112) is None
    assert choose_grid(448, 512, 2, align=32) == (1, 2)  # even either way: the shorter border (the main job)
    assert choose_grid(448, 672, 2, align=224) == (2, 1)  # the SAM config on nc-landsat7 (1x2: 224 / 448 columns)


def test_choose_grid_skips_grids_that_do_not_fit():
    # 4x1 ties with 2x2 on a 200x100 scene and wins on more rows; with a 50 px halo
    # both still fit, with 60 px none does (4x1 has 50-row tiles, 2x2 50-column ones).
    assert choose_grid(200, 100, 4) == (4, 1)
    assert choose_grid(200, 100, 4, halo=50) == (4, 1)
    with pytest.raises(SPIMError):
        choose_grid(200, 100, 4, halo=60)
    # Alignment: 40 px columns hold one 32 px unit, so only 4x1 fits.
    assert choose_grid(128, 40, 4, align=32) == (4, 1)
    with pytest.raises(SPIMError):
        choose_grid(48, 48, 4, align=32)


def test_tile_layout_covers_scene_once():
    layout = TileLayout.even(29, 31, (2, 3), align=4)
    assert layout.grid == (2, 3) and layout.shape == (29, 31)
    x = torch.arange(29 * 31).view(29, 31)
    seen = torch.zeros_like(x)
    rows = []
    for r in range(2):
        cols = []
        for c in range(3):
            rs, cs = layout.tile(r, c)
            seen[rs, cs] += 1
            cols.append(x[rs, cs])
        rows.append(torch.cat(cols, 1))
    assert torch.equal(torch.cat(rows, 0), x)
    assert bool((seen == 1).all())
    check_aligned(layout.rows, 4)
    check_aligned(layout.cols, 4)


def test_check_aligned_rejects():
    with pytest.raises(SPIMError, match="not aligned"):
        check_aligned((0, 12, 30), 8)
    check_aligned((0, 16, 30), 8)
