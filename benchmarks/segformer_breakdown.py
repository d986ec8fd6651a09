"""Where SegFormer-B0's sharded forward+backward time goes (issue 11), per rank.

On a ``1 x sp`` grid (gloo CPU ranks, one thread each), every rank runs three
variants of the same layers, interleaved, in the same process:

* ``sharded``: the model through SPIM on the rank's tile of the scene;
* ``plain_tile``: the plain model on a tensor of the tile's size (the
  comparator of ``spim_core.py``; its attention sees only the tile's keys);
* ``plain_tile_whole_kv``: the plain model on the same tile, its keys and values
  made as many as the whole scene's (:func:`sr_attention_volumes.whole_scene_kv`):
  the attention shapes of the sharded run, without SPIM or communication.

Each variant is timed by main-thread CPU time (``time.thread_time``, steadier
than wall time on a shared machine; waits that sleep do not count, spin-waits
do) and wall time, median of ``--repeats``. ``sharded - plain_tile_whole_kv``
is SPIM's own cost; ``plain_tile_whole_kv - plain_tile`` the attention work a
rank cannot avoid (its queries meet the whole scene's keys). One more sharded
run under cProfile (clock: thread CPU time) splits SPIM's cost into the K/V
all-to-all, the halo exchanges and SPIM's own Python (see :func:`_spim_kinds`).
Last, :func:`sdpa_inherent` times SDPA forward+backward alone at the plain
tile's and the sharded rank's attention shapes (the kernels' share of the
inherent work).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/segformer_breakdown.py [--size 1024] [--sp 2] [--repeats 3]``.
Prints a table and one JSON line (prefixed ``JSON``).
"""
from __future__ import annotations

import argparse
import cProfile
import copy
import json
import os
import pstats
import statistics
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rest_ds.spim import SpatialMesh, TileLayout, parallelize, shard  # noqa: E402
from rest_ds.spim.spawn import spawn  # noqa: E402

from sr_attention_volumes import build_segformer_b0, whole_scene_kv  # noqa: E402

BANDS = 3
VARIANTS = ("sharded", "plain_tile", "plain_tile_whole_kv")


def _spim_kinds(st: pstats.Stats) -> dict:
    """CPU seconds of one profiled sharded forward+backward by kind, from cProfile's
    table (clock: thread CPU time; cProfile's own per-call cost inflates Python-heavy
    parts, so these are upper bounds for the Python overheads):

    * ``total``: the whole forward+backward;
    * ``kv_all_to_all``: inclusive time of ``attention._a2a`` (the K/V gathers of
      the reduced grid and their gradients; stage 4's Ulysses exchanges), with the
      send-buffer concatenation, gloo's call and the split of what arrived;
    * ``halo``: inclusive time of ``halo.start_exchange`` / ``start_all_to_all`` and
      of the ``wait()`` closures they return (posting, shared-memory copies, waits);
    * ``spim_python``: the own (exclusive) time of every Python function under
      ``rest_ds/spim/``: dispatch, handlers, layout bookkeeping (not the aten ops they call);
    * ``top``: the 15 entries with the largest own time."""
    stats = st.stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    total = max(v[3] for v in stats.values())
    kinds = {"total": total, "kv_all_to_all": 0.0, "halo": 0.0, "spim_python": 0.0}
    spim = os.sep + os.path.join("rest_ds", "spim") + os.sep
    for (file, _, name), (_, _, tt, ct, _) in stats.items():
        if file.endswith(os.path.join("spim", "attention.py")) and name == "_a2a":
            kinds["kv_all_to_all"] += ct
        if file.endswith(os.path.join("spim", "halo.py")) and name in ("start_exchange", "start_all_to_all", "wait"):
            kinds["halo"] += ct
        if spim in file:
            kinds["spim_python"] += tt
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:15]
    kinds["top"] = [[f"{os.path.basename(f)}:{ln}({n})", round(v[2], 4), v[1]] for (f, ln, n), v in top]
    return kinds


