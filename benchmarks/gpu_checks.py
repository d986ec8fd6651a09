"""SPIM on one CUDA GPU: exactness of the CUDA kernels, flash attention, and
per-rank GPU memory, with the ranks sharing the GPU.

The ranks talk over gloo, which stages device tensors through host memory
(``rest_ds.spim.comm``); every rank computes with CUDA kernels. Parts:

exact   sharded vs one process on the same GPU, fp32 (TF32 off), train mode and
        one SGD step (``rest_ds.spim.verify(device="cuda")``): ResNet-18
        UPerNet, ViT-S UPerNet (configs/models/vit_upernet.yaml: Ulysses on 1x2,
        all-gather of K/V on 2x2), SAM ViT-B + FPN (configs/models/sam_fpn.yaml).
flash   sequence-parallel attention with the local math forced onto SDPA's flash
        kernel (bf16) on 2 ranks vs flash attention over all tokens in one process.
memory  per-rank peak of ``torch.cuda.max_memory_allocated`` over the first
        forward+backward minus what was allocated before it (weights), ResNet-18
        UPerNet and a ViT-B SAM encoder, on 1, 2 and 4 ranks; ratios against the
        targets (<= 0.6 at 2 ranks, <= 0.35 at 4). Tensor-level: no allocator
        caching or freed-but-resident memory in the figure.

Usage: python benchmarks/gpu_checks.py [--parts exact,flash,memory] [--sam-sizes 1344,1792] [--cnn-sizes 1024,2048]
Prints one line per result and a final JSON line (prefixed ``JSON``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rest_ds.spim import SpatialMesh, TileLayout, parallelize, shard  # noqa: E402
from rest_ds.spim.spawn import spawn  # noqa: E402

TARGETS = {2: 0.6, 4: 0.35}


# --- model factories (module level: the ranks import them) ---------------------------

def _kernels_from_env() -> None:
    """``GPU_CHECKS_KERNELS`` (comma list) in the ranks: ``math_sdpa`` (SDPA's
    math backend only), ``no_cudnn``: to see which kernel a difference comes from."""
    flags = set(os.environ.get("GPU_CHECKS_KERNELS", "").split(","))
    if "math_sdpa" in flags:
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    if "no_cudnn" in flags:
        torch.backends.cudnn.enabled = False


def _from_yaml(name: str, size: int, **enc_kwargs):
    from rest_ds.models.config import ModelConfig, build_segmentor

    _kernels_from_env()
    cfg = ModelConfig.from_yaml(os.path.join(ROOT, "configs", "models", name))
    cfg.encoder.kwargs = {**cfg.encoder.kwargs, "img_size": [size, size], **enc_kwargs}
    # dropout on a tile draws other masks than on the whole scene (rest_ds.spim.rng)
    cfg.decoder.dropout = 0.0
    if cfg.aux_head is not None:
        cfg.aux_head.dropout = 0.0
    return build_segmentor(cfg)


def vit_s_upernet_512():
    return _from_yaml("vit_upernet.yaml", 512)


def sam_b_fpn_896():
    return _from_yaml("sam_fpn.yaml", 896)


# --- exact -------------------------------------------------------------------------------

def part_exact(dtype: torch.dtype, models: set[str] | None = None, grids: set[str] | None = None) -> list[dict]:
    from rest_ds.spim.verify import verify

    cases = [
        ("resnet18_upernet", "rest_ds.models.zoo:resnet18_upernet", (2, 3, 512, 512), 32),
        ("vit_s_upernet", vit_s_upernet_512, (2, 3, 512, 512), 32),
        ("sam_b_fpn", sam_b_fpn_896, (1, 3, 896, 896), 224),
    ]
    out = []
    for name, target, shape, align in cases:
        if models and name not in models:
            continue
        for grid in ((1, 2), (2, 2)):
            if grids and f"{grid[0]}x{grid[1]}" not in grids:
                continue
            t0 = time.perf_counter()
            try:
                fp32 = dtype == torch.float32
                rep = verify(target, shape, grid, train=True, align=align, device="cuda", timeout_s=900,
                             dtype=dtype, noise_floor=True)
                worst = max(rep.errors.items(), key=lambda kv: kv[1]) if rep.errors else ("none", float("nan"))
                row = {"model": name, "grid": f"{grid[0]}x{grid[1]}", "dtype": str(dtype), "checks": len(rep.errors),
                       "max_rel_error": worst[1], "worst": worst[0], "refused": rep.refused,
                       "bytes": rep.comm_bytes, "seconds": round(time.perf_counter() - t0, 1)}
                classes = rep.classify(1e-5)  # rest-ds verify's verdict (measured noise, ZERO-REF)
                row["classes"] = {c: sum(1 for v in classes.values() if v == c) for c in set(classes.values())}
                row["verdict_failures"] = sorted(k for k, c in classes.items() if c == "FAIL")[:20]
                if fp32:  # the one-process fp32 result's own distance from float64, per check
                    floor = rep.noise_floor
                    row["floor_of_worst"] = floor.get(worst[0])
                    row["checks_above_10x_floor_and_1e-5"] = sorted(
                        k for k, v in rep.errors.items() if v > 1e-5 and v > 10 * floor.get(k, 0.0))
                top = sorted(rep.errors.items(), key=lambda kv: -kv[1])[:12]
                row["top"] = [(k, v, rep.noise_floor.get(k)) for k, v in top]
                row["output_and_input_grad"] = {k: v for k, v in rep.errors.items() if not k.startswith(("grad", "param", "buffer"))}
            except Exception as e:  # report and go on with the other cases
                row = {"model": name, "grid": f"{grid[0]}x{grid[1]}", "error": f"{type(e).__name__}: {e}"[:2000]}
            print("exact", json.dumps(row), flush=True)
            out.append(row)
    return out


# --- flash -------------------------------------------------------------------------------

def _flash_rank(N, heads, hd):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rest_ds.spim.attention import sequence_parallel_attention

    torch.cuda.set_device(0)
    mesh = SpatialMesh.build()
    P, me = mesh.sp, mesh.sp_index
    counts = [N // P + (1 if i < N % P else 0) for i in range(P)]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, N, hd, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    off = sum(counts[:me])
    res = {}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)[:, :, off:off + counts[me]]
        for algo in ("ulysses", "allgather"):
            o = sequence_parallel_attention(*(t[:, :, off:off + counts[me]].contiguous() for t in (q, k, v)),
                                            counts, mesh, algorithm=algo)
            d = (o.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
            res[algo] = d
    ref32 = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())[:, :, off:off + counts[me]]
    res["flash_bf16_vs_fp32"] = (ref.float() - ref32).abs().max().item() / ref32.abs().max().item()
    return res


def part_flash() -> dict:
    try:
        ranks = spawn(_flash_rank, 2, 4096, 12, 64, timeout_s=300)
        res = {k: max(r[k] for r in ranks) for k in ranks[0]}
    except Exception as e:
        res = {"error": f"{type(e).__name__}: {e}"[:2000]}
    print("flash", json.dumps(res), flush=True)
    return res


# --- memory ------------------------------------------------------------------------------

def _mem_rank(model_name: str, size: int, grid):
    torch.cuda.set_device(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    mesh = SpatialMesh.build(grid=grid)
    torch.manual_seed(0)
    if model_name == "sam_vit_b":
        from spim_attention import sam_vit_b
        model, align = sam_vit_b(size), 16 * 14
    else:
        from spim_core import build
        model, align = build("resnet18_upernet", 32, 4), 32  # train mode, PPM BatchNorms in eval (batch 1)
    model = model.cuda()
    x = torch.randn(1, 3, size, size, device="cuda")
    if mesh.sp > 1:
        parallelize(model, mesh, align=align)
        x = shard(x, mesh, TileLayout.even(size, size, grid, align))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    y = model(x)
    y = getattr(y, "last_hidden_state", y)
    (y.to_local() if mesh.sp > 1 else y).float().sum().backward()
    torch.cuda.synchronize()
    return {"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20, "weights_mib": base / 2**20,
            "seconds": time.perf_counter() - t0}


def part_memory(sam_sizes: list[int], cnn_sizes: list[int]) -> dict:
    out = {}
    for model_name, size in [("resnet18_upernet", s) for s in cnn_sizes] + [("sam_vit_b", s) for s in sam_sizes]:
        rows = {}
        for grid in ((1, 1), (1, 2), (2, 2)):
            try:
                ranks = spawn(_mem_rank, grid[0] * grid[1], model_name, size, grid, timeout_s=600,
                              collective_timeout_s=600)
                rows[grid[0] * grid[1]] = {"peak_mib": max(r["peak_mib"] for r in ranks),
                                           "weights_mib": ranks[0]["weights_mib"],
                                           "seconds": max(r["seconds"] for r in ranks)}
            except Exception as e:
                rows[grid[0] * grid[1]] = {"error": f"{type(e).__name__}: {e}"[:1500]}
        one = rows.get(1, {}).get("peak_mib")
        for p, r in rows.items():
            if one and "peak_mib" in r:
                r["ratio"] = r["peak_mib"] / one
                if p in TARGETS:
                    r["target"] = TARGETS[p]
                    r["meets_target"] = r["ratio"] <= TARGETS[p]
        out[f"{model_name}@{size}"] = rows
        print("memory", model_name, size, json.dumps(rows), flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="exact,flash,memory")
    p.add_argument("--models", default="", help="exactness: only these (comma list; default all)")
    p.add_argument("--grids", default="", help="exactness: only these grids, e.g. 2x2 (default 1x2,2x2)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                   help="precision of the exactness part (float32 also reports the fp32 noise floor)")
    p.add_argument("--sam-sizes", default="1344,1792", help="SAM scene sides (multiples of 448)")
    p.add_argument("--cnn-sizes", default="1024,2048", help="ResNet-18 UPerNet scene sides (multiples of 64)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_checks: torch sees no CUDA device")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
    res: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    parts = a.parts.split(",")
    from rest_ds.spim.spawn import preload
    preload("timm", "transformers")
    for part in parts:
        try:
            if part == "exact":
                res["exact"] = part_exact(getattr(torch, a.dtype), set(filter(None, a.models.split(","))),
                                          set(filter(None, a.grids.split(","))))
            elif part == "flash":
                res["flash"] = part_flash()
            elif part == "memory":
                res["memory"] = part_memory([int(v) for v in a.sam_sizes.split(",")],
                                            [int(v) for v in a.cnn_sizes.split(",")])
        except Exception:
            traceback.print_exc()
    print("JSON " + json.dumps(res, default=str))
    return res


if __name__ == "__main__":
    main()
