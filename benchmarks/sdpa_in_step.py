"""Scaled-dot-product attention inside the SPIM step (issue 12): runs
``step_overhead.py``'s ranks (main job's model, 1x2 grid, 256 x 256 tiles) with
``F.scaled_dot_product_attention`` wrapped, and reports per rank, for each
(shape, strides, grad_out strides, backward node, storage size, threads) the kernel
saw: forward thread CPU, and the backward node's thread CPU (and wall) measured
between the node's pre- and post-hooks. Then, in the same process after the steps,
re-times forward + backward on the captured tensors (same storage and strides) and
on contiguous copies.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/sdpa_in_step.py [steps]``."""
import os, sys, time, statistics
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE)); sys.path.insert(0, _HERE)
import torch, torch.nn.functional as F

def probed_rank_main(args):
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
            def post(gi, go):
                r["bwd"] = time.thread_time() - st["t"]; r["bwdw"] = time.perf_counter() - st["w"]
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
        summ[key]["fwd"].append(r["fwd"]); summ[key]["bwd"].append(r["bwd"])
    lines = []
    for key, d in summ.items():
        lines.append(f"in-step {key}: n={len(d['fwd'])} fwd {statistics.median(d['fwd'])*1e3:.3f} ms bwd-node {statistics.median(d['bwd'])*1e3:.3f} ms (wall median {statistics.median(d['bwdw'])*1e3:.3f} max {max(d['bwdw'])*1e3:.3f})")
    # re-time the exact captured tensors (same storage/strides) outside the step
    seen = {}
    for r in rec:
        if "saved" in r and r["nk"] not in seen:
            seen[r["nk"]] = r
    def timeit(fn, n=20):
        for _ in range(3): fn()
        ts = []
        for _ in range(n):
            t = time.thread_time(); fn(); ts.append(time.thread_time() - t)
        return statistics.median(ts) * 1e3
    for nk, r in seen.items():
        q, k, v = (x.detach() for x in r["saved"])
        gos = r["gos"]
        for label, (qq, kk, vv) in (("captured", (q, k, v)), ("contig", (q.contiguous(), k.contiguous(), v.contiguous()))):
            qq, kk, vv = (x.clone() if label=="contig" else x for x in (qq, kk, vv))
            qq = qq.requires_grad_() if label == "contig" else q.requires_grad_()
            kk.requires_grad_(); vv.requires_grad_()
            def f():
                o = orig(qq, kk, vv)
                g = torch.empty_strided(o.shape, gos).normal_() if gos else torch.randn(o.shape)
                o.backward(g)
            fw = timeit(lambda: orig(qq.detach(), kk.detach(), vv.detach()))
            lines.append(f"out-of-step nk={nk} {label}: fwd {fw:.3f} ms fwd+bwd {timeit(f):.3f} ms")
    return {"spim": out.get("spim"), "plain": out.get("plain"), "lines": lines}

if __name__ == "__main__":
    from rest_ds.spim.spawn import spawn
    import step_overhead as so
    a = {"config": so.CONFIG, "tile": 256, "steps": int(sys.argv[1]) if len(sys.argv) > 1 else 3, "warmup": 1,
         "profile": 0, "pingpong": False, "transport": "shm", "top": 5}
    outs = spawn(probed_rank_main, 2, a, timeout_s=900)
    for i, o in enumerate(outs):
        print(f"rank {i}: step CPU spim {o['spim']:.3f} s plain {o['plain']:.3f} s")
        for l in o["lines"]: print("  ", l)
