"""Cost of SPIM's grid-invariant dropout (rest_ds/spim/rng.py) against torch's own.

Both run on a plain tensor in one process: ``F.dropout`` as torch runs it, and
the same call inside ``rng.grid_invariant()``, where the mask is computed from
(seed, global element index) by the counter-based generator (int64 torch ops,
a cache-sized chunk at a time). On a tile the work is the same, plus the tile's
index offsets. The machine may be shared: compare the ratio, not the times. Prints the
median time of each over several runs and their ratio, forward alone and
forward + backward.

    python benchmarks/dropout_rng.py [--shape 2,64,256,256] [--device cpu|cuda] [--repeats 15]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from rest_ds.spim import rng


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="2,64,256,256")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.shape.split(","))
    x = torch.randn(shape, device=device, dtype=getattr(torch, args.dtype), requires_grad=True)
    g = torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            F.dropout(x, args.p, training=True)

    def fwd_bwd():
        F.dropout(x, args.p, training=True).backward(g)

    def invariant(fn):
        def run():
            with rng.grid_invariant():
                fn()
        return run

    print(f"dropout p={args.p} on {tuple(shape)} {args.dtype} ({x.numel() / 1e6:.1f} M elements), {device}, "
          f"threads {torch.get_num_threads()}, median of {args.repeats}")
    for name, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
        t_torch = _time(fn, args.repeats, device)
        t_inv = _time(invariant(fn), args.repeats, device)
        print(f"  {name:<17} torch {t_torch * 1e3:8.2f} ms   grid-invariant {t_inv * 1e3:8.2f} ms   "
              f"ratio {t_inv / t_torch:5.2f}")


if __name__ == "__main__":
    main()
