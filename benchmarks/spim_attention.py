"""Sequence-parallel attention: bytes per layer, per-rank memory, time.

(a) Bytes per global-attention layer (B = 1, width d, N tokens, fp32), summed
    over all P ranks, measured by SPIM's accounting against the analytic volumes:
    Ulysses 4 (P-1)/P N d elements per pass (q, k, v out, o back; docs/design.md
    writes it per rank as 4 (N/P) d (P-1)/P), all-gather of K/V 2 (P-1) N d.
(b) Per-rank peak memory (resident high-water mark, fresh processes) of a
    ViT-B-sized SAM image encoder (transformers SamVisionEncoder: width 768, 12
    layers, 12 heads, window 14, global layers 2, 5, 8, 11, patch 16) forward +
    backward at one scene, on 1, 2 and 4 ranks; targets <= 0.6x at 2 ranks and
    <= 0.35x at 4.
(c) Time of sequence-parallel attention on P ranks vs plain attention over
    the same tokens in one process, in one run (median of --repeats).

Usage: python benchmarks/spim_attention.py [--size 512] [--tokens 4096] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import reset_peak, rss_kib  # noqa: E402

from rest_ds.spim import SpatialMesh, TileLayout, comm_stats, parallelize, shard  # noqa: E402
from rest_ds.spim.attention import sequence_parallel_attention  # noqa: E402
from rest_ds.spim.spawn import spawn  # noqa: E402


# --- (a) bytes -----------------------------------------------------------------
def _bytes_rank(n_h, n_w, d, heads, algorithm):
    from timm.models.vision_transformer import Attention

    mesh = SpatialMesh.build()
    torch.manual_seed(0)

    class Tok(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention(d, heads, qkv_bias=True)

        def forward(self, x):
            B, C, h, w = x.shape
            return self.attn(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, C, h, w)

    model = parallelize(Tok(), mesh, attention=algorithm)
    x = torch.randn(1, d, n_h, n_w, requires_grad=True)
    comm_stats().reset()
    y = model(shard(x, mesh))
    y.to_local().sum().backward()
    return {f"{k}/{p}": v for (k, p), v in comm_stats().by_phase.items()}


def bench_bytes(P, n_h, n_w, d, heads):
    out = {}
    N = n_h * n_w
    for algo in ("ulysses", "allgather"):
        if algo == "ulysses" and heads % P:
            continue
        ranks = spawn(_bytes_rank, P, n_h, n_w, d, heads, algo)
        fwd = sum(r.get("all_to_all/forward", 0) for r in ranks)
        bwd = sum(r.get("all_to_all/backward", 0) for r in ranks)
        elems = 4 * (P - 1) / P * N * d if algo == "ulysses" else 2 * (P - 1) * N * d
        out[algo] = {"measured_forward": fwd, "measured_backward": bwd, "analytic": int(elems * 4)}
    return out


# --- (b) memory ------------------------------------------------------------------
def sam_vit_b(size: int):
    from transformers import SamVisionConfig
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    cfg = SamVisionConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_dim=3072,
                          image_size=size, patch_size=16, window_size=14, global_attn_indexes=[2, 5, 8, 11],
                          output_channels=256)
    cfg._attn_implementation = "eager"
    return SamVisionEncoder(cfg)


def _mem_rank(size, grid):
    mesh = SpatialMesh.build(grid=grid)
    torch.manual_seed(0)
    model = sam_vit_b(size)
    x = torch.randn(1, 3, size, size)
    align = 16 * 14
    if mesh.sp > 1:
        parallelize(model, mesh, align=align)
        x = shard(x, mesh, TileLayout.even(size, size, grid, align))
    exact = reset_peak()
    base = rss_kib("VmRSS") if exact else rss_kib("VmHWM")
    t0 = time.perf_counter()
    y = model(x).last_hidden_state
    (y.to_local() if mesh.sp > 1 else y).sum().backward()
    return {"peak_mib": (rss_kib("VmHWM") - base) / 1024, "seconds": time.perf_counter() - t0, "exact_peak": exact}


def bench_memory(size):
    rows = {}
    for grid in ((1, 1), (1, 2), (2, 2)):
        ranks = spawn(_mem_rank, grid[0] * grid[1], size, grid, timeout_s=7200, collective_timeout_s=3600)
        rows[f"{grid[0]}x{grid[1]}"] = {"peak_mib_max_rank": max(r["peak_mib"] for r in ranks),
                                        "seconds": max(r["seconds"] for r in ranks)}
    one = rows["1x1"]["peak_mib_max_rank"]
    for k, v in rows.items():
        v["ratio_vs_one_process"] = v["peak_mib_max_rank"] / one
    return rows


# --- (c) time ---------------------------------------------------------------------
def _time_rank(N, d, heads, repeats, algorithm):
    mesh = SpatialMesh.build()
    P, me = mesh.sp, mesh.sp_index
    counts = [N // P + (1 if i < N % P else 0) for i in range(P)]
    hd = d // heads
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, N, hd, generator=g) for _ in range(3))
    off = sum(counts[:me])
    ql, kl, vl = (t[:, :, off:off + counts[me]].contiguous() for t in (q, k, v))
    out = {}
    # plain attention over all N tokens, one process (every rank measures it; the
    # sharded run must be compared with it on the same machine state)
    plain = []
    for _ in range(repeats):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v)
        plain.append(time.perf_counter() - t0)
    sharded = []
    for _ in range(repeats):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        sequence_parallel_attention(ql, kl, vl, counts, mesh, algorithm=algorithm)
        torch.distributed.barrier()
        sharded.append(time.perf_counter() - t0)
    out["plain_s"] = statistics.median(plain)
    out["sharded_s"] = statistics.median(sharded)
    return out


def bench_time(P, N, d, heads, repeats):
    res = {}
    for algo in ("ulysses", "allgather"):
        if algo == "ulysses" and heads % P:
            continue
        ranks = spawn(_time_rank, P, N, d, heads, repeats, algo, threads=1)
        plain = statistics.median(r["plain_s"] for r in ranks)
        sharded = max(r["sharded_s"] for r in ranks)
        res[algo] = {"plain_one_process_s": plain, "sharded_s": sharded,
                     "ratio_sharded_vs_plain_over_P": sharded / (plain / P)}
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=448, help="SAM scene size for (b) (multiple of 224 x grid side)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens for (c)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", default="", help="comma list of parts to skip: bytes,memory,time")
    a = p.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    res = {}
    if "bytes" not in skip:
        res["bytes_per_layer"] = {f"P={P}": bench_bytes(P, 16, 24, 96, 12) for P in (2, 4)}
        for P, r in res["bytes_per_layer"].items():
            for algo, v in r.items():
                ok = v["measured_forward"] == v["analytic"] == v["measured_backward"]
                print(f"(a) {P} {algo:9s}: measured fwd {v['measured_forward']:,} B, bwd {v['measured_backward']:,} B, "
                      f"analytic {v['analytic']:,} B  {'MATCH' if ok else 'MISMATCH'}")
    if "time" not in skip:
        res["time"] = bench_time(2, a.tokens, 768, 12, a.repeats)
        for algo, v in res["time"].items():
            print(f"(c) P=2 {algo:9s}: plain {v['plain_one_process_s']:.3f} s over {a.tokens} tokens, "
                  f"sharded {v['sharded_s']:.3f} s per rank, ratio vs plain/P {v['ratio_sharded_vs_plain_over_P']:.2f}")
    if "memory" not in skip:
        res["memory"] = bench_memory(a.size)
        for g, v in res["memory"].items():
            print(f"(b) SAM ViT-B {a.size}px grid {g}: peak {v['peak_mib_max_rank']:.0f} MiB per rank "
                  f"({v['ratio_vs_one_process']:.2f}x one process), {v['seconds']:.1f} s")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
