"""``rest-ds bench``: throughput-scaling studies of the real training step.

For a training config (``configs/*.yaml``), a list of scenes and a list of rank
layouts, every configuration runs ``warmup + steps`` real optimizer steps of
:class:`rest_ds.train.engine.Trainer` (the training engine itself:
``Trainer.train_step``, DeepSpeed, ZeRO, SPIM) and ``infer`` whole-scene
validation passes (``Trainer.evaluate``), and records what one step costs,
where the time goes, how many bytes move, and per-rank peak memory.

Ranks: without a launcher ``rest-ds bench`` starts each configuration on
fresh local gloo ranks (:func:`rest_ds.spim.spawn.spawn`); under a launcher
(``deepspeed``, ``torchrun``, ``srun``: ``RANK`` is set) it runs the
configurations whose rank count equals the launched world, in that process
group (gloo on CPU, NCCL on GPU, as training). Results are merged into the
output folder by key, so runs of different world sizes under a launcher add
up to one study.

Scenes: ``real`` is the config's own ``data.scenes`` (with its train region);
``HxW`` or ``HxWxC`` is a SYNTHETIC scene of that size (``C`` bands, default
the model's input bands; written once under ``OUT/scenes/``, no region).
``--weak HxW[xC]``: weak scaling, the scene grows with the ranks (``ph*H x
pw*W`` on a ``ph x pw`` grid, so every rank keeps an ``H x W`` tile).
Shape-changing augmentations (rot90, random crops) are turned off so every
step does the same work; flips stay.

Layouts (``--layouts``): ``P`` (sp = P ranks on one scene, grid chosen for the
smallest largest tile, then the least halo traffic), ``PHxPW`` (sp with that
grid), ``dpD`` (D data-parallel replicas, sp = 1), ``dpD:P`` / ``dpD:PHxPW`` (D
replicas of an sp group).

Timing: each step's wall time is the slowest rank's; phases are timed by
wrapping the engine's own calls (no second training loop): ``data``
(``Trainer.data.batch``), ``forward`` (the DeepSpeed engine's forward),
``loss``, ``backward`` (``engine.backward``: SPIM's backward and DeepSpeed's
gradient reduction), ``optimizer`` (``engine.step``), ``other`` (the rest of
``train_step``: tile wrapping, the loop's own all-reduces). Communication is
timed where it blocks (posting + waiting: ``torch.distributed`` calls, SPIM's
shared-memory channel, DeepSpeed's comm backend), per kind: ``spim:halo``,
``spim:all_reduce`` (norm / pool / loss statistics), ``spim:all_gather`` /
``spim:all_to_all`` (attention), ``ds:*`` (DeepSpeed: gradient reduction,
ZeRO parameter all-gather, gradient norm), ``loop:*`` (the training loop's
own collectives). On CUDA the device is synchronised at every phase boundary
(so phases are honest; it costs a little overlap). Main-thread CPU time per
phase is recorded too (``time.thread_time``): on a shared, loaded machine it
is the steadier figure.

Output (``--out``, default ``runs/bench``): ``bench.json``, ``bench.csv``
(one row per configuration, the JSON's scalar fields flattened with ``.``),
``throughput.png``, ``efficiency.png``, ``breakdown.png``, ``memory.png``.

JSON schema (``bench.json``; version 1)::

    {"schema": 1, "runs": [RUN, ...]}
    RUN = {
      "key": str,                      # scene|layout[|overrides], unique per config in the file
      "config": str,                   # the training config's absolute path
      "config_name": str, "overrides": [str],   # its file stem; the KEY=VALUE overrides given
      "model": {"encoder": str, "decoder": str, "params": int, "align": int},
      "scene": {"name": str, "height": int, "width": int, "bands": int,
                "synthetic": bool, "weak_base": "HxWxC" | null},
      "ranks": int, "dp": int, "sp": int, "grid": [ph, pw],
      "device": "cpu" | "cuda", "backend": "gloo" | "nccl", "threads": int, "zero_stage": int,
      "steps": int, "warmup": int,
      "step_s": float,                 # median over measured steps of the slowest rank's step
      "step_s_all": [float],
      "pixels_per_s": float,           # dp * height * width / step_s
      "pixels_per_s_per_rank": float,
      "phases_s": {phase: float},      # median over steps of the mean over ranks (wall)
      "phases_cpu_s": {phase: float},  # the same, main-thread CPU time
      "comm_s": {kind: float},         # time blocked in communication per kind, same statistic
      "comm_cpu_s": {kind: float},     # main-thread CPU time inside those calls (spin-waiting included)
      "calls": {kind: float},          # SPIM collectives per step per rank (comm_stats calls)
      "bytes": {kind: int},            # bytes sent per step, summed over ranks (SPIM's accounting
                                       # kinds halo/all_reduce/all_gather/all_to_all/broadcast, and ds:*)
      "bytes_analytic": {kind: int},   # the same from the layer geometry (halo, all_to_all:
                                       # attention) and the parameter count (ds:all_reduce, ZeRO 1-2
                                       # ds:all_gather), for one training step
      "memory": {"rss_peak_mib": [per rank], "rss_step_peak_mib": [per rank],
                 "cuda_peak_mib": [per rank] | null},
      "infer_s": float | null, "infer_pixels_per_s": float | null,
      "flops_per_step": {"total": int, "attention": int} | null,   # model FLOPs of one step
                                       # (forward + backward of the plain model on the dp scenes
                                       # padded to the model's alignment,
                                       # torch.utils.flop_counter on the meta device: model_flops)
      "flops_per_s_per_rank": float | null,
      "efficiency": {"strong": float | null, "weak": float | null, "weak_work": float | null}
    }

Efficiency: ``strong`` = pixels/s / (ranks x pixels/s of the 1-rank run on the
same scene); ``weak`` = pixels/s per rank / pixels/s of the 1-rank run on the
weak-scaling base scene; ``weak_work`` = model FLOP/s per rank / that of the
1-rank base run: the weak efficiency with the growth of the work per rank
factored out (global attention over a P-times larger scene does ~P times the
attention work per rank; a model without it has ``weak_work`` ~ ``weak``). ``rss_peak_mib`` is the process's resident
high-water mark over the measured steps (model, optimizer and activations;
reset through ``/proc/self/clear_refs`` after set-up where the kernel allows),
``rss_step_peak_mib`` that peak minus the resident set before the steps.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import gc
import json
import math
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

# the halo geometry is rest_ds.spim.geometry's; border_needs stays importable from here
from ..spim.geometry import border_needs, halo_volume  # noqa: F401

SCHEMA = 1
PHASES = ("data", "forward", "loss", "backward", "optimizer", "other", "loop")


# --- specs -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """``dp`` replicas x ``sp`` ranks per scene; ``grid`` None = auto (rest_ds.spim.choose_grid)."""

    dp: int
    sp: int
    grid: tuple[int, int] | None = None

    @property
    def ranks(self) -> int:
        return self.dp * self.sp

    @property
    def label(self) -> str:
        g = f"{self.grid[0]}x{self.grid[1]}" if self.grid else str(self.sp)
        return g if self.dp == 1 else f"dp{self.dp}:{g}"


def parse_layout(text: str) -> Layout:
    """``'2'``, ``'1x2'``, ``'dp2'``, ``'dp2:1x2'`` -> :class:`Layout` (ValueError otherwise)."""
    t = text.strip().lower()
    m = re.fullmatch(r"(?:dp(\d+))?(?::?(\d+)(?:x(\d+))?)?", t)
    if not t or m is None or (m.group(1) is None and m.group(2) is None):
        raise ValueError(f"'{text}' is not a layout (P, PHxPW, dpD, dpD:P or dpD:PHxPW)")
    dp = int(m.group(1) or 1)
    if m.group(2) is None:
        sp, grid = 1, None
    elif m.group(3) is None:
        sp, grid = int(m.group(2)), None
    else:
        grid = (int(m.group(2)), int(m.group(3)))
        sp = grid[0] * grid[1]
    if dp < 1 or sp < 1:
        raise ValueError(f"layout '{text}': every count must be >= 1")
    return Layout(dp, sp, grid)


def parse_scene(text: str) -> tuple[int, int, int | None] | None:
    """``'real'`` -> None; ``'HxW'`` / ``'HxWxC'`` -> ``(H, W, C or None)`` (ValueError otherwise)."""
    t = text.strip().lower()
    if t == "real":
        return None
    m = re.fullmatch(r"(\d+)x(\d+)(?:x(\d+))?", t)
    if m is None or min(int(v) for v in m.groups() if v is not None) < 1:
        raise ValueError(f"'{text}' is not a scene ('real', HxW or HxWxC with positive sizes)")
    return int(m.group(1)), int(m.group(2)), int(m.group(3)) if m.group(3) else None


def square_grid(sp: int) -> tuple[int, int]:
    """The factorisation ``ph x pw`` of ``sp`` closest to square (``ph <= pw``)."""
    ph = max(d for d in range(1, int(math.isqrt(sp)) + 1) if sp % d == 0)
    return ph, sp // ph


# --- instrumentation ---------------------------------------------------------------------------------
class Probe:
    """Wall and main-thread CPU seconds per phase, and blocked seconds and bytes
    per communication kind, for one rank. Inactive (zero cost beyond a flag
    test) unless ``active``."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.active = False
        self.phase: str | None = None       # the outermost phase we are in
        self.ds_depth = 0                   # inside DeepSpeed's comm backend
        self.comm_depth = 0                 # inside a timed communication call (no double counting)
        self.reset()

    def reset(self) -> None:
        self.wall: dict = defaultdict(float)
        self.cpu: dict = defaultdict(float)
        self.comm: dict = defaultdict(float)
        self.comm_cpu: dict = defaultdict(float)
        self.comm_bytes: dict = defaultdict(float)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def phase_wrap(self, name: str, fn):
        probe = self

        def wrapped(*args, **kwargs):
            if not probe.active or probe.phase is not None:
                return fn(*args, **kwargs)
            probe._sync()
            t0, c0 = time.perf_counter(), time.thread_time()
            probe.phase = name
            try:
                return fn(*args, **kwargs)
            finally:
                probe._sync()
                probe.phase = None
                probe.wall[name] += time.perf_counter() - t0
                probe.cpu[name] += time.thread_time() - c0

        wrapped.__wrapped__ = fn
        return wrapped

    def _kind(self, op: str) -> str:
        base = _KIND.get(op, op)
        if self.ds_depth:
            return f"ds:{base}"
        return f"{'loop' if self.phase in (None, 'other') else 'spim'}:{base}"

    def comm_wrap(self, op: str, fn, ds: bool = False, volume=None):
        """Time ``fn`` (a communication call) as kind ``op``; a returned waitable
        (torch Work, a list of them, or a ``wait()`` closure) is timed when waited."""
        probe = self

        def wrapped(*args, **kwargs):
            if not probe.active or (probe.comm_depth and not ds):
                return fn(*args, **kwargs)
            kind = probe._kind(op) if not ds else f"ds:{_KIND.get(op, op)}"
            if ds and volume is not None:
                try:
                    probe.comm_bytes[kind] += volume(*args, **kwargs)
                except Exception:  # pragma: no cover - accounting must never break a step
                    pass
            probe.comm_depth += 1
            probe.ds_depth += ds
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                out = fn(*args, **kwargs)
            finally:
                probe.comm[kind] += time.perf_counter() - t0
                probe.comm_cpu[kind] += time.thread_time() - c0
                probe.comm_depth -= 1
                probe.ds_depth -= ds
            return probe._waitable(out, kind)

        wrapped.__wrapped__ = fn
        return wrapped

    def _waitable(self, out, kind: str):
        if out is None:
            return out
        if isinstance(out, list) and out and hasattr(out[0], "wait"):
            return [_TimedWork(w, self, kind) for w in out]
        if hasattr(out, "wait") and not isinstance(out, torch.Tensor):
            return _TimedWork(out, self, kind)
        if callable(out) and not isinstance(out, torch.Tensor):
            probe = self

            def wait(*a, **k):
                t0, c0 = time.perf_counter(), time.thread_time()
                try:
                    return out(*a, **k)
                finally:
                    probe.comm[kind] += time.perf_counter() - t0
                    probe.comm_cpu[kind] += time.thread_time() - c0
            return wait
        return out


