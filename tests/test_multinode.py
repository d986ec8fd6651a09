"""Multi-node: sp groups and the shared-memory transport when ranks live on several hosts.

* Host decision (rest_ds.spim.shm.host_id, SpatialMesh.build): each rank's host
  name is faked (``socket.gethostname`` patched inside the ranks); the
  shared-memory channel is used exactly where every rank of an sp group is on
  one host, gloo elsewhere, and the results agree with one process either way
  (float64, 1e-10). A placement whose sp groups span hosts although they need
  not is warned about on rank 0.
* Two nodes on this machine (two launcher invocations, node ranks 0 and 1, one
  rendezvous): ``torchrun --nnodes 2`` and ``deepspeed --hostfile --no_ssh
  --node_rank``, 4 ranks = dp2 x sp2 with 2 per node, one training step, whose
  parameters equal one process stepping on the two scenes' mean gradient.
"""
from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch

from rest_ds.spim import SpatialMesh
from rest_ds.spim.mesh import placement_warning
from rest_ds.spim.spawn import spawn
from rest_ds.spim.verify import compare_sharded
from tests.test_spim_shm import _model

TOL64 = 1e-10
# name -> (host of each of the 4 ranks, grid of an sp group)
HOST_CASES = {
    "one host, sp=4": (["a", "a", "a", "a"], (2, 2)),
    "two hosts, sp=2 inside each": (["a", "a", "b", "b"], (1, 2)),
    "two hosts, sp=4 must span": (["a", "a", "b", "b"], (2, 2)),
    "interleaved hosts, sp=2": (["a", "b", "a", "b"], (2, 1)),
}


def _hosts_rank(cases):
    import torch.distributed as dist

    rank = dist.get_rank()
    os.environ.pop("REST_DS_HOST_ID", None)
    out = {}
    x = torch.randn(2, 3, 22, 26, generator=torch.Generator().manual_seed(3))
    for name, (hosts, grid) in cases.items():
        socket.gethostname = lambda h=hosts[rank]: h  # this rank's fake host
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mesh = SpatialMesh.build(grid=grid)
        rep = compare_sharded(_model, x, mesh, train=True, step=True, dtype=torch.float64)
        out[name] = {"shm": mesh.shm is not None, "errors": rep.errors, "refused": rep.refused,
                     "warnings": [str(w.message) for w in caught if "cross hosts" in str(w.message)]}
    return out


@pytest.fixture(scope="module")
def host_results():
    return spawn(_hosts_rank, 4, HOST_CASES, timeout_s=600)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(HOST_CASES))
def test_shared_memory_only_inside_one_host(host_results, name):
    hosts, grid = HOST_CASES[name]
    sp = grid[0] * grid[1]
    for r, res in enumerate(host_results):
        group = hosts[r // sp * sp:(r // sp + 1) * sp]
        assert res[name]["shm"] == (len(set(group)) == 1), (name, r, res[name]["shm"])
        assert res[name]["refused"] is None and res[name]["errors"]
        worst = max(res[name]["errors"].values())
        assert worst <= TOL64, (name, r, worst)
    # only rank 0 warns, and only where the sp groups could have stayed inside a host
    assert bool(host_results[0][name]["warnings"]) == (name == "interleaved hosts, sp=2")
    assert all(not res[name]["warnings"] for res in host_results[1:])


def test_placement_warning_cases():
    assert placement_warning(["a"] * 4, 4) is None
    assert placement_warning(["a", "a", "b", "b"], 2) is None
    assert placement_warning(["a", "a", "b", "b"], 4) is None              # must span: 2 ranks per host
    msg = placement_warning(["a", "b", "a", "b"], 2)
    assert "blocks per host" in msg and "ranks 0-1" in msg
    msg = placement_warning(["a"] * 4 + ["b"] * 4, 3)                       # 3 does not divide 4
    assert "mesh.sp=3 does not divide the ranks per host (4)" in msg