def sdpa_shapes(size: int, sp: int) -> list[tuple[int, tuple, tuple]]:
    """Per stage of SegFormer-B0 on a ``size`` scene split 1 x ``sp`` (even tiles):
    ``(blocks, plain-tile (heads, queries, keys), sharded (heads, queries, keys))``
    of its attention: a plain tile's queries meet the tile's reduced keys, a
    sharded rank's the whole scene's (stage 4, sr 1: Ulysses, heads / sp over
    every token, when heads % sp == 0)."""
    cfg = build_segformer_b0(BANDS).encoder.model.config
    out, stride = [], 1
    for depth, heads, sr, s in zip(cfg.depths, cfg.num_attention_heads, cfg.sr_ratios, cfg.strides):
        stride *= s
        n_q = (size // stride) * (size // sp // stride)
        n_all = (size // stride) ** 2
        if sr == 1 and heads % sp == 0:
            out.append((depth, (heads, n_q, n_q), (heads // sp, n_all, n_all)))
        else:
            out.append((depth, (heads, n_q, n_q // sr ** 2), (heads, n_q, n_all // sr ** 2)))
    return out


def sdpa_inherent(size: int, sp: int, head_dim: int = 32, repeats: int = 5) -> dict:
    """CPU seconds (this thread, median of ``repeats``) of SDPA forward+backward
    alone at :func:`sdpa_shapes`, summed over the blocks: the attention kernels'
    part of the work a sharded rank cannot avoid."""
    def run(h, nq, nk):
        q, k, v = (torch.randn(1, h, n, head_dim, requires_grad=True) for n in (nq, nk, nk))
        times = []
        for _ in range(repeats):
            c0 = time.thread_time()
            torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
            times.append(time.thread_time() - c0)
        return statistics.median(times)
    plain = sharded = 0.0
    for depth, pt, sh in sdpa_shapes(size, sp):
        plain += depth * run(*pt)
        sharded += depth * run(*sh)
    return {"plain_tile": plain, "sharded": sharded, "extra": sharded - plain}


def _fwd_bwd(model, x):
    y = model(x)
    y.sum().backward()
    model.zero_grad(set_to_none=True)


def _rank_job(size: int, grid, repeats: int) -> dict:
    mesh = SpatialMesh.build(grid=grid)
    torch.manual_seed(0)
    model = build_segformer_b0(BANDS)
    plain = copy.deepcopy(model)
    whole_kv = copy.deepcopy(model)
    whole_scene_kv(whole_kv, mesh.sp)
    align = model.align
    layout = TileLayout.even(size, size, grid, align)
    x = torch.randn(1, BANDS, size, size, generator=torch.Generator().manual_seed(0))
    parallelize(model, mesh, align=align)
    inp = shard(x, mesh, layout)
    tile = inp._local.detach().clone()
    runs = {"sharded": (model, inp), "plain_tile": (plain, tile), "plain_tile_whole_kv": (whole_kv, tile)}
    out: dict = {"rank": mesh.rank, "tile": list(tile.shape), "cpu_s": defaultdict(list), "wall_s": defaultdict(list)}
    for key, (m, t) in runs.items():  # warm-up
        _fwd_bwd(m, t)
    for _ in range(repeats):
        for key, (m, t) in runs.items():
            dist.barrier(group=mesh.sp_group)
            t0, c0 = time.perf_counter(), time.thread_time()
            _fwd_bwd(m, t)
            out["cpu_s"][key].append(time.thread_time() - c0)
            out["wall_s"][key].append(time.perf_counter() - t0)
    # one sharded run under cProfile with the thread's CPU time as its clock
    dist.barrier(group=mesh.sp_group)
    prof = cProfile.Profile(timer=time.thread_time)
    prof.runcall(_fwd_bwd, model, inp)
    out["profile_s"] = _spim_kinds(pstats.Stats(prof))
    out["cpu_s"], out["wall_s"] = dict(out["cpu_s"]), dict(out["wall_s"])
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--sp", type=int, default=2, help="ranks on a 1 x sp grid")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    grid = (1, args.sp)
    res = spawn(_rank_job, args.sp, args.size, grid, args.repeats, timeout_s=3600, collective_timeout_s=1800)
    med = {v: {"cpu": max(statistics.median(r["cpu_s"][v]) for r in res),
               "wall": max(statistics.median(r["wall_s"][v]) for r in res)} for v in VARIANTS}
    print(f"\nSegFormer-B0 fwd+bwd, 3 x {args.size} x {args.size}, 1 x {args.sp} grid, median of {args.repeats} "
          "(slowest rank)")
    for v in VARIANTS:
        print(f"  {v:<22} cpu {med[v]['cpu']:.3f} s  wall {med[v]['wall']:.3f} s  "
              f"(sharded / this: cpu {med['sharded']['cpu'] / med[v]['cpu']:.2f}, "
              f"wall {med['sharded']['wall'] / med[v]['wall']:.2f})")
    for r in res:
        k = r["profile_s"]
        print(f"\n  rank {r['rank']} (tile {r['tile']}), one sharded run under cProfile, thread CPU s: total "
              f"{k['total']:.3f} | K/V all_to_all {k['kv_all_to_all']:.3f} | halo {k['halo']:.3f} | "
              f"SPIM python (own time) {k['spim_python']:.3f}")
        print("    largest own times: " + ", ".join(f"{n} {t:.3f} s/{c}" for n, t, c in k["top"]))
    torch.set_num_threads(1)
    sd = sdpa_inherent(args.size, args.sp)
    print(f"\n  SDPA forward+backward alone at the attention shapes (this process, one thread, CPU): plain tile "
          f"{sd['plain_tile']:.3f} s, sharded rank {sd['sharded']:.3f} s: +{sd['extra']:.3f} s, "
          f"{sd['extra'] / med['plain_tile']['cpu']:.2f} of the plain tile's CPU time")
    result = {"size": args.size, "grid": list(grid), "repeats": args.repeats, "median_s": med, "ranks": res,
              "sdpa_s": sd}
    print("JSON " + json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