class _TimedWork:
    """A torch ``Work`` whose ``wait()`` is timed; anything else is passed through."""

    def __init__(self, work, probe: Probe, kind: str):
        self._work, self._probe, self._kind = work, probe, kind

    def wait(self, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._probe.comm[self._kind] += time.perf_counter() - t0
            self._probe.comm_cpu[self._kind] += time.thread_time() - c0

    def __getattr__(self, name):
        return getattr(self._work, name)


_KIND = {"batch_isend_irecv": "halo", "isend": "halo", "irecv": "halo", "send": "halo", "recv": "halo",
         "start_exchange": "halo", "start_all_reduce_": "all_reduce", "all_reduce_coalesced": "all_reduce",
         "inference_all_reduce": "all_reduce", "all_gather_into_tensor": "all_gather", "all_gather_base": "all_gather",
         "all_gather_object": "all_gather", "all_gather_coalesced": "all_gather", "broadcast_object_list": "broadcast",
         "all_to_all_single": "all_to_all", "reduce_scatter_tensor": "reduce_scatter"}
# not isend / irecv: they are the op identifiers of P2POp (torch checks them by identity);
# SPIM posts its point-to-point halos through batch_isend_irecv
_DIST_OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all_single",
             "all_to_all", "broadcast", "broadcast_object_list", "batch_isend_irecv", "send", "recv",
             "reduce_scatter", "reduce_scatter_tensor", "reduce", "barrier")
_SHM_OPS = ("start_exchange", "start_all_reduce_", "all_gather", "all_to_all")


