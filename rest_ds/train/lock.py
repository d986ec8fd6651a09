"""One run per output folder: a lock file held by the run's rank 0.

Two runs writing the same ``output_dir`` would interleave their log rows and
overwrite each other's checkpoints. :func:`acquire_run_lock` creates
``<output_dir>/.rest_ds.lock`` with ``O_CREAT | O_EXCL`` (atomic, also on NFS
v3+), holding the holder's host, pid and start time. A second run is refused
with one line naming them. A lock left by a dead process on the same host
(``kill -9``, power loss of a node that rebooted) is taken over with a notice;
a lock from another host cannot be checked from here and is refused (the
message says which file to remove once that run is known to be gone).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

LOCK_NAME = ".rest_ds.lock"


class RunLockError(RuntimeError):
    """The output folder is in use by another run; the message names its host and pid."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc``), to tell a
    live holder from a new process that reuses its pid; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, another user's
        return True
    now = _proc_start(pid)
    return start is None or now is None or now == start


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


class RunLock:
    """A held lock; :meth:`release` (idempotent) removes the file if it is still ours."""

    def __init__(self, path: Path, record: dict):
        self.path, self.record = path, record

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("token") == self.record["token"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_run_lock(out_dir: str | os.PathLike, *, log: Callable[[str], None] | None = None) -> RunLock:
    """Lock ``out_dir`` (created if needed) for this process; raises
    :class:`RunLockError` when another live run holds it. Call on one rank only."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    host, pid = socket.gethostname(), os.getpid()
    record = {"host": host, "pid": pid, "proc_start": _proc_start(pid), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "token": f"{host}:{pid}:{time.time_ns()}"}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                held = json.loads(path.read_text())
            except (OSError, ValueError):
                held = None
            if held is None:  # being written right now, or garbage: look again shortly
                time.sleep(0.2)
                try:
                    held = json.loads(path.read_text())
                except FileNotFoundError:
                    continue
                except (OSError, ValueError):
                    held = {}
            held = held if isinstance(held, dict) else {}
            h, p = held.get("host"), held.get("pid")
            if not held and _age(path) > 60:   # empty or unreadable for a minute: its writer died at once
                if log:
                    log(f"notice: {path}: taking over an unreadable lock file, {_age(path):.0f} s old")
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                continue
            if h == host and isinstance(p, int) and p > 0 and not _alive(p, held.get("proc_start")):
                if log:
                    log(f"notice: {path}: taking over the lock of run pid {p} on {h} (since {held.get('since')}), "
                        f"which is no longer running")
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                continue
            raise RunLockError(f"{out}: output folder in use by another run (host {h or '?'}, pid {p or '?'}, "
                               f"since {held.get('since', '?')}; lock {path}): give this run another output_dir, "
                               f"or wait for that one; if it is gone, remove {path}")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record) + "\n")
        return RunLock(path, record)
    raise RunLockError(f"{path}: could not take the output folder's lock (another run keeps taking it)")


__all__ = ["acquire_run_lock", "RunLock", "RunLockError", "LOCK_NAME"]
