"""The shared-memory transport between the sp ranks of one host (rest_ds.spim.shm):
what it delivers equals what was sent (any size, strided views, through both
slots and in chunks), collectives agree bitwise on every rank and with the
arithmetic, the gloo fallbacks take over where they must, and a waiting rank
raises instead of hanging when a peer is gone."""
from __future__ import annotations

import glob
import os
import subprocess
import time

import pytest
import torch
import torch.distributed as dist

from rest_ds.spim import SpatialMesh, TileLayout
from rest_ds.spim.comm import all_gather_equal, all_reduce_, all_to_all, start_all_reduce_
from rest_ds.spim.halo import start_exchange
from rest_ds.spim.verify import compare_sharded

from .harness import run_ranks
from .nets import conv_bn_pool_net


def _message(src: int, dst: int, rnd: int, numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * src + 100 * dst + rnd)
    return torch.randn(numel, generator=g, dtype=torch.float64)


def _exchange_rank(grid, sizes, shm_env):
    os.environ["REST_DS_SHM"] = shm_env
    mesh = SpatialMesh.build(grid=grid)
    me = mesh.rank
    peers = [p for p in range(mesh.sp) if p != me]
    bad = []
    for rnd, numel in enumerate(sizes):
        # strided views on the way out: every other element of a longer tensor
        sends = [(p, _message(me, p, rnd, 2 * numel)[::2]) for p in peers]
        recvs = [(p, torch.empty(numel, dtype=torch.float64)) for p in peers]
        start_exchange(sends, recvs, mesh, "forward")()
        for p, buf in recvs:
            if not torch.equal(buf, _message(p, me, rnd, 2 * numel)[::2]):
                bad.append((rnd, p))
    # all-to-all (attention's K/V gather): chunk sizes differ per (src, dst), one empty, the own chunk kept
    for rnd, numel in enumerate(sizes):
        def size(src, dst):
            return 0 if (src, dst) == (1, 0) else numel + 3 * src + dst
        got = all_to_all([_message(me, j, 50 + rnd, size(me, j)) for j in range(mesh.sp)],
                         [size(j, me) for j in range(mesh.sp)], mesh)
        bad += [("a2a", rnd, j) for j in range(mesh.sp) if not torch.equal(got[j], _message(j, me, 50 + rnd,
                                                                                            size(j, me)))]
        # out=: each peer's chunk lands in a given tensor (strided here), nothing for the own rank
        out = [None if j == me else torch.zeros(2 * size(j, me), dtype=torch.float64)[::2] for j in range(mesh.sp)]
        got = all_to_all([None if j == me else _message(me, j, 70 + rnd, size(me, j)) for j in range(mesh.sp)],
                         None, mesh, out=out)
        bad += [("a2a out", rnd, j) for j in range(mesh.sp)
                if j != me and not (got[j] is out[j] and torch.equal(out[j], _message(j, me, 70 + rnd, size(j, me))))]
    mailboxes = {p: mesh.shm.has_mailbox(me, p) for p in peers} if mesh.shm is not None else None
    return {"bad": bad, "shm": mesh.shm is not None, "mailboxes": mailboxes,
            "a2a_shm": mesh.shm is not None and mesh.shm.all_pairs,
            "slot_bytes": mesh.shm.layout.slot_bytes if mesh.shm is not None else None}


@pytest.mark.timeout(300)
def test_point_to_point_any_size_between_neighbours():
    # sizes from one element to several slots (chunked, both slots in flight)
    sizes = (1, 7, 4096, 32768, 32769, 200_000, 3)
    out = run_ranks(_exchange_rank, 4, (2, 2), sizes, "1")
    for o in out:
        assert o["shm"] and all(o["mailboxes"].values())
        assert o["a2a_shm"]  # every pair of a 2x2 grid touches: all-to-alls go through the mailboxes too
        assert 200_000 * 8 > 2 * o["slot_bytes"]  # the big message needs more than both slots
        assert o["bad"] == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_non_neighbours_fall_back_to_gloo():
    # on a 1x3 grid ranks 0 and 2 are not neighbours: no mailbox, gloo carries it
    out = run_ranks(_exchange_rank, 3, (1, 3), (5, 70_000), "1")
    assert out[0]["mailboxes"] == {1: True, 2: False}
    assert out[2]["mailboxes"] == {0: False, 1: True}
    assert [o["a2a_shm"] for o in out] == [False] * 3  # the same choice on every rank: gloo's all-to-all
    assert all(o["bad"] == [] for o in out)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_disabled_by_environment_uses_gloo():
    out = run_ranks(_exchange_rank, 2, (1, 2), (3, 100_000), "0")
    assert [o["shm"] for o in out] == [False, False]
    assert [o["a2a_shm"] for o in out] == [False, False]
    assert all(o["bad"] == [] for o in out)