def _ds_volume(op: str):
    """Bytes a rank sends in DeepSpeed collective ``op`` (ring volumes, as SPIM's accounting)."""
    def size(group) -> int:
        return dist.get_world_size(group)

    def nb(t) -> int:
        return t.numel() * t.element_size()

    def vol(*args, **kwargs):
        group = kwargs.get("group")
        if op in ("all_reduce", "inference_all_reduce"):
            t = kwargs.get("tensor", args[0] if args else None)
            P = size(group)
            return 2 * (P - 1) / P * nb(t)
        if op == "all_reduce_coalesced":
            ts = kwargs.get("tensors", args[0] if args else [])
            P = size(group)
            return sum(2 * (P - 1) / P * nb(t) for t in ts)
        if op in ("all_gather_into_tensor", "all_gather_base"):
            inp = kwargs.get("input_tensor", args[1] if len(args) > 1 else None)
            return (size(group) - 1) * nb(inp)
        if op == "reduce_scatter_tensor":
            inp = kwargs.get("input_tensor", args[1] if len(args) > 1 else None)
            P = size(group)
            return (P - 1) / P * nb(inp)
        if op == "broadcast":
            return 0
        return 0
    return vol


_INSTALLED: list = []


def install(probe: Probe) -> None:
    """Route this process's communication calls through ``probe`` (idempotent;
    :func:`uninstall` restores them)."""
    uninstall()
    for name in _DIST_OPS:
        fn = getattr(dist, name, None)
        if fn is not None:
            _INSTALLED.append((dist, name, fn))
            setattr(dist, name, probe.comm_wrap(name, fn))
    from ..spim.shm import ShmChannel

    for name in _SHM_OPS:
        fn = ShmChannel.__dict__[name]
        _INSTALLED.append((ShmChannel, name, fn))
        setattr(ShmChannel, name, probe.comm_wrap(name, fn))
    from .deepspeed_compat import COMM_OPS, comm_backend

    cdb = comm_backend()   # DeepSpeed's own collectives (None before deepspeed.init_distributed)
    if cdb is not None:
        for name in COMM_OPS:
            fn = getattr(cdb, name, None)
            if fn is not None:
                # an instance attribute (the shared-memory routing, deepspeed_compat) is put back;
                # otherwise the class's method shows through again once ours is deleted
                _INSTALLED.append((cdb, name, cdb.__dict__.get(name)))
                setattr(cdb, name, probe.comm_wrap(name, fn, ds=True, volume=_ds_volume(name)))


def uninstall() -> None:
    while _INSTALLED:
        obj, name, fn = _INSTALLED.pop()
        if fn is None:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)
        else:
            setattr(obj, name, fn)


# --- memory ------------------------------------------------------------------------------------------
def rss_kib(field: str) -> int | None:
    """``VmRSS``, ``VmHWM``, ... of this process in KiB from ``/proc/self/status`` (None where absent)."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"{field}:\s+(\d+)", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def reset_rss_peak() -> bool:
    """Reset the kernel's resident high-water mark (``VmHWM``) through ``/proc/self/clear_refs``;
    False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- analytic communication volumes ------------------------------------------------------------------
def halo_bytes(rows, cols, need_rows, need_cols, per_pixel: int) -> int:
    """Bytes all ranks send in one halo exchange: every rank sends each other
    rank the part of its own tile inside that rank's needed window, clipped to
    the scene (the rule of rest_ds.spim.halo: its 8 neighbours, any rank for a
    far plan); ``per_pixel`` bytes per pixel."""
    return halo_volume(rows, cols, need_rows, need_cols) * per_pixel


