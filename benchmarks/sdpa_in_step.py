"""Scaled-dot-product attention inside the SPIM step (issue 12): runs
``step_overhead.py``'s ranks (main job's model, 1x2 grid, 256 x 256 tiles) with
``F.scaled_dot_product_attention`` wrapped, and reports per rank, for each
(shape, strides, grad_out strides, backward node, storage size, threads) the kernel
saw: forward thread CPU, and the backward node's thread CPU, wall and involuntary
context switches measured between the node's pre- and post-hooks. Then, in the same
process after the steps, re-times forward + backward (interleaved, thread CPU) on the
captured tensors (same storage and strides), with q made contiguous, and with q, k, v
all contiguous, each with grad_out in the step's layout.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/sdpa_in_step.py [steps]``."""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

def probed_rank_main(args: dict) -> dict:
    """``step_overhead.rank_main`` with every plain-tensor SDPA call recorded; returns report lines."""
    import step_overhead as so
    orig = F.scaled_dot_product_attention
    rec = []
    def wrapper(q, k, v, *a, **kw):
        if type(q) is not torch.Tensor:  # SpatialTensor level: dispatch goes on to the local call
            return orig(q, k, v, *a, **kw)
        t = time.thread_time()
        o = orig(q, k, v, *a, **kw)
        r = {"nq": q.shape[2], "nk": k.shape[2], "fwd": time.thread_time() - t,
             "qs": q.stride(), "ks": k.stride(), "vs": v.stride(), "kbase": k.untyped_storage().nbytes() // 4,
             "grad_fn": type(o.grad_fn).__name__ if o.grad_fn is not None else None, "threads": torch.get_num_threads()}
        rec.append(r)
        if o.grad_fn is not None:
            st = {}
            def pre(go):  # grad_out reaches the node: start its clock
                r["gos"] = go[0].stride(); st["t"] = time.thread_time(); st["w"] = time.perf_counter()
                st["cs"] = resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw
            def post(gi, go):
                r["bwd"] = time.thread_time() - st["t"]; r["bwdw"] = time.perf_counter() - st["w"]
                r["csw"] = resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw - st["cs"]
            o.grad_fn.register_prehook(pre); o.grad_fn.register_hook(post)
            r["saved"] = (q, k, v)
        return o
    F.scaled_dot_product_attention = wrapper
    out = so.rank_main(args)
    F.scaled_dot_product_attention = orig
    # summary per kind
    summ = {}
    for r in rec:
        if "bwd" not in r: continue
        key = (r["nq"], r["nk"], r["qs"], r["ks"], r["vs"], r.get("gos"), r["grad_fn"], r["kbase"], r["threads"])
        summ.setdefault(key, {"fwd": [], "bwd": [], "bwdw": []}); summ[key]["bwdw"].append(r["bwdw"])
        summ[key].setdefault("csw", []).append(r["csw"])
        summ[key]["fwd"].append(r["fwd"]); summ[key]["bwd"].append(r["bwd"])
    lines = []
    for key, d in summ.items():
        med = {k: statistics.median(d[k]) * 1e3 for k in ("fwd", "bwd", "bwdw")}
        lines.append(f"in-step {key}: n={len(d['fwd'])} fwd {med['fwd']:.3f} ms bwd-node {med['bwd']:.3f} ms "
                     f"(wall median {med['bwdw']:.3f} max {max(d['bwdw']) * 1e3:.3f}; "
                     f"involuntary context switches per call {statistics.mean(d['csw']):.2f})")
    # re-time the exact captured tensors (same storage/strides) outside the step
    seen = {}
    for r in rec:
        if "saved" in r and r["nk"] not in seen:
            seen[r["nk"]] = r

    def variants(r):
        """(label, q, k, v): the captured tensors (same storage and strides), q alone made
        contiguous, and all three contiguous, as leaves that require grad."""
        q, k, v = (x.detach() for x in r["saved"])
        for label, ts in (("captured", (q, k, v)), ("q-contig", (q.contiguous(), k, v)),
                          ("all-contig", (q.contiguous(), k.contiguous(), v.contiguous()))):
            yield label, [x.detach().requires_grad_() for x in ts]  # detach keeps storage and strides

    for nk, r in seen.items():
        cases = list(variants(r))
        o = orig(*(t.detach() for t in cases[0][1]))
        g = torch.empty_strided(o.shape, r["gos"]).normal_()  # grad_out in the layout the step hands in
        times = {label: [] for label, _ in cases}
        for rep in range(23):  # round-robin so load drifts hit every variant alike
            for label, ts in cases:
                t = time.thread_time()
                orig(*ts).backward(g)
                if rep >= 3:
                    times[label].append(time.thread_time() - t)
        lines.append(f"out-of-step nk={nk} fwd+bwd: " + ", ".join(
            f"{label} {statistics.median(v) * 1e3:.3f} ms" for label, v in times.items()))
    return {"spim": out.get("spim"), "plain": out.get("plain"), "lines": lines}


if __name__ == "__main__":
    from rest_ds.spim.spawn import spawn
    import step_overhead as so
    a = {"config": so.CONFIG, "tile": 256, "steps": int(sys.argv[1]) if len(sys.argv) > 1 else 3, "warmup": 1,
         "profile": 0, "pingpong": False, "transport": "shm", "top": 5}
    outs = spawn(probed_rank_main, 2, a, timeout_s=900)
    for i, o in enumerate(outs):
        print(f"rank {i}: step CPU spim {o['spim']:.3f} s plain {o['plain']:.3f} s")
        for line in o["lines"]:
            print("  ", line)
