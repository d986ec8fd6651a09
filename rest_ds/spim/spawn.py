"""Run a function on N local ranks (CPU processes on gloo) and collect results.

For tests, ``verify`` and benchmarks on one machine. Children come from a
forkserver that has already imported torch, so a rank starts in well under a
second. If any rank raises, the others are terminated at once and
:class:`RankError` carries the failing rank's message and traceback; a rank
that hangs is killed after ``timeout_s``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable


class RankError(RuntimeError):
    """A rank raised; ``rank``, ``exc_type`` and ``message`` say which and what."""

    def __init__(self, rank: int, exc_type: str, message: str, tb: str):
        super().__init__(f"rank {rank} failed: {exc_type}: {message}\n{tb}")
        self.rank, self.exc_type, self.message, self.tb = rank, exc_type, message, tb


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, kwargs, q, threads, timeout_s):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(threads))
    import torch
    import torch.distributed as dist

    from .mesh import init_distributed

    torch.set_num_threads(threads)
    try:
        init_distributed("gloo", timeout_s=timeout_s)
        out = fn(*args, **kwargs)
        # plain pickle (tensors copied by value): the queue's own reducers would pass
        # tensors as shared-memory handles that die with this process
        q.put((rank, "ok", pickle.dumps(out)))
    except BaseException as e:  # report everything, including SystemExit from a CLI body
        q.put((rank, "err", (type(e).__name__, str(e), traceback.format_exc())))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


_CTX = None
_PRELOAD = ["torch", "rest_ds.spim"]


def preload(*modules: str) -> None:
    """Modules the forkserver imports once for all ranks it will start (e.g.
    "timm"); effective only before the first :func:`spawn` of the process."""
    _PRELOAD.extend(m for m in modules if m not in _PRELOAD)


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(_PRELOAD)
    return _CTX


def spawn(fn: Callable, world: int, *args, threads: int = 1, timeout_s: float = 600.0,
          collective_timeout_s: float = 120.0, **kwargs) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world`` gloo ranks; return each rank's result.

    ``fn`` must be importable (module level) and its results picklable."""
    ctx = _context()
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, kwargs, q, threads, collective_timeout_s),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world:
            try:
                rank, status, payload = q.get(timeout=1.0)
            except queue_mod.Empty:
                # nothing queued for a second: a rank that has exited without a result never will report
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead:
                    raise RankError(dead[0], "ProcessDied", f"exited with code {procs[dead[0]].exitcode} "
                                    "without reporting a result", "")
                if time.monotonic() > deadline:
                    raise RankError(-1, "Timeout", f"ranks {sorted(set(range(world)) - set(results))} "
                                    f"did not finish within {timeout_s:.0f} s", "")
                continue
            if status == "err":
                raise RankError(rank, *payload)
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            if p.is_alive() and len(results) < world:
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