def analytic_bytes(model: torch.nn.Module, x_shape: tuple[int, int, int, int], layout, attention: str = "auto",
                   dtype_bytes: int = 4) -> dict:
    """Bytes one training step (forward + backward) sends, summed over the sp ranks
    of one scene, from the layer geometry alone (a forward on the meta device
    records every layer's input shape):

    * ``halo``: conv / max / avg pooling (kernel k, stride s, dilation d, padding p:
      a tile needs p rows before and d(k-1)-p after, clipped at the scene) and
      resampling (``F.interpolate``: the global taps' source rows), each sent
      once forward and, when the layer's input needs a gradient (every layer
      but the ones reading the model input), once backward;
    * ``all_to_all`` (attention, rest_ds.spim.attention): Ulysses (heads % sp
      == 0, no class tokens) 4 (P-1)/P N d elements per attention layer and
      pass, else K/V gathered, 2 (P-1) N d; N the scene's tokens (class
      tokens excluded: replicated), d = heads x head dim; the same again in
      backward.

    ``layout``: the input's TileLayout (padded scene). Norm and pooling
    statistics (O(batch x channels) per layer, independent of the scene size)
    are not modelled here."""
    import torch.nn.functional as F

    from ..spim.ops.resample import axis_taps, parse_call, proportional
    from ..spim.geometry import (conv_out, conv_padding, kernel_extent, needs, output_partition, pool_out,
                                 scale_partition)

    ph, pw = len(layout.rows) - 1, len(layout.cols) - 1
    P = ph * pw
    Hin, Win = x_shape[-2:]
    out = defaultdict(int)
    seen_input: set[int] = set()
    replicated: set[int] = set()     # ids of scene-global results (adaptive pooling and what follows it)
    keep: list = []                  # keeps those tensors alive, so that their ids stay unique

    def add_window(x, k, s, p, d, n_out, op):
        B, C, h, w = x.shape
        if k[0] * d[0] - d[0] + 1 == 1 and k[1] * d[1] - d[1] + 1 == 1 and p == (0, 0):
            return
        ke = [kernel_extent(k[a], d[a]) for a in range(2)]
        rows, cols = scale_partition(layout.rows, h, Hin), scale_partition(layout.cols, w, Win)
        o_r = output_partition(rows, n_out[0], ke[0], s[0], p[0], op, "row")
        o_c = output_partition(cols, n_out[1], ke[1], s[1], p[1], op, "col")
        n = halo_bytes(rows, cols, needs(o_r, ke[0], s[0], p[0]), needs(o_c, ke[1], s[1], p[1]),
                        B * C * dtype_bytes)
        out["halo"] += n * (1 if id(x) in seen_input else 2)

    def pair(v):
        return (v, v) if isinstance(v, int) else tuple(v)

    def mark(mod, args, result):
        ts = [a for a in args if isinstance(a, torch.Tensor)]
        if isinstance(mod, torch.nn.AdaptiveAvgPool2d) or (ts and all(id(t) in replicated for t in ts)):
            for r in (result if isinstance(result, (tuple, list)) else [result]):
                if isinstance(r, torch.Tensor):
                    replicated.add(id(r))
                    keep.append(r)

    def hook(mod, args):
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or id(x) in replicated:
            return
        if isinstance(mod, torch.nn.Conv2d):
            if mod.padding_mode != "zeros" and mod.padding != "same":
                pass
            k, s, d = pair(mod.kernel_size), pair(mod.stride), pair(mod.dilation)
            # (before, total) per axis: 'same' pads an even kernel extent one more after than before
            pads = [conv_padding(mod.padding if isinstance(mod.padding, str) else pair(mod.padding)[a],
                                 kernel_extent(k[a], d[a])) for a in range(2)]
            p = tuple(b for b, _ in pads)
            n_out = tuple(conv_out(x.shape[2 + a], kernel_extent(k[a], d[a]), s[a], pads[a][1]) for a in range(2))
            add_window(x, k, s, p, d, n_out, "conv2d")
        elif isinstance(mod, (torch.nn.MaxPool2d, torch.nn.AvgPool2d)):
            k = pair(mod.kernel_size)
            s = pair(mod.stride or mod.kernel_size)
            p = pair(mod.padding)
            d = pair(getattr(mod, "dilation", 1))
            n_out = tuple(pool_out(x.shape[2 + a], k[a], s[a], p[a], d[a], mod.ceil_mode) for a in range(2))
            add_window(x, k, s, p, d, n_out, type(mod).__name__)

    real_interp, real_sdpa = F.interpolate, F.scaled_dot_product_attention

    def interp(input, *args, **kwargs):
        y = real_interp(input, *args, **kwargs)
        if id(input) in replicated:
            replicated.add(id(y))
            keep.append(y)
        elif isinstance(input, torch.Tensor) and input.dim() == 4:
            mode, ac, (ho, wo), scales = parse_call((input,) + args, kwargs)
            B, C, h, w = input.shape
            rows, cols = scale_partition(layout.rows, h, Hin), scale_partition(layout.cols, w, Win)
            need = []
            for n_in, n_o, part, sc, name in ((h, ho, rows, scales[0], "row"), (w, wo, cols, scales[1], "col")):
                idx, _ = axis_taps(n_in, n_o, mode, ac, sc, torch.float32, "cpu")
                opart = proportional(part, n_in, n_o, name)
                lo, hi = idx.min(0).values, idx.max(0).values
                need.append(tuple((int(lo[a:b].min()), int(hi[a:b].max()) + 1)
                                  for a, b in zip(opart[:-1], opart[1:])))
            n = halo_bytes(rows, cols, need[0], need[1], B * C * dtype_bytes)
            out["halo"] += n * (1 if id(input) in seen_input else 2)
        return y

    # class / register tokens are replicated on every rank and never sent
    prefix = max([int(getattr(mod, "num_prefix_tokens", 0) or 0) for mod in model.modules()] + [0]) or \
        int(any(getattr(mod, "cls_token", None) is not None for mod in model.modules()))

    def sdpa(q, k, v, *args, **kwargs):
        B, heads, N, hd = q.shape
        elems = B * (N - prefix) * heads * hd
        # rest_ds.spim.attention: Ulysses when heads % sp == 0 and no prefix tokens, else K/V gathered;
        # both move through its all-to-all (kind all_to_all); backward sends the same volume back
        ulysses = not prefix and (attention == "ulysses" or (attention == "auto" and heads % P == 0))
        per_pass = 4 * (P - 1) / P * elems if ulysses else 2 * (P - 1) * elems
        out["all_to_all"] += int(round(2 * per_pass * dtype_bytes))
        return real_sdpa(q, k, v, *args, **kwargs)

    if P == 1:
        return {}
    m = copy.deepcopy(model).to("meta")
    hooks = [mod.register_forward_pre_hook(hook) for mod in m.modules()
             if isinstance(mod, (torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.AvgPool2d))]
    hooks += [mod.register_forward_hook(mark) for mod in m.modules()]
    x = torch.zeros(x_shape, device="meta")
    seen_input.add(id(x))
    F.interpolate, F.scaled_dot_product_attention = interp, sdpa
    try:
        m.train()
        m(x)
    finally:
        F.interpolate, F.scaled_dot_product_attention = real_interp, real_sdpa
        for h in hooks:
            h.remove()
    return dict(out)


def model_flops(model: torch.nn.Module, x_shape: tuple[int, int, int, int]) -> dict:
    """Model FLOPs of one training pass (forward + backward of the plain model) on an
    input of ``x_shape`` (the whole scene, batch included), counted by
    ``torch.utils.flop_counter`` on the meta device: ``{"total": int, "attention": int}``.
    ``attention`` is the part in scaled-dot-product attention (traced on meta as its
    batched matmuls, the only ``bmm`` of the models we ship; an explicit ``q @ k^T``
    counts there too). This is the work one device would do: what SPIM adds (border
    strips, recomputed edges) is not in it, so FLOP/s per rank from it is useful work."""
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model).to("meta")
    m.train()
    x = torch.zeros(x_shape, device="meta")
    with FlopCounterMode(display=False) as fc:
        out = m(x)
        outs = [out] if isinstance(out, torch.Tensor) else \
            [o for o in (out.values() if isinstance(out, dict) else out) if isinstance(o, torch.Tensor)]
        sum(o.float().sum() for o in outs).backward()
    counts = fc.get_flop_counts().get("Global", {})
    return {"total": int(fc.get_total_flops()),
            "attention": int(sum(v for k, v in counts.items() if "bmm" in str(k) or "attention" in str(k)))}


# --- one configuration, on every rank ----------------------------------------------------------------
def _median(v: list[float]) -> float | None:
    return float(statistics.median(v)) if v else None