def _collective_rank():
    mesh = SpatialMesh.build(grid=(1, 3))
    r = mesh.rank
    out = {}
    gens = [torch.Generator().manual_seed(7 + k) for k in range(3)]
    parts = [torch.randn(3, 5, generator=g, dtype=torch.float32) for g in gens]
    for op in ("SUM", "MAX", "MIN"):
        t = parts[r].clone()
        all_reduce_(t, mesh, getattr(dist.ReduceOp, op))
        out[op] = t
    # posted all-reduce, with another collective started before its wait()
    a = parts[r].double().clone()
    wait = start_all_reduce_(a, mesh)
    out["gather"] = all_gather_equal(torch.full((4,), float(r)), mesh)
    out["posted"] = wait()
    # bigger than a collective slot: gloo
    big = torch.full((100_000,), float(r + 1))
    out["big"] = all_reduce_(big, mesh)[:3].clone()
    out["shm"] = mesh.shm is not None
    # this group's segment (named after the pid of sp rank 0, its creator), not other jobs' on the machine
    pids = [None] * mesh.sp
    dist.all_gather_object(pids, os.getpid(), group=mesh.sp_group)
    out["files"] = glob.glob(f"/dev/shm/rest_ds_spim_{pids[0]}_*")
    return out


@pytest.mark.timeout(300)
def test_collectives_exact_and_identical_on_all_ranks():
    out = run_ranks(_collective_rank, 3)
    gens = [torch.Generator().manual_seed(7 + k) for k in range(3)]
    parts = [torch.randn(3, 5, generator=g, dtype=torch.float32) for g in gens]
    want = {"SUM": parts[0] + parts[1] + parts[2], "MAX": torch.stack(parts).amax(0), "MIN": torch.stack(parts).amin(0)}
    for o in out:
        assert o["shm"]
        assert o["files"] == []  # the segment's name is gone as soon as every rank mapped it
        for op, w in want.items():
            assert torch.equal(o[op], out[0][op])  # the same bits on every rank
            torch.testing.assert_close(o[op], w, rtol=1e-6, atol=1e-6)
        assert torch.equal(o["gather"], torch.arange(3.0)[:, None].expand(3, 4))
        torch.testing.assert_close(o["posted"], sum(p.double() for p in parts))
        assert torch.equal(o["big"], torch.full((3,), 6.0))


def _waiting_rank(mode):
    mesh = SpatialMesh.build(grid=(1, 2))
    if mesh.rank == 1:
        time.sleep(4 if mode == "exited" else 12)  # never arrives in time
        return None
    if mode == "exited":
        # the peer's process as the channel sees it: one that has exited
        gone = subprocess.Popen(["true"])
        gone.wait()
        mesh.shm.pids = (os.getpid(), gone.pid)
    t0 = time.monotonic()
    try:
        all_reduce_(torch.ones(4), mesh)
        return {"type": None}
    except Exception as e:  # noqa: BLE001 - the test looks at what was raised
        return {"type": type(e).__name__, "msg": str(e), "after_s": time.monotonic() - t0}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_waiting_rank_raises_when_its_peer_exited():
    r0 = run_ranks(_waiting_rank, 2, "exited", timeout_s=60)[0]
    assert r0["type"] == "SPIMError" and "has exited" in r0["msg"], r0
    assert r0["after_s"] < 3.0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_waiting_rank_times_out_with_a_message():
    # 4 s: long enough for the ranks to start and meet on a loaded machine
    r0 = run_ranks(_waiting_rank, 2, "stalled", timeout_s=60, collective_timeout_s=4.0)[0]
    assert r0["type"] == "SPIMError" and "timeout" in r0["msg"], r0
    assert 3.5 < r0["after_s"] < 10.0


def _model_rank(shm_env):
    os.environ["REST_DS_SHM"] = shm_env
    mesh = SpatialMesh.build(grid=(2, 2))
    x = torch.randn(2, 3, 22, 26, generator=torch.Generator().manual_seed(3))
    rep = compare_sharded(conv_bn_pool_net, x, mesh, TileLayout((0, 10, 22), (0, 14, 26)), train=True, step=True)
    return {"shm": mesh.shm is not None, "errors": rep.errors, "refused": rep.refused}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("shm_env", ["1", pytest.param("0", marks=pytest.mark.slow)], ids=["shm", "gloo"])
def test_model_exact_over_either_transport(shm_env):
    out = run_ranks(_model_rank, 4, shm_env)
    for o in out:
        assert o["shm"] == (shm_env == "1")
        assert o["refused"] is None
        assert o["errors"] and max(o["errors"].values()) <= 1e-5, {k: v for k, v in o["errors"].items() if v > 1e-5}
