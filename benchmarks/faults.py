"""Fault injection: bad inputs and crashes, as a new user or a cluster would cause them.

Runs each case with the real ``rest-ds`` command on a SYNTHETIC scene
(``rest-ds data synthetic``, 4 bands, 64 x 64) and a tiny ViT + UPerNet on CPU
(gloo), and prints a table: case -> outcome (exit status and the first error
or notice line), seconds until that clear outcome, and what was lost. Ranks of
the multi-rank cases start the way srun starts them (each from RANK /
WORLD_SIZE / MASTER_*, no launcher watching), so a dead or stalled peer must be
noticed by the survivor itself.

    python benchmarks/faults.py [--workdir DIR] [--only SUBSTRING] [--markdown]

About 3-5 minutes on 2 idle cores; timings on a shared machine are longer.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from rest_ds.spim.spawn import free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
TINY_MODEL = {"encoder": {"name": "prithvi_vit",
                          "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "indices": [0, 1]}},
              "decoder": {"name": "upernet", "channels": 16, "norm": "gn", "dropout": 0.0,
                          "kwargs": {"pool_scales": [1, 2]}}}


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", **extra}


def run(args: list[str], cwd: Path, timeout: float = 300, **env) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    p = subprocess.run([str(BIN / "rest-ds"), *args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                       timeout=timeout)
    return p, time.monotonic() - t0


def first_line(text: str, *prefixes: str) -> str:
    for line in text.splitlines():
        if line.startswith(prefixes or ("error:",)):
            return line
    return "(none)"


class Bench:
    def __init__(self, work: Path):
        self.work = work
        self.rows: list[tuple[str, str, float, str]] = []
        p, _ = run(["data", "synthetic", str(work / "scene"), "--format", "tif", "--bands", "4", "--height", "64",
                    "--width", "64", "--classes", "3"], work)
        assert p.returncode == 0, p.stderr
        self.scene = work / "scene" / "scene.yaml"

    def config(self, name: str, **train) -> Path:
        cfg = {"name": name, "output_dir": str(self.work / name), "seed": 0, "model": TINY_MODEL,
               "data": {"scenes": [str(self.scene)], "train_region": None, "val_region": None},
               "deepspeed": {"zero_stage": 2},
               "optimizer": {"name": "adamw", "lr": 3e-3}, "schedule": {"name": "constant", "warmup_steps": 0},
               "train": {"steps": 2, "log_interval": 0, "eval_interval": 0, "checkpoint_interval": 1,
                         "progress": False, **train}}
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def add(self, case: str, outcome: str, seconds: float, lost: str) -> None:
        outcome = outcome.replace(str(self.work), "W")   # W: the work folder
        outcome = outcome if len(outcome) <= 160 else outcome[:157] + "..."
        self.rows.append((case, outcome, seconds, lost))
        print(f"[{len(self.rows):2d}] {case}: {outcome} [{seconds:.1f} s] lost: {lost}", flush=True)

    def ranks(self, cfg: Path, world: int, **env) -> list[subprocess.Popen]:
        port = str(free_port())
        return [subprocess.Popen([sys.executable, "-m", "rest_ds", "train", "--config", str(cfg)], cwd=self.work,
                                 env=_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                          MASTER_PORT=port, **env),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]


def _wait_for(pred, timeout: float, procs=()) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        if any(p.poll() is not None for p in procs):
            return False
        time.sleep(0.02)
    return False


def _steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if (p / "rest_ds.json").is_file()) if root.is_dir() else []


# --- the cases ----------------------------------------------------------------------------------------
def case_bad_inputs(b: Bench) -> None:
    img = b.work / "scene" / "cube.tif"
    before = img.read_bytes()
    m = b.work / "none.safetensors"
    seg = ["segment", "--checkpoint", str(m), "--input", str(img)]
    for case, args in [("segment --output = --input", seg + ["--output", str(img)]),
                       ("segment --probs = --output", seg + ["--output", str(b.work / "o.tif"), "--probs",
                                                            str(b.work / "o.tif")]),
                       ("segment --output map.png", seg + ["--output", str(b.work / "map.png")]),
                       ("segment into an unwritable folder", seg + ["--output", str(img / "x.tif")])]:
        p, s = run(args, b.work)
        b.add(case, f"exit {p.returncode}: {first_line(p.stderr)}", s,
              "nothing (input intact)" if img.read_bytes() == before else "THE INPUT CHANGED")
    bad = b.work / "bad.yaml"
    bad.write_bytes(bytes(range(256)) * 8)
    p, s = run(["data", "info", str(bad)], b.work)
    b.add("data info on a binary file", f"exit {p.returncode}: {first_line(p.stderr)}", s, "nothing")
    nolabel = b.work / "nolabel.yaml"
    nolabel.write_text(f"name: x\nimage: {{path: {img}}}\nclasses: [{{value: 1, name: a}}]\nlabel: null\n")
    p, s = run(["data", "info", str(nolabel)], b.work)
    b.add("data info, classes but label: null", f"exit {p.returncode}: "
          f"{first_line(p.stdout, '  classes:') if p.returncode == 0 else first_line(p.stderr)}", s, "nothing")
    cfg = b.config("unknown_encoder")
    p, s = run(["train", "--config", str(cfg), "model.encoder.name=vit_nonexistent"], b.work)
    b.add("train with an unknown encoder", f"exit {p.returncode}: {first_line(p.stderr)}", s, "nothing")


def case_checkpoints(b: Bench) -> None:
    import torch

    from rest_ds.train.checkpoint import MANIFEST, file_record, safe_torch_load

    cfg = b.config("ck")
    p, s = run(["train", "--config", str(cfg)], b.work)
    assert p.returncode == 0, p.stderr[-2000:]
    out = b.work / "ck"
    # 1. a pickle payload in DeepSpeed's optimizer states (checksums updated, as an attacker would)
    evil = b.work / "evil" / "step_0000002"
    shutil.copytree(out / "checkpoints" / "step_0000002", evil)
    marker = b.work / "PAYLOAD_RAN"
    f = evil / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    obj = safe_torch_load(f)

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    obj["x"] = Payload()
    torch.save(obj, f)
    man = json.loads((evil / MANIFEST).read_text())
    man["files"] = file_record(evil)
    (evil / MANIFEST).write_text(json.dumps(man))
    p, s = run(["export", "--checkpoint", str(evil), "--output", str(b.work / "evil.safetensors")], b.work)
    b.add("export: __reduce__ payload in *_optim_states.pt", f"exit {p.returncode}: {first_line(p.stderr)}", s,
          "nothing; payload did not run" if not marker.exists() else "PAYLOAD RAN")
    p, s = run(["train", "--config", str(cfg), f"train.resume={evil}", "train.steps=3"], b.work)
    b.add("resume: the same payload", f"exit {p.returncode}: {first_line(p.stderr)}", s,
          "nothing; payload did not run" if not marker.exists() else "PAYLOAD RAN")
    # 2. resume with changed settings
    p, s = run(["train", "--config", str(cfg), "train.steps=3", "optimizer.lr=0.5"], b.work)
    b.add("resume with optimizer.lr=0.5", f"exit {p.returncode}: {first_line(p.stdout, 'notice:')}", s, "nothing")
    p, s = run(["train", "--config", str(cfg), "train.steps=4", "model.decoder.channels=8"], b.work)
    b.add("resume with another model", f"exit {p.returncode}: {first_line(p.stderr)}", s, "nothing")
    # 3. a truncated file in the latest checkpoint
    f = out / "checkpoints" / "step_0000003" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    p, s = run(["export", "--checkpoint", str(f.parent), "--output", str(b.work / "t.safetensors")], b.work)
    b.add("export of a truncated checkpoint file", f"exit {p.returncode}: {first_line(p.stderr)}", s, "nothing")
    p, s = run(["train", "--config", str(cfg), "train.steps=4"], b.work)
    b.add("resume=auto, latest checkpoint truncated", f"exit {p.returncode}: {first_line(p.stdout, 'notice:')}", s,
          "step 3 (redone from step 2)")


def case_two_runs_and_kill_during_save(b: Bench) -> None:
    cfg = b.config("busy", steps=100000, checkpoint_interval=1)
    out = b.work / "busy"
    first = subprocess.Popen([str(BIN / "rest-ds"), "train", "--config", str(cfg)], cwd=b.work, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: (out / "checkpoints" / "latest").is_file(), 300, [first])
        p, s = run(["train", "--config", str(cfg)], b.work)
        b.add("second run on the same output_dir", f"exit {p.returncode}: {first_line(p.stderr)}", s,
              "nothing (first run unaffected)" if first.poll() is None else "the first run died")
        # kill -9 while a checkpoint is being written (its files are in .partial/)
        part = out / "checkpoints" / ".partial"
        hit = _wait_for(lambda: part.is_dir() and any(d.is_dir() and any(d.iterdir()) for d in part.iterdir()), 60,
                        [first])
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    done = _steps(out)
    t0 = time.monotonic()
    p, s = run(["train", "--config", str(cfg), f"train.steps={done[-1] + 1}"], b.work)
    took_over = "taking over the lock" in p.stderr
    b.add("kill -9 during a checkpoint save, then resume=auto",
          f"exit {p.returncode}: resumed at step {done[-1]}{', stale lock taken over' if took_over else ''}"
          f"{'' if hit else ' (the kill missed the save window)'}", time.monotonic() - t0,
          "the checkpoint being written; earlier ones intact")


def case_dead_and_stalled_rank(b: Bench) -> None:
    for case, sig in (("kill -9 of rank 1 (2 ranks, no launcher)", signal.SIGKILL),
                      ("rank 1 stalled (SIGSTOP), 20 s collective timeout", signal.SIGSTOP)):
        name = "dead" if sig == signal.SIGKILL else "stalled"
        cfg = b.config(name, steps=100000, checkpoint_interval=5)
        out = b.work / name
        cfg_d = yaml.safe_load(cfg.read_text())
        cfg_d["mesh"] = {"grid": "1x2"}
        cfg.write_text(yaml.safe_dump(cfg_d))
        procs = b.ranks(cfg, 2, REST_DS_COLLECTIVE_TIMEOUT="20")
        try:
            ok = _wait_for(lambda: (out / "checkpoints" / "latest").is_file(), 300, procs)
            t0 = time.monotonic()
            procs[1].send_signal(sig)
            try:
                _, err = procs[0].communicate(timeout=200)
                outcome = f"rank 0 exit {procs[0].returncode}: {first_line(err)}"
            except subprocess.TimeoutExpired:
                outcome = "rank 0 STILL WAITING after 200 s"
            secs = time.monotonic() - t0
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                p.wait()
        if not ok:
            outcome = "the run did not start"
        last = _steps(out)[-1] if _steps(out) else None
        b.add(case, outcome, secs, f"the steps after the last checkpoint (step {last}), which resume=auto redoes")


CASES = [case_bad_inputs, case_checkpoints, case_two_runs_and_kill_during_save, case_dead_and_stalled_rank]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary folder, removed)")
    ap.add_argument("--only", help="run the case functions whose name contains this")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the README)")
    a = ap.parse_args()
    tmp = None
    if a.workdir is None:
        tmp = tempfile.mkdtemp(prefix="rest_ds_faults_")
        work = Path(tmp)
    else:
        work = a.workdir
        work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        b = Bench(work)
        for fn in CASES:
            if a.only is None or a.only in fn.__name__:
                fn(b)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{len(b.rows)} cases in {time.monotonic() - t0:.0f} s\n")
    if a.markdown:
        print("| case | outcome | s | lost |\n|---|---|---:|---|")
        for case, outcome, s, lost in b.rows:
            print(f"| {case} | {outcome.replace('|', '/')} | {s:.1f} | {lost} |")
    else:
        w = max(len(r[0]) for r in b.rows)
        for case, outcome, s, lost in b.rows:
            print(f"{case:<{w}}  {s:6.1f} s  {outcome}  [lost: {lost}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