def run_config(job: dict) -> dict | None:
    """Run one configuration on every rank of the current process group (world
    must be ``job['ranks']``); returns the RUN record on global rank 0, None
    elsewhere. ``job``: config, overrides, scene (None or a scene YAML path), name,
    layout fields, steps, warmup, infer, workdir."""
    from .config import load_config
    from .engine import Trainer, init_job

    rank, world = init_job()
    if world != job["ranks"]:
        raise RuntimeError(f"configuration {job['key']} needs {job['ranks']} ranks, this job has {world}")
    ov = list(job["overrides"]) + [
        f"output_dir={job['workdir']}", f"train.steps={job['warmup'] + job['steps']}", "train.eval_interval=0",
        "train.checkpoint_interval=0", "train.log_interval=0", "train.progress=false", "train.resume=none",
        f"mesh.sp={job['sp']}", f"mesh.grid={job['grid'] or 'auto'}", "data.augment.rot90=false",
        "data.augment.crop=null"]
    if job["scene"] is not None:
        ov += [f"data.scenes=[{job['scene']}]", "data.val_scenes=null", "data.train_region=null",
               "data.val_region=null"]
    cfg = load_config(job["config"], ov)
    trainer = Trainer(cfg, log=lambda m: None)
    trainer.start_step = 0
    cuda = trainer.device.type == "cuda" if hasattr(trainer.device, "type") else str(trainer.device).startswith("cuda")
    probe = Probe(cuda=cuda)
    # the engine's own calls, timed in place
    from . import engine as engine_mod
    # data: what the step waits for (the engine reads the next micro-step ahead in a thread)
    src = getattr(trainer, "prefetch", None) or trainer.data
    src.batch = probe.phase_wrap("data", src.batch)
    eng = trainer.engine
    eng.forward = probe.phase_wrap("forward", eng.forward)
    eng.backward = probe.phase_wrap("backward", eng.backward)
    eng.step = probe.phase_wrap("optimizer", eng.step)
    real_loss = engine_mod.segmentation_loss
    engine_mod.segmentation_loss = probe.phase_wrap("loss", real_loss)
    install(probe)
    from ..spim import comm_stats

    n_total = job["warmup"] + job["steps"]
    steps: list[dict] = []
    say = print if rank == 0 else (lambda *a, **k: None)
    state = {"rss_before": None, "last_end": None}
    real_step = trainer.train_step

    def timed_step(s: int) -> float:
        """One step of Trainer.fit, measured; the fit loop's own bookkeeping
        between two steps (logs, CSV row) is added to the step before."""
        t_in = time.perf_counter()
        if state["last_end"] is not None and steps:
            steps[-1]["phases"]["loop"] = t_in - state["last_end"]
            steps[-1]["wall"] += t_in - state["last_end"]
        if s == job["warmup"]:
            gc.collect()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            reset_rss_peak()
            state["rss_before"] = rss_kib("VmRSS")
        probe.reset()
        comm_stats().reset()
        probe.active = True
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.thread_time()
        loss = real_step(s)
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        probe.active = False
        ph = dict(probe.wall)
        ph["other"] = max(0.0, wall - sum(probe.wall.values()))
        pc = dict(probe.cpu)
        pc["other"] = max(0.0, cpu - sum(probe.cpu.values()))
        bytes_ = dict(comm_stats().bytes)
        bytes_.update({k: int(v) for k, v in probe.comm_bytes.items()})
        steps.append({"wall": wall, "cpu": cpu, "phases": ph, "phases_cpu": pc, "comm": dict(probe.comm),
                      "comm_cpu": dict(probe.comm_cpu), "calls": dict(comm_stats().calls), "bytes": bytes_})
        say(f"  [{job['key']}] step {s + 1}/{n_total}{' (warm-up)' if s < job['warmup'] else ''}: "
            f"{wall:.3f} s", flush=True)
        state["last_end"] = time.perf_counter()
        return loss

    trainer.train_step = timed_step
    try:
        trainer.fit()
        rss_before = state["rss_before"]
        mem = {"rss_peak_kib": rss_kib("VmHWM"), "rss_before_kib": rss_before,
               "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               "cuda_peak": torch.cuda.max_memory_allocated() if cuda else None}
        infer = []
        for i in range(job["infer"] + (1 if job["infer"] else 0)):  # one warm-up pass
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            trainer.evaluate()
            if cuda:
                torch.cuda.synchronize()
            if i:
                infer.append(time.perf_counter() - t0)
            say(f"  [{job['key']}] inference pass {i + 1}/{job['infer'] + 1}{' (warm-up)' if not i else ''}: "
                f"{time.perf_counter() - t0:.3f} s", flush=True)
    finally:
        probe.active = False
        uninstall()
        engine_mod.segmentation_loss = real_loss
    mine = {"steps": steps, "mem": mem, "infer": infer}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    rec = None
    if rank == 0:
        rec = _record(job, trainer, everyone)
    with contextlib.suppress(Exception):
        trainer.engine.destroy()
    del trainer, eng
    gc.collect()
    dist.barrier()
    return rec


def _record(job: dict, trainer, ranks: list[dict]) -> dict:
    """The RUN record (module docstring) from every rank's measurements."""
    w = job["warmup"]
    n = len(ranks[0]["steps"])
    meas = range(w, n)
    step_s = [max(r["steps"][i]["wall"] for r in ranks) for i in meas]

    def med_mean(field: str) -> dict:
        keys = sorted({k for r in ranks for i in meas for k in r["steps"][i][field]})
        # 'loop' (the fit loop between two steps) does not exist after the last step: skipped there
        return {k: _median([statistics.fmean(r["steps"][i][field].get(k, 0.0) for r in ranks) for i in meas
                            if k != "loop" or k in ranks[0]["steps"][i][field]]) for k in keys}

    def med_sum_bytes() -> dict:
        keys = sorted({k for r in ranks for i in meas for k in r["steps"][i]["bytes"]})
        return {k: int(_median([sum(r["steps"][i]["bytes"].get(k, 0) for r in ranks) for i in meas])) for k in keys}

    sc = trainer.train_scenes[0].reader
    C, H, W = sc.shape
    dp = trainer.mesh.dp
    med = _median(step_s)
    mcfg = trainer.model_cfg
    params = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters())
    from .data import scene_tile_layout
    from .inference import padded_shape

    plain = _plain_model(trainer)  # both traces below work on their own meta-device copies of it
    Hp, Wp = padded_shape((H, W), trainer.align)  # the scene as the model sees it
    try:
        lay = scene_tile_layout((H, W), trainer.grid, trainer.align)
        ana = {k: v * dp for k, v in analytic_bytes(plain, (1, C, Hp, Wp), lay,
                                                   attention=trainer.cfg.mesh.attention).items()}
    except Exception as e:  # the geometry model is a report, never a reason to lose the measurement
        ana = {"error": f"{type(e).__name__}: {e}"[:300]}
    try:
        flops = {k: v * dp for k, v in model_flops(plain, (1, C, Hp, Wp)).items()}
    except Exception:  # an op without a meta kernel or a FLOP formula: no work-normalised figures
        flops = None
    P, stage = trainer.world, trainer.cfg.deepspeed.zero_stage
    if P > 1 and stage < 3:  # fp32 gradients and parameters (ZeRO-3 gathers parameters per layer instead)
        # DeepSpeed's gradient reduction: a ring all-reduce of every gradient over all ranks
        ana["ds:all_reduce"] = int(round(2 * (P - 1) / P * 4 * params * P))
        if stage in (1, 2):  # the updated partitions, all-gathered after the optimizer step
            ana["ds:all_gather"] = int((P - 1) * 4 * params)
    infer = [statistics.median(r["infer"]) for r in ranks if r["infer"]]
    infer_s = max(infer) if infer else None
    mib = 1024.0
    mems = [r["mem"] for r in ranks]
    return {
        "key": job["key"], "config": job["config"], "config_name": job["config_name"],
        "overrides": list(job["overrides"]),
        "model": {"encoder": mcfg["encoder"]["name"], "decoder": mcfg["decoder"]["name"], "params": int(params),
                  "align": trainer.align},
        "scene": {"name": job["scene_name"], "height": H, "width": W, "bands": C, "synthetic": job["scene"] is not None,
                  "weak_base": job.get("weak_base")},
        "ranks": P, "dp": dp, "sp": trainer.mesh.sp, "grid": list(trainer.grid),
        "device": "cuda" if str(trainer.device).startswith("cuda") else "cpu", "backend": dist.get_backend(),
        "threads": trainer.threads, "zero_stage": trainer.cfg.deepspeed.zero_stage,
        "steps": job["steps"], "warmup": w,
        "step_s": med, "step_s_all": step_s,
        "pixels_per_s": dp * H * W / med, "pixels_per_s_per_rank": dp * H * W / med / P,
        "phases_s": med_mean("phases"), "phases_cpu_s": med_mean("phases_cpu"), "comm_s": med_mean("comm"),
        "comm_cpu_s": med_mean("comm_cpu"), "calls": med_mean("calls"),
        "bytes": med_sum_bytes(), "bytes_analytic": ana,
        "memory": {"rss_peak_mib": [m["rss_peak_kib"] / mib if m["rss_peak_kib"] else m["ru_maxrss_kib"] / mib
                                    for m in mems],
                   "rss_step_peak_mib": [(m["rss_peak_kib"] - m["rss_before_kib"]) / mib
                                         if m["rss_peak_kib"] and m["rss_before_kib"] else None for m in mems],
                   "cuda_peak_mib": [m["cuda_peak"] / mib ** 2 for m in mems] if mems[0]["cuda_peak"] is not None
                   else None},
        "infer_s": infer_s, "infer_pixels_per_s": dp * H * W / infer_s if infer_s else None,
        "flops_per_step": flops,
        "flops_per_s_per_rank": flops["total"] / med / P if flops else None,
        "efficiency": {"strong": None, "weak": None, "weak_work": None},
    }


