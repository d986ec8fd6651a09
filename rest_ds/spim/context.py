"""The state of a parallelized model's forward, found by the ops that run inside it.

State model: :func:`~rest_ds.spim.parallelize.parallelize` creates one
:class:`SPIMRun` per model (held as ``model._spim_run``). The model's root
forward pre-hook *enters* it and the root post-hook (always called, so an
exception leaves it too) *leaves* it; a submodule called outside its root's
forward (a checkpointed block recomputed in backward) enters it for that call.
Ops find the run being executed with :func:`current`: the innermost entered
run of this thread (a ``ContextVar`` holding an immutable stack), so two
parallelized models, run interleaved or one inside the other's forward, each
see only their own state. Nothing in this module is mutable process-wide
state.

A run holds:

* the module path stack, for error messages: a refusal raised inside an op
  reads ``module 'decode_head.ppm.1' (Conv2d): ...`` (:func:`where`,
  :func:`unsupported`); outside any run, "outside any module";
* the model's ``attention`` setting (:func:`attention`; 'auto' outside runs);
* the partitions of the sharded tensors created in this forward
  (:func:`note_layout`, :func:`layout_for`; ops/resample.py);
* what is switched on while the model computes (``modes``: the
  autograd.Function guard, the routing of replicated resampling).

Known limit: a forward interrupted by a ``BaseException`` that is not an
``Exception`` (KeyboardInterrupt) skips torch's always-called hooks and leaves
the run entered in that thread.
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Callable

from .errors import SPIMUnsupportedError

# Layout keys: (axis 0=rows/1=cols, number of tiles, global size).
LayoutKey = tuple[int, int, int]


class SPIMRun:
    """The per-model state of one parallelized model (see the module docstring).

    ``attention`` is fixed at ``parallelize``; ``frames`` (module path stack:
    ``(dotted path, type name, the context managers this frame entered with the
    run, or None)``) and ``layouts`` are per forward: cleared when the root
    forward starts. ``modes``: factories of context managers (torch function
    modes, the autograd.Function guard) entered with the run each time it is
    entered and exited when it is left, so they are active exactly while the
    model computes, in a checkpoint recompute too."""

    def __init__(self, attention: str = "auto", modes: tuple[Callable[[], Any], ...] = (), mesh: Any = None):
        self.attention = attention
        self.mesh = mesh  # the model's SpatialMesh (rules that route plain tensors shard over it)
        self.modes = tuple(modes)
        self.frames: list[tuple[str, str, list | None]] = []
        # First one wins: resampling reuses them so that an upsampled map lines up
        # with the map of that size it is added to or concatenated with. Built from
        # global information only, so identical on every rank.
        self.layouts: dict[LayoutKey, tuple[int, ...]] = {}
        # the (rows, cols) partition objects noted last: noting them again changes nothing
        # (first one wins), and every wrap of this forward notes its layout
        self.noted: tuple | None = None

    def push(self, path: str, type_name: str, *, fresh: bool = False) -> bool:
        """Enter module ``path`` (``fresh``: the root's forward starts: forget the last
        forward's frames and layouts). Enters the run too when it is not the current one;
        returns whether it did."""
        runs = _RUNS.get()
        entered = not runs or runs[-1] is not self  # current() is not self, inlined: every module call
        if fresh:
            self.frames.clear()
            self.layouts.clear()
            self.noted = None
        ctxs = None
        if entered:
            _RUNS.set(_RUNS.get() + (self,))
            ctxs = []
            for make in self.modes:
                c = make()
                c.__enter__()
                ctxs.append(c)
        self.frames.append((path, type_name, ctxs))
        return entered

    def pop(self, path: str) -> bool:
        """Leave module ``path``: drop its frame (and any inner ones an exception left
        behind) and leave the run if that frame entered it. Returns whether the run was
        left. A call whose frame is not on the stack (its pre-hook never ran) does nothing."""
        frames = self.frames
        if frames and frames[-1][0] == path and frames[-1][2] is None:  # the common case
            frames.pop()
            return False
        for i in range(len(self.frames) - 1, -1, -1):
            if self.frames[i][0] == path:
                ctxs = self.frames[i][2]
                del self.frames[i:]
                if ctxs is None:
                    return False
                for c in reversed(ctxs):
                    c.__exit__(None, None, None)
                runs = _RUNS.get()
                # the innermost occurrence (normally the top: inner runs have left already)
                j = max((k for k, r in enumerate(runs) if r is self), default=None)
                if j is not None:
                    _RUNS.set(runs[:j] + runs[j + 1:])
                return True
        return False

    def where(self) -> str:
        if not self.frames:
            return "outside any module"
        path, type_name, _ = self.frames[-1]
        return f"module '{path or '<root>'}' ({type_name})"


# The runs entered in this thread/context, innermost last (an immutable tuple:
# set() replaces it, so no state is shared between threads).
_RUNS: ContextVar[tuple[SPIMRun, ...]] = ContextVar("rest_ds_spim_runs", default=())


def current() -> SPIMRun | None:
    """The run being executed in this thread (the innermost), or None outside any."""
    runs = _RUNS.get()
    return runs[-1] if runs else None


def attention() -> str:
    """The current run's sequence-parallel attention algorithm ('auto' outside runs)."""
    run = current()
    return run.attention if run is not None else "auto"


def note_layout(rows: tuple[int, ...], cols: tuple[int, ...]) -> None:
    """Record the row and column partitions of a sharded tensor in the current run
    (nothing outside a run)."""
    runs = _RUNS.get()  # current(), inlined: every wrap calls this
    if runs:
        run = runs[-1]
        noted = run.noted
        if noted is not None and noted[0] is rows and noted[1] is cols:
            return
        run.noted = (rows, cols)
        run.layouts.setdefault((0, len(rows) - 1, rows[-1]), rows)
        run.layouts.setdefault((1, len(cols) - 1, cols[-1]), cols)


def layout_for(axis: int, parts: int, size: int) -> tuple[int, ...] | None:
    """The partition of a sharded tensor of global ``size`` along ``axis`` seen so far
    in the current run, or None (also outside any run)."""
    run = current()
    return run.layouts.get((axis, parts, size)) if run is not None else None


def where() -> str:
    """The module being run, for error messages ("outside any module" outside runs)."""
    run = current()
    return run.where() if run is not None else "outside any module"


def unsupported(op: str, why: str) -> SPIMUnsupportedError:
    """The refusal error for op ``op`` at the current module."""
    return SPIMUnsupportedError(f"{where()}: {op} is not supported by SPIM: {why}")
