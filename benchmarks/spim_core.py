"""SPIM core benchmark on gloo CPU ranks (one machine, via rest_ds.spim.spawn).

For a stack of 3x3 "same" convs and the ResNet-18 UPerNet (``rest_ds.models.zoo``)
on one ``3 x size x size`` scene, batch 1:

(a) halo bytes of the conv stack on a 1x2 grid, forward and backward separately
    (``comm_stats().by_phase``), against the volume computed from the tile
    geometry alone; they must match exactly;
(b) sharded forward+backward time on 2 ranks vs the same layers run plainly (no
    SPIM) on a tensor of the local tile's size, in the same processes,
    interleaved with them (median of ``--repeats`` runs each; each run ends
    with a barrier, so the slower rank counts);
(c) peak memory per rank at sp=2 (1x2) and sp=4 (2x2) vs one process on the
    whole scene (plain model, and the same through SPIM's rules on a 1x1 grid,
    which isolates what the rules themselves keep alive), as ratios against
    the targets (sp=2 <= 0.6 and sp=4 <= 0.35 of the plain process). Every
    configuration runs in fresh processes; the peak is the resident-set
    high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` after
    imports and model construction) minus the resident set at that point, so
    it counts what the first forward+backward allocates.

    The resident set depends on the C allocator as much as on the tensors:
    glibc's malloc raises its mmap threshold at run time (up to 32 MiB) after
    large blocks are freed, and from then on serves tensors below it from a
    heap that keeps freed holes resident. So every configuration is measured
    twice (``--malloc both``): with glibc's defaults, and with a fixed 128 KiB
    mmap threshold (``mallopt(M_MMAP_THRESHOLD)`` in each rank, which also
    turns the dynamic adjustment off), where tensors come from and go back to
    the kernel and the peak is what the computation holds.

The UPerNet runs in training mode (BatchNorm with whole-scene statistics over
the sp group), except the BatchNorms of the PPM branches: with batch 1 the
1x1-bin branch has one value per channel, which training-mode BatchNorm rejects
on one device as well, so those run in eval mode in every configuration.

Times (b) are taken with glibc's default allocator settings. The sp ranks talk
through SPIM's shared-memory transport (``--transport shm``, what a job on one
host uses) or over gloo alone (``--transport gloo``); bytes are counted the
same either way.

``--models swin_upernet``: timm Swin-T + UPerNet (``rest_ds.models.zoo.swin_tiny_upernet``,
tiles aligned to 224 = patch 4 x window 7 x 2^3, so a 1024 scene splits 448 | 576); (a) then
compares the bytes of its shifted-window rolls (``comm_stats`` kind ``roll``, forward and backward)
with the volume from the tile geometry (:func:`analytic_roll_bytes`) and lists the other kinds
(halo: UPerNet's convs and resampling; all_reduce: BatchNorm statistics, adaptive pooling).

``--models segformer_b0``: SegFormer-B0 (``configs/models/segformer.yaml``: transformers'
MiT-b0 + the all-MLP head, DropPath and dropout off); (a) then compares the bytes of each layer
kind (patch embeddings, Mix-FFN depthwise convs, spatial-reduction attention, decode head) with
the volumes from the tile geometry (``sr_attention_volumes.py``), on 1x2 and 2x2 grids; (b) adds a
second comparator, the plain tile with the whole scene's keys/values (``whole_scene_kv``: the tile's
queries attend to as many keys as a sharded rank's do, the attention work SPIM cannot avoid), so the
ratio reads both ways, and per-rank CPU times (``time.thread_time``) beside the wall times.

Usage: ``python benchmarks/spim_core.py [--size 1024] [--repeats 3] [--malloc both]
[--models conv_stack,resnet18_upernet,swin_upernet]``.
Prints a table and one JSON line (prefixed ``JSON``).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import json
import os
import re
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rest_ds.models.zoo import resnet18_upernet, swin_tiny_upernet  # noqa: E402
from rest_ds.spim import SpatialMesh, TileLayout, comm_stats, parallelize, shard  # noqa: E402
from rest_ds.spim.spawn import spawn  # noqa: E402
from rest_ds.train.bench import border_needs, halo_bytes  # noqa: E402

from memory import reset_peak, rss_kib  # noqa: E402
from sr_attention_volumes import build_segformer_b0, layer_bytes_report, layer_kind_hooks, whole_scene_kv  # noqa: E402

ALIGN = 32
BANDS = 3
DTYPE_BYTES = 4
TARGETS = {"sp2": 0.6, "sp4": 0.35}  # per-rank peak / peak of one plain process on the whole scene
MALLOC_MODES = {"default": "glibc default", "mmap": "fixed 128 KiB mmap threshold"}
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


# --- models ------------------------------------------------------------------

def conv_stack(channels: int, layers: int, in_chans: int = BANDS) -> nn.Sequential:
    mods: list[nn.Module] = []
    c_in = in_chans
    for _ in range(layers):
        mods += [nn.Conv2d(c_in, channels, 3, padding=1), nn.ReLU()]
        c_in = channels
    return nn.Sequential(*mods)


def stack_in_channels(channels: int, layers: int, in_chans: int = BANDS) -> list[int]:
    return [in_chans] + [channels] * (layers - 1)


def build(name: str, stack_channels: int, stack_layers: int) -> nn.Module:
    torch.manual_seed(0)
    if name == "conv_stack":
        return conv_stack(stack_channels, stack_layers).train()
    if name == "segformer_b0":
        return build_segformer_b0(BANDS)
    model = (swin_tiny_upernet() if name == "swin_upernet" else resnet18_upernet()).train()
    for m in model.decoder.psp_modules.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


# --- analytic halo volume ----------------------------------------------------

def analytic_halo_bytes(rows, cols, batch: int, in_channels: list[int], halo: int = 1) -> int:
    """Bytes all ranks send in one forward of a stack of stride-1 convs with a
    ``halo``-pixel border each side, from the tile geometry alone
    (``rest_ds.train.bench.halo_bytes``, the model ``rest-ds bench`` reports)."""
    return halo_bytes(rows, cols, border_needs(rows, halo, halo), border_needs(cols, halo, halo),
                      batch * sum(in_channels) * DTYPE_BYTES)


def analytic_roll_bytes(rows, cols, batch: int, size: int, patch: int = 4, window: int = 7,
                        depths=(2, 2, 6, 2), embed_dim: int = 96) -> int:
    """Bytes all ranks send in the forward of timm's Swin (v1) on a ``size x size``
    scene, from the tile geometry alone. Every second block of a stage rolls its
    (unpadded) ``H/st x W/st x C`` map by ``-window//2`` and back (2 rolls of both
    grid axes); per roll and axis split over several tiles, each tile receives
    ``min(shift, its extent)`` lines of the map from other tiles (the tile
    before it, cyclically), across its extent along the other axis. Every stage
    shifts (the encoder keeps timm's ``always_partition=True``)."""
    total = 0
    for i, depth in enumerate(depths):
        st, ch = patch * 2 ** i, embed_dim * 2 ** i
        n = -(-size // st)
        shift = window // 2
        r = [b // st for b in rows[:-1]] + [n]
        c = [b // st for b in cols[:-1]] + [n]
        per_roll = 0
        for part, other in ((r, c), (c, r)):
            if len(part) > 2:
                for k in range(len(part) - 1):
                    for j in range(len(other) - 1):
                        per_roll += min(shift, part[k + 1] - part[k]) * (other[j + 1] - other[j])
        total += (depth // 2) * 2 * per_roll * batch * ch * DTYPE_BYTES
    return total


# --- measurement helpers -----------------------------------------------------

def _set_malloc(mode: str) -> bool:
    """Allocator settings of this rank (before it allocates tensors); see (c)."""
    if mode == "default":
        return True
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024))


def _fwd_bwd(model, x):
    y = model(x)
    y.sum().backward()
    model.zero_grad(set_to_none=True)


def _barrier(mesh):
    if mesh.sp > 1:
        dist.barrier(group=mesh.sp_group)


def _rank_job(name: str, grid, size: int, repeats: int, stack_channels: int, stack_layers: int,
              time_it: bool, spim: bool = True, malloc: str = "default", transport: str = "shm") -> dict:
    """One rank of a sharded run. With grid (1, 1): the whole scene in one
    process, through SPIM's rules (``spim``) or as the plain model."""
    malloc_ok = _set_malloc(malloc)
    os.environ["REST_DS_SHM"] = "1" if transport == "shm" else "0"
    mesh = SpatialMesh.build(grid=grid)
    model = build(name, stack_channels, stack_layers)
    plain = copy.deepcopy(model)
    align = getattr(model, "align", ALIGN)
    layout = TileLayout.even(size, size, grid, align)
    x = torch.randn(1, BANDS, size, size, generator=torch.Generator().manual_seed(0))
    if spim:
        parallelize(model, mesh, align=align)
        inp = shard(x, mesh, layout)
    else:
        inp = x
    tile_shape = tuple(inp._local.shape) if spim else tuple(x.shape)
    del x
    out = {"rank": mesh.rank, "tile": tile_shape, "malloc_ok": malloc_ok,
           "transport": "shm" if mesh.shm is not None else "gloo"}

    # forward bytes per layer kind (sr_attention_volumes.py); the hooks only copy counters
    layer_bytes = layer_kind_hooks(model)[0] if name == "segformer_b0" and spim else None

    # (c) peak memory of the first forward+backward
    _barrier(mesh)
    exact = reset_peak()
    base = rss_kib("VmRSS") if exact else rss_kib("VmHWM")
    comm_stats().reset()
    t0 = time.perf_counter()
    _fwd_bwd(model, inp)
    out["first_s"] = time.perf_counter() - t0
    out["peak_mib"] = (rss_kib("VmHWM") - base) / 1024
    out["peak_exact"] = exact
    out["comm"] = {f"{k}/{p}": v for (k, p), v in comm_stats().by_phase.items()}
    if layer_bytes is not None:
        out["comm_forward_by_layer"] = {k: dict(v) for k, v in layer_bytes.items()}

    if time_it:
        # sharded runs interleaved with the same layers run plainly on a tensor of
        # this rank's tile size, so that drifts of the machine hit both alike
        runs = [("sharded_s", model, inp)]
        if mesh.sp > 1:
            tile = torch.randn(tile_shape, generator=torch.Generator().manual_seed(1))
            _fwd_bwd(plain, tile)
            runs.append(("plain_tile_s", plain, tile))
            if name == "segformer_b0":  # the work-equivalent comparator: the tile's queries, the scene's K/V
                whole_kv = whole_scene_kv(copy.deepcopy(plain), mesh.sp)
                _fwd_bwd(whole_kv, tile)
                runs.append(("plain_tile_whole_kv_s", whole_kv, tile))
        out["cpu_s"] = {}
        for key, _, _ in runs:
            out[key], out["cpu_s"][key] = [], []
        for _ in range(repeats):
            for key, mod, x_run in runs:
                _barrier(mesh)
                t0, c0 = time.perf_counter(), time.thread_time()
                _fwd_bwd(mod, x_run)
                out["cpu_s"][key].append(time.thread_time() - c0)  # this rank's own work, waits excluded
                _barrier(mesh)
                out[key].append(time.perf_counter() - t0)
    return out


def _run(name, grid, args, time_it, spim=True, malloc="default") -> list[dict]:
    return spawn(_rank_job, grid[0] * grid[1], name, grid, args.size, args.repeats, args.stack_channels,
                 args.stack_layers, time_it, spim, malloc, args.transport, timeout_s=3600, collective_timeout_s=1800)


def _rows_cols(size: int, grid) -> tuple:
    lay = TileLayout.even(size, size, grid, ALIGN)
    return lay.rows, lay.cols


def _memory(r1, r1s, r2, r4) -> dict:
    m = {"sp1": r1[0]["peak_mib"], "sp1_spim": r1s[0]["peak_mib"], "sp2": max(r["peak_mib"] for r in r2),
         "sp4": max(r["peak_mib"] for r in r4)}
    ratio = {k: m[k] / m["sp1"] for k in ("sp1_spim", "sp2", "sp4")}
    runs = r1 + r1s + r2 + r4
    return {"peak_mib_per_rank": m, "ratio_vs_plain": ratio,
            "meets_target": {k: ratio[k] <= t for k, t in TARGETS.items()},
            "peak_exact": all(r["peak_exact"] for r in runs), "malloc_applied": all(r["malloc_ok"] for r in runs)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="scene height and width (multiple of 32 x grid)")
    p.add_argument("--repeats", type=int, default=3, help="timed forward+backward runs per configuration")
    p.add_argument("--stack-channels", type=int, default=32)
    p.add_argument("--stack-layers", type=int, default=4)
    p.add_argument("--models", default="conv_stack,resnet18_upernet",
                   help="comma-separated: conv_stack, resnet18_upernet, swin_upernet (Swin-T + UPerNet)")
    p.add_argument("--malloc", choices=("both", "default", "mmap"), default="both",
                   help="allocator settings for the memory runs (see (c)); timings always use the default")
    p.add_argument("--skip-memory", action="store_true", help="only (a) and (b): no sp=4 or extra allocator runs")
    p.add_argument("--transport", choices=("shm", "gloo"), default="shm",
                   help="how the sp ranks talk: shared memory where they can (the default), or gloo only")
    args = p.parse_args(argv)
    modes = [] if args.skip_memory else ["default", "mmap"] if args.malloc == "both" else [args.malloc]
    results: dict = {"size": args.size, "batch": 1, "bands": BANDS, "repeats": args.repeats,
                     "stack": {"channels": args.stack_channels, "layers": args.stack_layers},
                     "targets": TARGETS, "models": {}}
    rows_out = []
    for name in args.models.split(","):
        res: dict = {"memory": {}}
        # (a)+(b): 1x2 grid, timed, and the plain model on the whole scene, timed (default allocator);
        # (c): those two plus SPIM on a 1x1 grid and a 2x2 grid, per allocator setting
        r2 = _run(name, (1, 2), args, True)
        r1t = _run(name, (1, 1), args, True, spim=False)
        for mode in modes:
            if mode == "default":  # the timed runs measured this setting's memory too
                r1, r2m = r1t, r2
            else:
                r1 = _run(name, (1, 1), args, False, spim=False, malloc=mode)
                r2m = _run(name, (1, 2), args, False, malloc=mode)
            r1s = _run(name, (1, 1), args, False, malloc=mode)
            r4 = _run(name, (2, 2), args, False, malloc=mode)
            res["memory"][mode] = _memory(r1, r1s, r2m, r4)
        sharded = max(statistics.median(r["sharded_s"]) for r in r2)
        plain = max(statistics.median(r["plain_tile_s"]) for r in r2)
        whole = statistics.median(r1t[0]["sharded_s"])  # (1, 1): the plain model on the whole scene
        res["time_s"] = {"sp2_sharded": sharded, "sp2_plain_tile": plain, "overhead_ratio": sharded / plain,
                         "sp1_whole_scene": whole, "speedup_vs_whole": whole / sharded}
        if "plain_tile_whole_kv_s" in r2[0]:
            # SegFormer: the plain tile with the whole scene's keys/values does the attention work a
            # sharded rank cannot avoid; sharded / it is SPIM's own cost. Also per-rank CPU time
            # (time.thread_time: steadier on a shared machine; spin-waits count, sleeping waits do not)
            wkv = max(statistics.median(r["plain_tile_whole_kv_s"]) for r in r2)
            cpu = {k: max(statistics.median(r["cpu_s"][k]) for r in r2)
                   for k in ("sharded_s", "plain_tile_s", "plain_tile_whole_kv_s")}
            res["time_s"].update({
                "sp2_plain_tile_whole_kv": wkv, "ratio_vs_whole_kv": sharded / wkv,
                "inherent_ratio": wkv / plain,
                "cpu_sp2_sharded": cpu["sharded_s"], "cpu_sp2_plain_tile": cpu["plain_tile_s"],
                "cpu_sp2_plain_tile_whole_kv": cpu["plain_tile_whole_kv_s"],
                "cpu_overhead_ratio": cpu["sharded_s"] / cpu["plain_tile_s"],
                "cpu_ratio_vs_whole_kv": cpu["sharded_s"] / cpu["plain_tile_whole_kv_s"],
                "cpu_inherent_ratio": cpu["plain_tile_whole_kv_s"] / cpu["plain_tile_s"]})
        res["comm_bytes_sp2_rank0"] = r2[0]["comm"]
        res["transport_sp2"] = r2[0]["transport"]
        if name == "conv_stack":
            cins = stack_in_channels(args.stack_channels, args.stack_layers)
            lay = TileLayout.even(args.size, args.size, (1, 2), ALIGN)
            measured_f = sum(r["comm"].get("halo/forward", 0) for r in r2)
            measured_b = sum(r["comm"].get("halo/backward", 0) for r in r2)
            # the scene input does not require grad: no halo gradient for the first conv
            analytic_f = analytic_halo_bytes(lay.rows, lay.cols, 1, cins)
            analytic_b = analytic_halo_bytes(lay.rows, lay.cols, 1, cins[1:])
            res["halo_bytes"] = {
                "sp2_forward": {"measured": measured_f, "analytic": analytic_f},
                "sp2_backward": {"measured": measured_b, "analytic": analytic_b},
            }
            if modes:  # r4: the last 2x2 run (the allocator does not change what is sent)
                lay4 = TileLayout.even(args.size, args.size, (2, 2), ALIGN)
                res["halo_bytes"].update({
                    "sp4_forward": {"measured": sum(r["comm"].get("halo/forward", 0) for r in r4),
                                    "analytic": analytic_halo_bytes(lay4.rows, lay4.cols, 1, cins)},
                    "sp4_backward": {"measured": sum(r["comm"].get("halo/backward", 0) for r in r4),
                                     "analytic": analytic_halo_bytes(lay4.rows, lay4.cols, 1, cins[1:])},
                })
            res["halo_match"] = all(v["measured"] == v["analytic"] for v in res["halo_bytes"].values())
        if name == "swin_upernet":
            lay = TileLayout.even(args.size, args.size, (1, 2), 224)
            roll = {"sp2_forward": {"measured": sum(r["comm"].get("roll/forward", 0) for r in r2),
                                    "analytic": analytic_roll_bytes(lay.rows, lay.cols, 1, args.size)},
                    "sp2_backward": {"measured": sum(r["comm"].get("roll/backward", 0) for r in r2),
                                     "analytic": analytic_roll_bytes(lay.rows, lay.cols, 1, args.size)}}
            if modes:
                lay4 = TileLayout.even(args.size, args.size, (2, 2), 224)
                a4 = analytic_roll_bytes(lay4.rows, lay4.cols, 1, args.size)
                roll.update({"sp4_forward": {"measured": sum(r["comm"].get("roll/forward", 0) for r in r4),
                                             "analytic": a4},
                             "sp4_backward": {"measured": sum(r["comm"].get("roll/backward", 0) for r in r4),
                                              "analytic": a4}})
            res["roll_bytes"] = roll
            res["roll_match"] = all(v["measured"] == v["analytic"] for v in roll.values())
            kinds: dict = {}
            for r in r2:
                for k, v in r["comm"].items():
                    kinds[k] = kinds.get(k, 0) + v
            res["comm_bytes_sp2_all_ranks"] = kinds
        if name == "segformer_b0":  # bytes per layer kind vs the analytic volumes, sp=2 and sp=4
            grids = [("sp2", r2, (1, 2))] + ([("sp4", r4, (2, 2))] if modes else [])
            res["layer_bytes"] = {g: layer_bytes_report(runs, *_rows_cols(args.size, grid), BANDS)
                                  for g, runs, grid in grids}
            res["layer_bytes_match"] = all(v["measured"] == v["analytic"] for rep in res["layer_bytes"].values()
                                           for v in rep.values() if v["analytic"] is not None)
        results["models"][name] = res
        rows_out.append((name, res))

    print(f"\nSPIM core benchmark: scene {BANDS} x {args.size} x {args.size}, batch 1, gloo CPU, "
          f"1 thread per rank, median of {args.repeats}")
    for name, res in rows_out:
        t = res["time_s"]
        print(f"\n[{name}]")
        if "halo_bytes" in res:
            print(f"  {'halo bytes (all ranks)':<28}{'measured':>14}{'analytic':>14}")
            for k, v in res["halo_bytes"].items():
                print(f"  {k:<28}{v['measured']:>14,}{v['analytic']:>14,}")
            print(f"  match: {res['halo_match']}")
        if "roll_bytes" in res:
            print(f"  {'roll bytes (all ranks)':<28}{'measured':>14}{'analytic':>14}")
            for k, v in res["roll_bytes"].items():
                print(f"  {k:<28}{v['measured']:>14,}{v['analytic']:>14,}")
            print(f"  match: {res['roll_match']}")
            print("  every kind, sp=2, all ranks: " + ", ".join(
                f"{k} {v:,}" for k, v in sorted(res["comm_bytes_sp2_all_ranks"].items())))
        for g, rep in res.get("layer_bytes", {}).items():
            print(f"  {'bytes per layer kind, ' + g + ' (all ranks)':<44}{'measured':>14}{'analytic':>14}")
            for k, v in rep.items():
                a = "-" if v["analytic"] is None else f"{v['analytic']:,}"
                print(f"  {k:<44}{v['measured']:>14,}{a:>14}")
        if "layer_bytes_match" in res:
            print(f"  match: {res['layer_bytes_match']}")
        print(f"  fwd+bwd time: sp=2 sharded {t['sp2_sharded']:.3f} s | same layers on a plain local tile "
              f"{t['sp2_plain_tile']:.3f} s | ratio {t['overhead_ratio']:.2f} | one process, whole scene "
              f"{t['sp1_whole_scene']:.3f} s (sp ranks talk over {res['transport_sp2']})")
        if "ratio_vs_whole_kv" in t:
            print(f"  plain local tile with the whole scene's K/V (the attention work a rank cannot avoid) "
                  f"{t['sp2_plain_tile_whole_kv']:.3f} s | sharded / it {t['ratio_vs_whole_kv']:.2f} | "
                  f"it / plain tile {t['inherent_ratio']:.2f}")
            print(f"  per-rank CPU time (slowest rank): sharded {t['cpu_sp2_sharded']:.3f} s | plain tile "
                  f"{t['cpu_sp2_plain_tile']:.3f} s | with the whole K/V {t['cpu_sp2_plain_tile_whole_kv']:.3f} s | "
                  f"ratios {t['cpu_overhead_ratio']:.2f} (vs plain tile), {t['cpu_ratio_vs_whole_kv']:.2f} "
                  f"(vs whole K/V), {t['cpu_inherent_ratio']:.2f} (inherent)")
        if not res["memory"]:
            continue
        print("  peak memory per rank, first forward+backward (MiB; ratio = per-rank peak / plain sp=1 peak)")
        print(f"  {'allocator':<30}{'plain sp=1':>11}{'SPIM sp=1':>11}{'SPIM sp=2':>11}{'SPIM sp=4':>11}"
              f"{'sp=2 ratio (<= %.2f)' % TARGETS['sp2']:>24}{'sp=4 ratio (<= %.2f)' % TARGETS['sp4']:>24}")
        for mode, mem in res["memory"].items():
            m, r, ok = mem["peak_mib_per_rank"], mem["ratio_vs_plain"], mem["meets_target"]
            note = "" if mem["peak_exact"] else "  (ru_maxrss fallback, not reset)"
            if not mem["malloc_applied"]:
                note += "  (mallopt failed: glibc defaults)"
            print(f"  {MALLOC_MODES[mode]:<30}{m['sp1']:>11.0f}{m['sp1_spim']:>11.0f}{m['sp2']:>11.0f}{m['sp4']:>11.0f}"
                  f"{'%.3f %s' % (r['sp2'], 'ok' if ok['sp2'] else 'MISSED'):>24}"
                  f"{'%.3f %s' % (r['sp4'], 'ok' if ok['sp4'] else 'MISSED'):>24}{note}")
    print("JSON " + json.dumps(results, sort_keys=True))
    if any(not r.get("halo_match", True) or not r.get("roll_match", True) or not r.get("layer_bytes_match", True)
           for r in results["models"].values()):
        raise SystemExit("measured halo / roll / per-layer bytes differ from the analytic volume")
    return results


if __name__ == "__main__":
    main()