def _plain_model(trainer) -> torch.nn.Module:
    """A fresh single-device copy of the trained architecture (for the geometry trace)."""
    from .engine import build_model

    torch.manual_seed(0)
    return build_model(trainer.model_cfg, num_classes=trainer.num_classes, in_chans=trainer.in_chans)[0]


def _spawned(job: dict):
    """Body of a local rank (rest_ds.spim.spawn)."""
    return run_config(job)


# --- planning and driving ----------------------------------------------------------------------------
def _model_bands(config: str, overrides: list[str]) -> int | None:
    from .config import load_config

    cfg = load_config(config, overrides)
    enc = cfg.model.encoder
    if enc.bands:
        return len(enc.bands)
    return enc.in_chans


def synthetic_scene(root: Path, h: int, w: int, bands: int, classes: int) -> str:
    """Path of the scene YAML of a SYNTHETIC ``bands x h x w`` scene under ``root`` (written once)."""
    from ..data.samples import synthetic_hyperspectral

    d = root / f"synthetic_{h}x{w}x{bands}_k{classes}"
    y = d / "scene.yaml"
    if not y.is_file():
        synthetic_hyperspectral(d, format="tif", bands=bands, height=h, width=w, classes=classes,
                                name=f"synthetic-{h}x{w}x{bands}")
    return str(y.resolve())


def plan_jobs(config: str, overrides: list[str], scenes: list[str], layouts: list[Layout], weak: list[str],
              steps: int, warmup: int, infer: int, out: Path, classes: int, make_scenes: bool = True) -> list[dict]:
    """One job per (scene, layout) and per (weak base, layout); synthetic scenes
    are written under ``out/scenes`` when ``make_scenes``."""
    bands_default = _model_bands(config, overrides) or 6
    jobs = []
    cname = Path(config).stem

    def job(scene_ref, name, lay: Layout, grid, weak_base=None):
        g = f"{grid[0]}x{grid[1]}" if grid else None
        key = f"{name}|{lay.label if not weak_base else (f'dp{lay.dp}:' if lay.dp > 1 else '') + g}"
        if overrides:  # another variant of the config: its own runs (and its own 1-rank reference)
            key += "|" + " ".join(overrides)
        return {"key": key, "config": str(Path(config).resolve()), "config_name": cname, "overrides": list(overrides),
                "scene": scene_ref, "scene_name": name, "ranks": lay.ranks, "dp": lay.dp, "sp": lay.sp, "grid": g,
                "steps": steps, "warmup": warmup, "infer": infer, "weak_base": weak_base}

    for s in scenes:
        shp = parse_scene(s)
        if shp is None:
            for lay in layouts:
                jobs.append(job(None, "real", lay, lay.grid))
            continue
        h, w, c = shp
        c = c or bands_default
        ref = synthetic_scene(out / "scenes", h, w, c, classes) if make_scenes else None
        for lay in layouts:
            jobs.append(job(ref, f"{h}x{w}x{c}", lay, lay.grid))
    for s in weak:
        shp = parse_scene(s)
        if shp is None:
            raise ValueError("--weak needs a synthetic base scene HxW[xC], not 'real'")
        h, w, c = shp
        c = c or bands_default
        for lay in layouts:
            grid = lay.grid or square_grid(lay.sp)
            H, W = h * grid[0], w * grid[1]
            ref = synthetic_scene(out / "scenes", H, W, c, classes) if make_scenes else None
            jobs.append(job(ref, f"weak {h}x{w}x{c} ({H}x{W})", lay, grid, weak_base=f"{h}x{w}x{c}"))
    return jobs


def efficiencies(runs: list[dict]) -> None:
    """Fill ``efficiency`` of every run in place (module docstring)."""
    for r in runs:
        r["efficiency"] = {"strong": None, "weak": None, "weak_work": None}
        base = r["scene"].get("weak_base")
        if base:
            ref = [q for q in runs if q["scene"].get("weak_base") == base and q["ranks"] == 1
                   and q["config"] == r["config"] and q.get("overrides") == r.get("overrides")]
            if ref and ref[0]["pixels_per_s_per_rank"]:
                r["efficiency"]["weak"] = r["pixels_per_s_per_rank"] / ref[0]["pixels_per_s_per_rank"]
            if ref and r.get("flops_per_s_per_rank") and ref[0].get("flops_per_s_per_rank"):
                r["efficiency"]["weak_work"] = r["flops_per_s_per_rank"] / ref[0]["flops_per_s_per_rank"]
        else:
            ref = [q for q in runs if not q["scene"].get("weak_base") and q["ranks"] == 1
                   and q["scene"]["name"] == r["scene"]["name"] and q["scene"]["height"] == r["scene"]["height"]
                   and q["scene"]["width"] == r["scene"]["width"] and q["config"] == r["config"]
                   and q.get("overrides") == r.get("overrides")]
            if ref and ref[0]["pixels_per_s"]:
                r["efficiency"]["strong"] = r["pixels_per_s"] / (r["ranks"] * ref[0]["pixels_per_s"])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, list):
            out[key] = " ".join(f"{x:.6g}" if isinstance(x, float) else str(x) for x in v)
        else:
            out[key] = v
    return out


