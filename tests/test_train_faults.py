"""Faults: a rank that raises ends the whole job with its message (no hang);
a crash during a checkpoint or export write never leaves something that loads.

The failing rank is real: the scene's image holds a NaN in one pixel of rank
1's tile and is not scanned up front (``data.scan: false``, statistics given),
so only rank 1 notices, when it reads its tile of the first batch; rank 0 is
then waiting in a collective.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.harness import BIN, ROOT, free_port, launch
from tests.train_scene import make_scene, tiny_config, write_config


def _bad_scene_config(d: Path) -> Path:
    scene = make_scene(d / "scene", stats=True, nan_at=(20, 80))   # column 80: rank 1's tile of a 1x2 grid
    cfg = tiny_config(scene, d / "run")
    cfg["data"]["scan"] = False
    cfg["mesh"] = {"grid": "1x2"}
    return write_config(d / "bad.yaml", cfg)


@pytest.mark.slow
@pytest.mark.launcher
@pytest.mark.timeout(600)
def test_failing_rank_ends_the_launcher_job(tmp_path):
    cfg = _bad_scene_config(tmp_path)
    p, secs = launch(["train", "--config", str(cfg)], tmp_path, timeout=500,
                     env={"REST_DS_COLLECTIVE_TIMEOUT": "120"})
    print(f"launcher fault run: rc {p.returncode} in {secs:.1f} s")
    assert p.returncode != 0
    err = p.stderr
    assert "error: rank 1: DataError" in err and "NaN at band 0, pixel (row 20, col 80)" in err, err[-3000:]
    # rank 0 is stopped by the launcher, or first sees its collective fail: then it says so
    assert "rank 0:" not in err or "another rank stopped" in err
    assert "done:" not in p.stdout


@pytest.mark.slow
@pytest.mark.launcher
@pytest.mark.timeout(600)
def test_failing_rank_without_launcher_ends_within_collective_timeout(tmp_path):
    """srun-style start (each rank from the environment, nobody watching): the
    waiting rank's collective fails or times out, it reports and exits."""
    cfg = _bad_scene_config(tmp_path)
    port = str(free_port())
    timeout = 60
    procs = []
    t0 = time.monotonic()
    for r in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RANK": str(r), "WORLD_SIZE": "2",
               "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "REST_DS_COLLECTIVE_TIMEOUT": str(timeout)}
        procs.append(subprocess.Popen([sys.executable, "-m", "rest_ds", "train", "--config", str(cfg)], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=500) for p in procs]
    secs = time.monotonic() - t0
    print(f"no-launcher fault run: rc {[p.returncode for p in procs]} in {secs:.1f} s")
    assert procs[1].returncode != 0 and "error: rank 1: DataError" in outs[1][1], outs[1][1][-3000:]
    assert procs[0].returncode != 0 and "error: rank 0:" in outs[0][1], outs[0][1][-3000:]
    assert "another rank stopped or timed out" in outs[0][1]
    # start-up (imports, DeepSpeed set-up) plus at most the collective timeout, not a hang
    assert secs < 400


# --- atomic checkpoints ------------------------------------------------------------------------------
class _FakeEngine:
    """Writes files as DeepSpeed would; ``fail`` raises in the middle of a save."""

    def __init__(self):
        self.fail = False

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
        if self.fail:
            raise OSError("disk full (simulated crash mid-save)")
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"y" * 100)
        (Path(save_dir) / "zero_to_fp32.py").write_text("# script")


def _save(engine, root, step):
    from rest_ds.train.checkpoint import save_checkpoint

    return save_checkpoint(engine, root, step, {"world_size": 1, "zero_stage": 2}, {"torch_rng": torch.get_rng_state()},
                           rank=0, barrier=lambda: None, keep=2)


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path):
    from rest_ds.train.checkpoint import CheckpointError, find_checkpoint, list_checkpoints

    root = tmp_path / "checkpoints"
    eng = _FakeEngine()
    _save(eng, root, 2)
    eng.fail = True
    with pytest.raises(CheckpointError, match=r"step_0000004: saving the checkpoint of step 4 failed: disk full \(sim"):
        _save(eng, root, 4)
    assert not (root / ".partial" / "step_0000004").exists()        # the half-written one is removed
    assert [s for s, _ in list_checkpoints(root)] == [2]
    _, tag, man = find_checkpoint(root)
    assert tag == "step_0000002" and man["step"] == 2
    # a crash after the rename but before 'latest' was replaced: 'latest' still names step 2
    eng.fail = False
    _save(eng, root, 4)
    assert not (root / ".partial" / "step_0000004").exists() and (root / "zero_to_fp32.py").is_file()
    _, tag, _ = find_checkpoint(root)
    assert tag == "step_0000004"
    # a folder without a manifest is never loaded, even when 'latest' names it
    (root / "step_0000006").mkdir()
    (root / "latest").write_text("step_0000006")
    _, tag, _ = find_checkpoint(root)
    assert tag == "step_0000004"
    _save(eng, root, 8)
    assert [s for s, _ in list_checkpoints(root)] == [4, 8]                # keep=2


