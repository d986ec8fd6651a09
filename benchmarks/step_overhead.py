"""Where SPIM's fixed per-step cost goes: per-rank CPU time of one forward +
backward of the main job's model on 2 gloo CPU ranks (1x2 grid) against the
plain model on one rank's tile, in the same processes.

Each rank builds the model of ``--config``'s model section (the main job's
Prithvi-architecture ViT + UPerNet by default) twice from one seed: a plain copy,
run on a ``tile`` x ``tile`` input (the 1-rank weak-scaling base), and a
parallelized one, run on this rank's ``tile`` x ``tile`` tile of a ``tile`` x
``2 tile`` scene. Steps of the two alternate (``--steps`` each after
``--warmup``); every figure is this thread's CPU time (``time.thread_time``),
which a shared machine distorts far less than wall-clock. Reported per rank
(medians):

* ``plain`` and ``spim``: forward + loss + backward CPU seconds per step, and
  ``excess`` = spim - plain (the weak-scaling ideal is spim ~ plain, except for
  global attention over twice the tokens);
* ``comm``: CPU inside SPIM's transports (the shared-memory channel's posting and
  waiting, and torch.distributed calls made by SPIM) per step, with call counts;
* ``dispatch``: ``SpatialTensor.__torch_function__`` calls per step, and the CPU
  spent in the dispatcher itself (the call count times the cost of one dispatch
  of a cheap op, measured separately);
* ``--profile N``: a cProfile (thread CPU timer) of N SPIM steps on rank 0, top
  functions by own time and by cumulative time.

Also: a ping-pong of a 8-byte all-reduce and of a 64 KiB point-to-point
exchange through the shared-memory channel and through gloo (round trips per
second, CPU per round trip).

* per module: forward thread-CPU time (own, children excluded) of the SPIM
  model against the plain one, largest excess first.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/step_overhead.py [--tile 256]
[--steps 5] [--warmup 2] [--profile 2] [--pingpong] [--transport shm|gloo]
[--top 25]``. Prints a table and one JSON line (prefixed ``JSON``).
The CPU figures include the CPU a rank spends spinning while it waits for its
peer (the shared-memory channel spins, then yields): on a loaded machine that
waiting grows with the load, so compare runs taken in the same minutes.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rest_ds.spim import SpatialMesh, parallelize  # noqa: E402
from rest_ds.spim import comm, halo, shm, tensor  # noqa: E402
from rest_ds.spim.spawn import spawn  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "nc_landsat7_rest.yaml")


class Meter:
    """CPU time (thread) and calls of wrapped functions, not nested: an inner
    call of a wrapped function inside an outer one is counted only once."""

    def __init__(self):
        self.cpu, self.wall, self.calls, self.depth = {}, {}, {}, 0

    def wrap(self, owner, name: str, label: str):
        fn = getattr(owner, name)
        meter = self

        def wrapped(*a, **k):
            if meter.depth:
                return fn(*a, **k)
            meter.depth += 1
            t0, w0 = time.thread_time(), time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                meter.cpu[label] = meter.cpu.get(label, 0.0) + time.thread_time() - t0
                meter.wall[label] = meter.wall.get(label, 0.0) + time.perf_counter() - w0
                meter.calls[label] = meter.calls.get(label, 0) + 1
                meter.depth -= 1

        setattr(owner, name, wrapped)

    def reset(self):
        self.cpu.clear()
        self.wall.clear()
        self.calls.clear()


def _install(meter: Meter):
    # the shared-memory channel: posting + waiting of p2p and collectives
    meter.wrap(shm.ShmChannel, "start_exchange", "shm:p2p_post")
    if hasattr(shm.ShmChannel, "all_to_all"):
        meter.wrap(shm.ShmChannel, "all_to_all", "shm:all_to_all")
    meter.wrap(shm.ShmChannel, "_collect", "shm:collective_wait")
    meter.wrap(shm.ShmChannel, "_publish", "shm:collective_post")
    # the p2p finish() closures are timed through the halo module's wait
    orig_start = halo.start_exchange

    def start_exchange(*a, **k):
        wait = orig_start(*a, **k)

        def timed():
            t0, w0 = time.thread_time(), time.perf_counter()
            wait()
            meter.cpu["shm:p2p_wait"] = meter.cpu.get("shm:p2p_wait", 0.0) + time.thread_time() - t0
            meter.wall["shm:p2p_wait"] = meter.wall.get("shm:p2p_wait", 0.0) + time.perf_counter() - w0
            meter.calls["shm:p2p_wait"] = meter.calls.get("shm:p2p_wait", 0) + 1
        return timed

    halo.start_exchange = start_exchange
    for name in ("all_reduce", "all_gather", "all_to_all_single", "batch_isend_irecv", "broadcast",
                 "all_gather_object", "broadcast_object_list"):
        meter.wrap(dist, name, f"gloo:{name}")


def _count_dispatch():
    counter = {"n": 0}
    orig = tensor.SpatialTensor.__dict__["__torch_function__"].__func__

    def tf(cls, func, types, args=(), kwargs=None):
        counter["n"] += 1
        return orig(cls, func, types, args, kwargs)

    tensor.SpatialTensor.__torch_function__ = classmethod(tf)
    return counter


def _dispatch_cost(mesh) -> float:
    """CPU seconds of one ``__torch_function__`` dispatch of a cheap op
    (``torch.Tensor.dim(x)`` on a SpatialTensor: ``x.dim()`` and ``x.shape`` no
    longer dispatch) minus the same on a plain tensor."""
    from rest_ds.spim import from_local

    t = torch.zeros(1, 2, 32, 32)
    x = from_local(t, mesh)
    n = 20000
    dim = torch.Tensor.dim
    t0 = time.thread_time()
    for _ in range(n):
        dim(x)
    spim = time.thread_time() - t0
    t0 = time.thread_time()
    for _ in range(n):
        dim(t)
    plain = time.thread_time() - t0
    return (spim - plain) / n


def module_times(model) -> dict:
    """Install hooks that add each module's forward thread-CPU time (exclusive of
    its children) to the returned dict, keyed by module name."""
    acc, stack = {}, []

    def pre(name):
        def hook(mod, args):
            now = time.thread_time()
            if stack:
                stack[-1][1] += now - stack[-1][2]
            stack.append([name, 0.0, now])
        return hook

    def post(mod, args, out):
        now = time.thread_time()
        name, own, since = stack.pop()
        acc[name] = acc.get(name, 0.0) + own + now - since
        if stack:
            stack[-1][2] = now

    for name, m in model.named_modules():
        m.register_forward_pre_hook(pre(name or "<root>"))
        m.register_forward_hook(post)
    return acc


def _pingpong(mesh, n: int = 2000) -> dict:
    out = {}
    me, peer = mesh.rank, mesh.sp_ranks[1 - mesh.sp_index]
    ch = mesh.shm
    small = torch.zeros(1, dtype=torch.float64)
    big = torch.zeros(16384)  # 64 KiB
    recv = torch.empty_like(big)

    def timeit(label, fn, reps):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(reps):
            fn()
        out[label] = {"wall_us": 1e6 * (time.perf_counter() - t0) / reps,
                      "cpu_us": 1e6 * (time.thread_time() - c0) / reps}

    if ch is not None:
        timeit("shm all_reduce 8 B", lambda: ch.start_all_reduce_(small, "sum")(), n)
        timeit("shm p2p 64 KiB", lambda: ch.start_exchange([(peer, big)], [(peer, recv)])(), n)
    timeit("gloo all_reduce 8 B", lambda: dist.all_reduce(small, group=mesh.sp_group), n // 4)

    def gloo_p2p():
        for r in dist.batch_isend_irecv([dist.P2POp(dist.isend, big, peer, group=mesh.sp_group),
                                         dist.P2POp(dist.irecv, recv, peer, group=mesh.sp_group)]):
            r.wait()

    timeit("gloo p2p 64 KiB", gloo_p2p, n // 4)
    return out


def rank_main(args: dict) -> dict:
    from rest_ds.train.config import load_config
    from rest_ds.train.engine import build_model
    from rest_ds.train.metrics import segmentation_loss

    if args["transport"] == "gloo":
        os.environ["REST_DS_SHM"] = "0"
    tile = args["tile"]
    cfg = load_config(args["config"])
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, num_classes=7, in_chans=6)
    plain = copy.deepcopy(model)
    mesh = SpatialMesh.build(grid=(1, 2))
    align = int(getattr(model, "align", None) or 1)
    parallelize(model, mesh, align=align, rng_seed=0)
    model.train()
    plain.train()
    g = torch.Generator().manual_seed(1 + mesh.rank)
    x = torch.randn(1, 6, tile, tile, generator=g)
    y = torch.randint(0, 7, (1, tile, tile), generator=g)
    weight = torch.rand(7, generator=g) + 0.5
    from rest_ds.spim import SpatialTensor, Spec, from_local

    def spim_step():
        xs = from_local(x, mesh, align=align)
        ys = SpatialTensor(y, Spec(mesh, (1, 2), xs.spec.rows, xs.spec.cols))
        loss = segmentation_loss(model(xs), ys, weight=weight, ignore_index=255)
        mark.append(time.thread_time())
        loss.backward()

    def plain_step():
        loss = segmentation_loss(plain(x), y, weight=weight, ignore_index=255)
        mark.append(time.thread_time())
        loss.backward()

    mark: list = []

    mod_spim, mod_plain = module_times(model), module_times(plain)
    meter = Meter()
    _install(meter)
    counter = _count_dispatch()
    res = {k: [] for k in ("plain", "spim", "plain_fwd", "spim_fwd", "plain_wall", "spim_wall", "comm", "dispatch")}
    for i in range(args["warmup"] + args["steps"]):
        if i == args["warmup"]:  # module times of the measured steps only
            mod_spim.clear()
            mod_plain.clear()
        dist.barrier()
        t0, w0 = time.thread_time(), time.perf_counter()
        plain_step()
        tp, wp, fp = time.thread_time() - t0, time.perf_counter() - w0, mark.pop() - t0
        dist.barrier()
        meter.reset()
        counter["n"] = 0
        t0, w0 = time.thread_time(), time.perf_counter()
        spim_step()
        ts, ws, fs = time.thread_time() - t0, time.perf_counter() - w0, mark.pop() - t0
        if i >= args["warmup"]:
            for k, v in (("plain", tp), ("spim", ts), ("plain_fwd", fp), ("spim_fwd", fs), ("plain_wall", wp),
                         ("spim_wall", ws)):
                res[k].append(v)
            res["comm"].append((dict(meter.cpu), dict(meter.calls), dict(meter.wall)))
            res["dispatch"].append(counter["n"])
        model.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
    out = {k: statistics.median(res[k]) for k in ("plain", "spim", "plain_fwd", "spim_fwd", "plain_wall", "spim_wall")}
    out.update({
        "plain_min": min(res["plain"]), "spim_min": min(res["spim"]),  # least disturbed by other load
        "dispatch_calls": statistics.median(res["dispatch"]),
        "comm_cpu": {k: statistics.median(c[0].get(k, 0.0) for c in res["comm"]) for k in res["comm"][-1][0]},
        "comm_wall": {k: statistics.median(c[2].get(k, 0.0) for c in res["comm"]) for k in res["comm"][-1][2]},
        "comm_calls": res["comm"][-1][1],
        "dispatch_cost_s": _dispatch_cost(mesh),
        "modules": {k: (v / args["steps"], mod_plain.get(k, 0.0) / args["steps"]) for k, v in mod_spim.items()},
    })
    if args["profile"]:
        out["profile"] = {}
        for name, step, m in (("spim", spim_step, model), ("plain", plain_step, plain)):
            pr = cProfile.Profile(time.thread_time)
            pr.enable()
            for _ in range(args["profile"]):
                step()
                m.zero_grad(set_to_none=True)
            pr.disable()
            st = pstats.Stats(pr)
            out["profile"][name] = {f"{os.path.basename(k[0])}:{k[1]}({k[2]})": (v[1], v[2] / args["profile"],
                                                                                 v[3] / args["profile"])
                                    for k, v in st.stats.items()}
    if args["pingpong"]:
        out["pingpong"] = _pingpong(mesh)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", type=int, default=0)
    p.add_argument("--pingpong", action="store_true")
    p.add_argument("--transport", choices=("shm", "gloo"), default="shm")
    p.add_argument("--top", type=int, default=25, help="modules (and profile rows) listed per rank")
    a = p.parse_args(argv)
    outs = spawn(rank_main, 2, vars(a), timeout_s=1200)
    args = a
    for r, o in enumerate(outs):
        print(f"rank {r}: CPU plain {o['plain']:.4f} s (fwd {o['plain_fwd']:.4f})  spim {o['spim']:.4f} s "
              f"(fwd {o['spim_fwd']:.4f})  excess {o['spim'] - o['plain']:+.4f} s  ratio {o['spim'] / o['plain']:.2f}; "
              f"wall plain {o['plain_wall']:.4f} s  spim {o['spim_wall']:.4f} s; "
              f"min CPU plain {o['plain_min']:.4f} s  spim {o['spim_min']:.4f} s")
        print(f"  dispatch: {o['dispatch_calls']:.0f} calls/step x {1e6 * o['dispatch_cost_s']:.1f} us = "
              f"{o['dispatch_calls'] * o['dispatch_cost_s'] * 1e3:.1f} ms")
        tot = sum(v for k, v in o["comm_cpu"].items())
        print(f"  comm CPU {1e3 * tot:.1f} ms: " + ", ".join(
            f"{k} {1e3 * v:.1f} ms/{o['comm_calls'].get(k, 0)}" for k, v in sorted(o["comm_cpu"].items())))
        print(f"  comm wall {1e3 * sum(o['comm_wall'].values()):.1f} ms: " + ", ".join(
            f"{k} {1e3 * v:.1f} ms" for k, v in sorted(o["comm_wall"].items())))
        mods = sorted(o["modules"].items(), key=lambda kv: -(kv[1][0] - kv[1][1]))
        print("  forward CPU per module (own, ms): spim / plain / excess, largest excess first: " + "; ".join(
            f"{k} {1e3 * a:.1f}/{1e3 * b:.1f}/{1e3 * (a - b):+.1f}" for k, (a, b) in mods[:args.top]))
        for k, v in (o.get("pingpong") or {}).items():
            print(f"  ping-pong {k}: {v['wall_us']:.1f} us wall, {v['cpu_us']:.1f} us CPU per round trip")
        if o.get("profile") and r == 0:
            sp, pl = o["profile"]["spim"], o["profile"]["plain"]
            print("  profile (rank 0, per step, thread CPU ms): function, spim own, plain own, diff, "
                  "spim cumulative, calls")
            diff = sorted(set(sp) | set(pl), key=lambda k: -(sp.get(k, (0, 0, 0))[1] - pl.get(k, (0, 0, 0))[1]))
            for k in diff[:2 * args.top]:
                a, b = sp.get(k, (0, 0, 0)), pl.get(k, (0, 0, 0))
                print(f"    {k[:90]:90s} {1e3 * a[1]:7.2f} {1e3 * b[1]:7.2f} {1e3 * (a[1] - b[1]):+7.2f} "
                      f"{1e3 * a[2]:7.2f} {a[0]}")
            print("  by cumulative (spim):")
            for k in sorted(sp, key=lambda k: -sp[k][2])[:2 * args.top]:
                a, b = sp[k], pl.get(k, (0, 0, 0))
                print(f"    {k[:90]:90s} cum {1e3 * a[2]:7.2f} (plain {1e3 * b[2]:7.2f}) "
                      f"own {1e3 * a[1]:6.2f} n {a[0]}")
    print("JSON " + json.dumps([{k: v for k, v in o.items() if k != "profile"} for o in outs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
