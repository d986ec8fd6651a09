"""``rest-ds plan``'s step time against measured ``rest-ds bench`` runs.

For every run of the given bench JSON files: the planner's prediction for the
same config, scene, grid, ranks and ZeRO stage (:func:`rest_ds.train.plan.estimate`
on the config's profile, measured once per config in this process, as ``rest-ds
plan`` does), its parts (compute, optimizer, SPIM, DeepSpeed's collectives),
and the error against the run's wall-clock step and against its main-thread CPU
time (the sum of ``phases_cpu_s``: steadier on a shared machine). With
``--calibrate`` the coefficients are first fitted to those bench files
(:func:`rest_ds.train.plan.calibrate_from_bench`; ``--calibrate-real``: only
their runs on the configs' real scenes), else the defaults are used; calibrate
on some runs and read the errors on the others::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/plan_vs_bench.py \\
        --calibrate runs/bench_vit/bench.json runs/bench_cnn/bench.json --calibrate-real \\
        runs/bench_vit/bench.json runs/bench_cnn/bench.json runs/held_out/bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("benches", nargs="+", metavar="BENCH_JSON", help="runs to predict")
    ap.add_argument("--calibrate", nargs="*", default=[], metavar="BENCH_JSON", help="fit the coefficients to these")
    ap.add_argument("--calibrate-real", action="store_true", help="calibrate on the real-scene runs only")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # the probes' thread CPU time, as rest-ds plan under OMP_NUM_THREADS=1
    from rest_ds.train.config import load_config
    from rest_ds.train.plan import calibrate_from_bench, estimate, profile_config
    from rest_ds.train.preflight import preflight

    def profile_of(path: str):
        cfg = load_config(path)
        info = preflight(cfg, 1)
        return profile_config(cfg, info["in_chans"], info["num_classes"]), cfg

    coeffs: dict = {}
    if a.calibrate:
        runs = [r for b in a.calibrate for r in json.load(open(b))["runs"]
                if not (a.calibrate_real and r["scene"].get("synthetic"))]
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "bench.json")
            with open(path, "w") as f:
                json.dump({"schema": 1, "runs": runs}, f)
            coeffs = calibrate_from_bench(path, profile_of)
        print("calibrated on", len(runs), "runs:", {k: float(f"{v:.4g}") for k, v in coeffs.items()})
    errs, cpu_errs = [], []
    for b in a.benches:
        for r in json.load(open(b))["runs"]:
            prof, cfg = profile_of(r["config"])
            e = estimate(prof, hw=(r["scene"]["height"], r["scene"]["width"]), grid=tuple(r["grid"]),
                         world=r["ranks"], zero_stage=r["zero_stage"], optimizer=cfg.optimizer.name,
                         momentum=cfg.optimizer.momentum, precision=cfg.deepspeed.precision,
                         act_ckpt=cfg.train.activation_checkpointing, bucket=cfg.deepspeed.reduce_bucket_size,
                         coeffs=coeffs)
            cpu = sum(v for v in (r.get("phases_cpu_s") or {}).values() if v)
            err, cpu_err = e["step_s"] / r["step_s"] - 1, (e["step_s"] / cpu - 1 if cpu else float("nan"))
            errs.append(abs(err))
            cpu_errs.append(abs(cpu_err))
            parts = " ".join(f"{k} {v:.3f}" for k, v in e["time_parts"].items())
            print(f"{b}: {r['config_name']} {r['scene']['height']}x{r['scene']['width']} dp{r['dp']} "
                  f"{r['grid'][0]}x{r['grid'][1]} ZeRO-{r['zero_stage']}: measured {r['step_s']:.3f} s "
                  f"(CPU {cpu:.3f}), predicted {e['step_s']:.3f} ({err:+.1%}; CPU {cpu_err:+.1%}) [{parts}]")
    print(f"|error| over {len(errs)} runs: median {statistics.median(errs):.1%}, max {max(errs):.1%} "
          f"(against CPU time: median {statistics.median(cpu_errs):.1%}, max {max(cpu_errs):.1%})")


if __name__ == "__main__":
    main()