def test_disk_full_mid_save_is_named_and_frees_the_partial(tmp_path, monkeypatch):
    """A full disk mid-save ended in torch's 'RuntimeError: [enforce fail at inline_container.cc:672] .
    unexpected pos 17728 vs 17632' (seen on a 400 KiB tmpfs) and left the half-written checkpoint
    filling the disk; now one CheckpointError says the disk is full, the partial is removed and
    the complete checkpoint stays the latest."""
    import shutil
    from collections import namedtuple

    from rest_ds.train.checkpoint import CheckpointError, find_checkpoint

    class Full(_FakeEngine):
        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
            (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
            if self.fail:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 17728 vs 17632")

    root = tmp_path / "checkpoints"
    eng = Full()
    _save(eng, root, 2)
    eng.fail = True
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(400 << 10, 396 << 10, 4096))
    with pytest.raises(CheckpointError, match="step_0000004: no space left on the device while saving the "
                                              "checkpoint of step 4; the incomplete checkpoint was removed"):
        _save(eng, root, 4)
    assert not (root / ".partial" / "step_0000004").exists()
    assert find_checkpoint(root)[1] == "step_0000002"


def test_export_pair_is_checked(tmp_path):
    from rest_ds.train.checkpoint import CheckpointError, export_model, read_export

    sd = {"w": torch.randn(3, 4), "b": torch.zeros(3)}
    out, js = export_model(sd, {"num_classes": 3}, tmp_path / "m.safetensors")
    meta, back = read_export(out)
    assert meta["num_classes"] == 3 and torch.equal(back["w"], sd["w"])
    assert not list(tmp_path.glob(".*tmp"))
    export_model({"w": torch.ones(3, 4), "b": torch.zeros(3)}, {"num_classes": 3}, tmp_path / "other.safetensors")
    os.replace(tmp_path / "other.safetensors", out)                          # weights of another export
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        read_export(out)
    js.unlink()
    with pytest.raises(CheckpointError, match="m.json: missing"):
        read_export(out)


@pytest.mark.slow
@pytest.mark.launcher
@pytest.mark.timeout(300)
def test_sigkill_of_the_launch_script_stops_its_ranks(tmp_path):
    """A SIGKILL of launch/deepspeed_single_node.sh cannot be trapped; its watchdog still ends the job (it
    trained on, orphaned, holding the output folder's lock, so the user's resume was refused)."""
    import signal

    from tests.harness import _env

    scene = make_scene(tmp_path / "scene")
    cfg = tiny_config(scene, tmp_path / "run")
    cfg["train"].update(steps=100000, checkpoint_interval=0, eval_interval=0, log_interval=1)
    path = write_config(tmp_path / "long.yaml", cfg)
    log = tmp_path / "log.txt"

    def job() -> list[int]:  # every process of this launch: the runner, deepspeed.launcher.launch, the ranks
        out = subprocess.run(["pgrep", "-f", str(path)], capture_output=True, text=True).stdout
        return [int(x) for x in out.split()]

    with open(log, "w") as f:
        p = subprocess.Popen(["bash", str(ROOT / "launch" / "deepspeed_single_node.sh"), "2", str(path)], cwd=tmp_path,
                             env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "step 2/100000" not in log.read_text():
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert len(job()) >= 4
        p.kill()
        p.wait()
        t0 = time.monotonic()
        while job() and time.monotonic() - t0 < 30:
            time.sleep(0.5)
        left = job()
        print(f"SIGKILL of the launch script: job gone after {time.monotonic() - t0:.1f} s")
        assert left == [], f"still running after the launch script was killed: {left}"
    finally:
        for pid in job():  # this test's own processes only (their command line names its config)
            os.kill(pid, signal.SIGKILL)