def write_outputs(out: Path, new_runs: list[dict]) -> dict:
    """Merge ``new_runs`` into ``out/bench.json`` (by key), recompute the
    efficiencies, write bench.json, bench.csv and the plots; returns the document."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    runs = []
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if old.get("schema") == SCHEMA:
                runs = old.get("runs", [])
        except (OSError, ValueError):
            runs = []
    keys = {(r["config"], r["key"]) for r in new_runs}
    runs = [r for r in runs if (r["config"], r["key"]) not in keys] + new_runs
    efficiencies(runs)
    doc = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "host": os.uname().nodename, "torch": torch.__version__, "runs": runs}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    rows = [_flat({k: v for k, v in r.items() if k != "step_s_all"}) for r in runs]
    fields = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(out / "bench.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        wr.writerows(rows)
    plot(runs, out)
    return doc


def plot(runs: list[dict], out: Path) -> list[Path]:
    """throughput.png, efficiency.png, breakdown.png, memory.png in ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = defaultdict(list)
    for r in runs:
        base = r["scene"].get("weak_base")
        name = (f"weak {base}" if base else r["scene"]["name"] if r["scene"]["synthetic"]
                else f"{r['scene']['name']} {r['scene']['height']}x{r['scene']['width']}")
        groups[f"{r.get('config_name') or Path(r['config']).stem}: {name}"].append(r)
    for g in groups.values():
        g.sort(key=lambda r: (r["ranks"], r["key"]))

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, g in groups.items():
        x = [r["ranks"] for r in g]
        ax[0].plot(x, [r["pixels_per_s"] / 1e6 for r in g], "o-", label=name)
        ax[1].plot(x, [r["pixels_per_s_per_rank"] / 1e6 for r in g], "o-", label=name)
    ax[0].set_ylabel("training Mpixel/s (total)")
    ax[1].set_ylabel("training Mpixel/s per rank")
    for a in ax:
        a.set_xlabel("ranks")
        a.grid(alpha=0.3)
    if groups:
        ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=100)
    plt.close(fig)
    written.append(out / "throughput.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, g in groups.items():
        kind = "weak" if g[0]["scene"].get("weak_base") else "strong"
        pts = [(r["ranks"], r["efficiency"][kind]) for r in g if r["efficiency"][kind] is not None]
        if pts:
            line, = ax.plot(*zip(*pts), "o-", label=f"{name} ({kind})")
        work = [(r["ranks"], r["efficiency"].get("weak_work")) for r in g
                if r["efficiency"].get("weak_work") is not None]
        if kind == "weak" and work:  # per-rank model FLOP/s: the growth of global attention factored out
            ax.plot(*zip(*work), "s--", color=line.get_color() if pts else None, label=f"{name} (weak, by work)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("ranks")
    ax.set_ylabel("scaling efficiency")
    ax.set_ylim(0, 1.2)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "efficiency.png", dpi=100)
    plt.close(fig)
    written.append(out / "efficiency.png")

    # wall seconds (what a quiet machine reports) and main-thread CPU seconds (steadier on a shared one)
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(5, 0.8 * len(runs) + 2), 4.5))
    labels = [f"{r['scene']['name'].split(' (')[0]}\n{r['key'].split('|')[1]}" for r in runs]  # scene, layout
    for ax, field, comm_field, what in ((axes[0], "phases_s", "comm_s", "wall"),
                                         (axes[1], "phases_cpu_s", "comm_cpu_s", "main-thread CPU")):
        bottom = [0.0] * len(runs)
        for phase in PHASES:
            vals = [(r.get(field) or {}).get(phase) or 0.0 for r in runs]
            ax.bar(range(len(runs)), vals, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, vals)]
        comm_tot = [sum((r.get(comm_field) or {}).values()) for r in runs]
        ax.scatter(range(len(runs)), comm_tot, color="k", marker="_", s=300, zorder=3,
                   label="of which in communication calls")
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel(f"{what} seconds per step (median, mean over ranks)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "breakdown.png", dpi=100)
    plt.close(fig)
    written.append(out / "breakdown.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    by_ranks = defaultdict(list)
    for r in runs:
        if not r["scene"].get("weak_base"):
            by_ranks[r["ranks"]].append(r)
    for P, g in sorted(by_ranks.items()):
        g.sort(key=lambda r: r["scene"]["height"] * r["scene"]["width"])
        ax.plot([r["scene"]["height"] * r["scene"]["width"] / 1e6 for r in g],
                [max(r["memory"]["cuda_peak_mib"] or r["memory"]["rss_peak_mib"]) for r in g], "o-",
                label=f"{P} rank(s)")
    ax.set_xlabel("scene Mpixel")
    ax.set_ylabel("peak memory per rank, MiB (CUDA allocator or RSS)")
    ax.grid(alpha=0.3)
    if by_ranks:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no fixed-scene (strong-scaling) runs", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=100)
    plt.close(fig)
    written.append(out / "memory.png")
    return written


def summary_line(r: dict) -> str:
    eff = r["efficiency"]
    e = "".join(f", {k} eff {v:.2f}" for k, v in eff.items() if v is not None and k != "weak_work")
    if eff.get("weak_work") is not None:
        e += f" (by work {eff['weak_work']:.2f})"
    if r.get("flops_per_step"):
        e += f", {r['flops_per_step']['total'] / 1e9:.1f} GFLOP/step, {r['flops_per_s_per_rank'] / 1e9:.2f} GFLOP/s/rank"
    ph = " ".join(f"{k} {r['phases_s'][k]:.3f}" for k in PHASES if r["phases_s"].get(k) is not None)
    comm = sum(r["comm_s"].values())
    return (f"{r['key']}: {r['step_s']:.3f} s/step, {r['pixels_per_s'] / 1e6:.3f} Mpx/s "
            f"({r['pixels_per_s_per_rank'] / 1e6:.3f}/rank){e}; [{ph}] comm {comm:.3f}; "
            f"peak RSS {max(r['memory']['rss_peak_mib']):.0f} MiB"
            + (f"; inference {r['infer_s']:.3f} s" if r["infer_s"] else ""))


def run_bench(config: str, overrides: list[str], scenes: list[str], layouts: list[Layout], weak: list[str],
              steps: int = 5, warmup: int = 2, infer: int = 1, out: str | os.PathLike = "runs/bench",
              classes: int = 7, threads: int = 1, timeout_s: float = 3600, log=print) -> dict:
    """Run every configuration and write the outputs (module docstring);
    returns the merged JSON document (on global rank 0 under a launcher, else None there)."""
    out = Path(out)
    launched = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    if launched:
        from .engine import init_job

        rank, world = init_job()
        jobs = None
        if rank == 0:
            jobs = plan_jobs(config, overrides, scenes, layouts, weak, steps, warmup, infer, out, classes)
        box = [jobs]
        dist.broadcast_object_list(box, src=0)
        jobs = [j for j in box[0] if j["ranks"] == world]
        if rank == 0:
            skipped = len(box[0]) - len(jobs)
            log(f"bench: {len(jobs)} configuration(s) for this world of {world} rank(s)"
                + (f" ({skipped} others need a different world size: launch again with it)" if skipped else ""))
    else:
        rank = 0
        jobs = plan_jobs(config, overrides, scenes, layouts, weak, steps, warmup, infer, out, classes)
        log(f"bench: {len(jobs)} configuration(s), local gloo ranks, {threads} thread(s) each")
    runs = []
    for i, j in enumerate(jobs):
        if rank == 0:
            log(f"[{i + 1}/{len(jobs)}] {j['key']}: {j['ranks']} rank(s), {j['warmup']} warm-up + {j['steps']} steps")
        with tempfile.TemporaryDirectory(prefix="rest_ds_bench_") as tmp:
            j = dict(j, workdir=os.path.join(tmp, "run"))
            if launched:
                # every rank needs the same folder name: rank 0's
                box = [j["workdir"]]
                dist.broadcast_object_list(box, src=0)
                j["workdir"] = box[0]
                rec = run_config(j)
            else:
                from ..spim.spawn import spawn

                rec = spawn(_spawned, j["ranks"], j, threads=threads, timeout_s=timeout_s,
                            collective_timeout_s=max(120.0, timeout_s / 4))[0]
        if rank == 0:
            runs.append(rec)
            doc = write_outputs(out, [rec])
            mine = [r for r in doc["runs"] if r["key"] == rec["key"] and r["config"] == rec["config"]][0]
            log("  " + summary_line(mine))
    if rank != 0:
        return None
    doc = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else {"runs": []}
    return doc


__all__ = ["rss_kib", "reset_rss_peak", "Layout", "parse_layout", "parse_scene", "square_grid", "Probe", "install", "uninstall", "analytic_bytes",
           "run_config", "plan_jobs", "efficiencies", "write_outputs", "plot", "run_bench", "synthetic_scene", "SCHEMA"]


# --- command line ------------------------------------------------------------------------------------
BENCH_DESCRIPTION = """\
Throughput-scaling study of the real training step (rest_ds.train.engine):
for every scene x layout, WARMUP + STEPS optimizer steps and INFER whole-scene
inference passes; per configuration pixels/s (total, per rank), step time
with a breakdown (data, forward, loss, backward incl. DeepSpeed's gradient
reduction, optimizer step, communication per kind), bytes per kind beside the
analytic volumes, per-rank peak memory, and strong / weak scaling efficiency
against 1 rank. Writes OUT/bench.json (schema in rest_ds/train/bench.py),
OUT/bench.csv and PNG plots; runs are merged into an existing OUT by key.

Without a launcher every configuration starts its own local gloo CPU ranks.
Under a launcher (RANK set) it runs the configurations whose rank count is the
launched world size, on the launcher's process group (NCCL on GPUs):

  rest-ds bench --config configs/nc_landsat7_rest.yaml --scenes real,1024x1024 --layouts 1,2
  torchrun --nproc_per_node 4 -m rest_ds bench --config C.yaml --scenes 2048x2048 --layouts 4,2x2,dp2:2
  deepspeed --num_gpus 2 --no_local_rank --module rest_ds bench --config C.yaml --layouts 2
  srun python -m rest_ds bench --config C.yaml --layouts 8   (see launch/)"""


def add_parser(subparsers) -> None:
    """Register ``bench`` on the ``rest-ds`` sub-parsers."""
    import argparse

    from ..cli_args import nonneg_int, positive_int

    p = subparsers.add_parser("bench", help="throughput / scaling benchmark of the training step (pixels/s, "
                                            "time breakdown, bytes, memory, efficiency)",
                              description=BENCH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, metavar="YAML", help="training config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for train")
    p.add_argument("--scenes", default="real", metavar="LIST",
                   help="comma list: 'real' (the config's scenes) and/or synthetic HxW[xC] (default: %(default)s)")
    p.add_argument("--weak", default="", metavar="LIST",
                   help="comma list of weak-scaling base scenes HxW[xC] (every rank keeps an HxW tile)")
    p.add_argument("--layouts", default="1,2", metavar="LIST",
                   help="comma list of P, PHxPW, dpD, dpD:P, dpD:PHxPW (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=5, help="measured steps (default: %(default)s)")
    p.add_argument("--warmup", type=nonneg_int, default=2, help="warm-up steps, not measured (default: %(default)s)")
    p.add_argument("--infer", type=nonneg_int, default=1,
                   help="measured whole-scene inference passes after one warm-up pass; 0: none (default: %(default)s)")
    p.add_argument("--classes", type=positive_int, default=7, help="classes of the synthetic scenes (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads per local rank (default: $OMP_NUM_THREADS or 1)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--timeout", type=positive_int, default=3600, metavar="SECONDS",
                   help="local ranks: stop a configuration after this long (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    """``rest-ds bench``: exit 0 done, 1 a rank failed, 2 bad input."""
    from ..cli_args import EXIT_FAIL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, fail, one_line
    from .cli import _die, _rank_env, _usage_errors
    from .config import ConfigError, load_config

    rank, world = _rank_env()
    try:
        layouts = [parse_layout(t) for t in args.layouts.split(",") if t.strip()]
        scenes = [t.strip() for t in args.scenes.split(",") if t.strip()]
        weak = [t.strip() for t in args.weak.split(",") if t.strip()]
        for s in scenes + weak:
            parse_scene(s)
        if any(parse_scene(s) is None for s in weak):
            raise ValueError("--weak takes synthetic base scenes HxW[xC], not 'real'")
        if not layouts or not (scenes or weak):
            raise ValueError("give at least one layout and one scene")
        load_config(args.config, args.overrides)
    except ValueError as e:
        return fail(e) if rank == 0 else EXIT_USAGE
    except ConfigError as e:
        return fail(e) if rank == 0 else EXIT_USAGE
    if args.out.exists() and not args.out.is_dir():
        return fail(f"--out {args.out} is not a folder")
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or 1
    try:
        doc = run_bench(str(args.config), list(args.overrides), scenes, layouts, weak, steps=args.steps,
                        warmup=args.warmup, infer=args.infer, out=args.out, classes=args.classes, threads=threads,
                        timeout_s=args.timeout, log=lambda m: print(m, flush=True))
    except BaseException as e:
        from ..spim.spawn import RankError

        if isinstance(e, KeyboardInterrupt) and world == 1:
            return EXIT_INTERRUPTED
        if isinstance(e, RankError):
            if args.debug and e.tb:
                print(e.tb, file=sys.stderr)
            code = EXIT_USAGE if e.exc_type in {c.__name__ for c in _usage_errors()} else EXIT_FAIL
            return fail(f"{'rank %d: ' % e.rank if e.rank >= 0 else ''}{e.exc_type}: {one_line(e.message)}", code)
        return _die(e, args.debug, rank, world)
    if doc is not None:
        print(f"bench: {len(doc['runs'])} configuration(s) in {args.out}/bench.json, bench.csv, throughput.png, "
              f"efficiency.png, breakdown.png, memory.png", flush=True)
    if "RANK" in os.environ or "SLURM_PROCID" in os.environ:
        from .cli import _finish
        _finish()
    return EXIT_OK
