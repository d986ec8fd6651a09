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
from tests.harness import TOL64
from tests.nets import conv_bn_pool_net
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
        rep = compare_sharded(conv_bn_pool_net, x, mesh, train=True, step=True, dtype=torch.float64)
        out[name] = {"shm": mesh.shm is not None, "errors": rep.errors, "refused": rep.refused,
                     "warnings": [str(w.message) for w in caught if "cross hosts" in str(w.message)]}
    return out


@pytest.fixture(scope="module")
def host_results():
    return spawn(_hosts_rank, 4, HOST_CASES, timeout_s=600)


@pytest.mark.slow
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


# --- two nodes on this machine -------------------------------------------------------------------
def _two_node_config(d):
    """Two synthetic scenes, no augmentation (the dp replicas' scenes are then exactly micro-steps
    0 and 1 of one process with 2 accumulation steps), SGD, one step, a final checkpoint."""
    from tests.train_scene import make_scene, tiny_config, write_config

    scenes = [make_scene(d / f"scene{i}", height=48, width=64, seed=i) for i in range(2)]
    cfg = tiny_config(scenes[0], d / "out")
    cfg["data"] = {"scenes": [str(s) for s in scenes], "augment": {"flip": False, "rot90": False}}
    cfg["optimizer"] = {"name": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0}
    cfg["schedule"] = {"name": "constant"}
    cfg["train"] = {"steps": 1, "log_interval": 1, "eval_interval": 0, "checkpoint_interval": 1, "progress": False}
    return write_config(d / "two.yaml", cfg)


def _weights(out):
    from rest_ds.train.checkpoint import consolidated_state_dict, find_checkpoint

    root, tag, manifest = find_checkpoint(out / "checkpoints")
    return consolidated_state_dict(root, tag, manifest), manifest


def _run_nodes(cmds, cwd, envs, timeout=600):
    """Start one launcher per node at once (they meet at one rendezvous); wait for all."""
    import subprocess

    procs = [subprocess.Popen(c, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c, e in zip(cmds, envs)]
    outs = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=timeout)
            outs.append((p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


@pytest.fixture(scope="module")
def two_node_runs(tmp_path_factory):
    import subprocess

    from tests.harness import BIN, ROOT, free_port

    d = tmp_path_factory.mktemp("two_nodes")
    cfg = _two_node_config(d)
    base = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base.pop("REST_DS_HOST_ID", None)
    runs = {}
    # reference: one process, the two scenes as two accumulation micro-steps
    p = subprocess.run([str(BIN / "rest-ds"), "train", "--config", str(cfg), f"output_dir={d / 'one'}",
                        "deepspeed.gradient_accumulation_steps=2"], cwd=d, env=base, capture_output=True,
                       text=True, timeout=600)
    runs["one process"] = [(p.returncode, p.stdout, p.stderr)]
    over = [f"output_dir={d / 'torchrun'}", "mesh.sp=2"]
    port = free_port()
    runs["torchrun"] = _run_nodes(
        [["bash", str(ROOT / "launch" / "torchrun.sh"), "2", str(cfg), *over]] * 2, d,
        [{**base, "NNODES": "2", "NODE_RANK": str(i), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
          "REST_DS_HOST_ID": f"node{i}"} for i in range(2)])
    # a hostfile as copied from hostfile.example: comment lines first (the first *host* is the master)
    hostfile = d / "hostfile"
    hostfile.write_text("# two 'nodes' on this machine\n\nlocalhost slots=2\n127.0.0.1 slots=2\n")
    over = [f"output_dir={d / 'deepspeed'}", "mesh.sp=2"]
    port = free_port()
    runs["deepspeed"] = _run_nodes(
        [["bash", str(ROOT / "launch" / "deepspeed_multi_node.sh"), str(hostfile), str(cfg), *over]] * 2, d,
        [{**base, "NODE_RANK": str(i), "MASTER_PORT": str(port), "REST_DS_HOST_ID": f"node{i}"}
         for i in range(2)])
    return d, runs


@pytest.mark.slow
@pytest.mark.launcher
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_one_step_equals_one_process(two_node_runs, launcher):
    import csv

    d, runs = two_node_runs
    (rc, so, se), = runs["one process"]
    assert rc == 0, so[-2000:] + se[-2000:]
    for node, (rc, so, se) in enumerate(runs[launcher]):
        assert rc == 0, f"node {node}: " + so[-2000:] + se[-3000:]
        assert "cross hosts" not in se  # the sp groups stay inside a node
    log = runs[launcher][0][1]
    assert "4 rank(s) (gloo" in log and "sp=2 grid" in log and "dp=2" in log, log[-2000:]
    ref, _ = _weights(d / "one")
    got, manifest = _weights(d / launcher)
    assert manifest["world_size"] == 4 and manifest["mesh"]["dp"] == 2 and manifest["mesh"]["sp"] == 2
    assert sorted(got) == sorted(ref) and len(ref) > 10
    from rest_ds.train.engine import build_model
    from tests.train_scene import TINY_MODEL

    torch.manual_seed(0)  # the config's seed: the weights before the step
    init = build_model(TINY_MODEL, num_classes=3, in_chans=4)[0].state_dict()
    assert max(float((ref[k] - init[k]).abs().max()) for k in ref) > 1e-3  # the step moved the weights
    errors = {k: float((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)) for k in ref}
    worst = max(errors, key=errors.get)
    print(f"{launcher}: 2 nodes x 2 ranks vs one process: worst parameter {worst} {errors[worst]:.2e}")
    assert errors[worst] <= 1e-5, (worst, errors[worst])

    def loss(out):
        with open(out / "train_log.csv", newline="") as f:
            return float(list(csv.DictReader(f))[-1]["loss"])
    assert loss(d / launcher) == pytest.approx(loss(d / "one"), rel=1e-5)


def test_threads_per_rank_without_omp_num_threads(monkeypatch):
    """Remote nodes get no OMP_NUM_THREADS from DeepSpeed's ssh mode: a rank divides its cores
    by the ranks on its node (launcher variables), or takes SLURM's cpus per task."""
    from rest_ds.train.engine import default_threads

    cores = len(os.sched_getaffinity(0))
    for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(k, raising=False)
    assert default_threads() == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert default_threads() == 3
    monkeypatch.setenv("LOCAL_SIZE", "2")                      # the deepspeed launcher
    assert default_threads() == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))      # torchrun, more ranks than cores
    assert default_threads() == 1


@pytest.mark.launcher
def test_multi_node_script_needs_a_host_line(tmp_path):
    import subprocess

    from tests.harness import ROOT

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# copied from hostfile.example, hosts not filled in\n\n   # indented comment\n")
    p = subprocess.run(["bash", str(ROOT / "launch" / "deepspeed_multi_node.sh"), str(hostfile), "x.yaml"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "names no host" in p.stderr, p.stderr
