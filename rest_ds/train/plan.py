"""``rest-ds plan``: per-rank peak memory and step time of a training run, before it starts.

The model (per rank, bytes; ``P`` parameters, ``N = dp x sp`` ranks, which are
DeepSpeed's data-parallel group; ``k`` optimizer state values per parameter:
AdamW/Adam 2, SGD with momentum 1, plain SGD 0; ``w`` bytes of a model value:
4 in fp32, 2 in bf16/fp16)::

    peak = static + buckets + max(activations, step temporaries) + overhead

    static       = params + grads + master + optimizer state, by ZeRO stage:
                   stage 0: w P        + w P        + (mixed: 4 P)  + 4 k P
                   stage 1: w P        + w P        + 4 P / N       + 4 k P / N
                   stage 2: w P        + w P / N    + 4 P / N       + 4 k P / N
                   stage 3: w P / N    + w P / N    + 4 P / N       + 4 k P / N   (+ largest layer, gathered)
                   (DeepSpeed keeps its own fp32 partition copy from stage 1 on, also in fp32)
    buckets      = DeepSpeed's gradient reduce bucket of B values (deepspeed.reduce_bucket_size,
                   default min(5e8, P), the value the engine passes to DeepSpeed):
                   stage 1: 2 x 4 B (fp32 staging), stages 2-3: w B; stage 0: none (measured)
    step temp.   = 4 P (/ N from stage 1): the optimizer step's one parameter-sized temporary
                   (Adam's denominator, SGD's decayed gradient), alive when activations are not
    activations  = c_act * (a * A_tile + q * A_tile * A_scene) * (w / 4)
    overhead     = c_fixed + c_fixed_sp (sp > 1)    (communication staging, runtime buffers)

``A_tile`` is the rank's tile in pixels (the padded scene split over the
grid), ``A_scene`` the whole scene's. ``a`` (bytes per pixel) and ``q`` (bytes
per pixel pair: attention scores, whose keys are the whole scene's tokens under
SPIM) are MEASURED from the model itself: one forward/backward of the plain
model, in training mode, on small synthetic scenes of three sizes, in one
process, with the torch profiler's allocator events (live bytes of every CPU
tensor allocation, peak over the pass; the gradients are allocated before it,
so that a large model's gradients do not hide its activations), then
``peak(A) = a A + q A^2 + b`` fitted by least squares (the probe sides,
:func:`probe_sides`, shrink for large models to bound their CPU cost).
Activation checkpointing is measured the same way with it enabled. The
``c_act_*`` multipliers (SPIM's halo buffers and padded copies, the
recomputation's peak) and the fixed overheads are the CALIBRATED coefficients:
fitted to measured per-rank
peaks of real training steps (:func:`measure_step`: DeepSpeed engine, SPIM,
the same allocator measure) by :func:`calibrate`; the defaults below came
from CPU runs of tiny ResNet-UPerNet / ViT-UPerNet configurations
(``tests/test_plan.py`` checks the predictions on other configurations).

The measure is the CPU allocator's live bytes (torch profiler memory events),
not the process RSS: it counts tensors (parameters, gradients, optimizer state,
activations, DeepSpeed's buffers) and not the Python heap, libraries, gloo's
own buffers or shared-memory segments; a device's allocator cache adds to it
on GPU.

Step time (seconds, the rank with the largest tile; :func:`step_time`)::

    step = c_time * batch * (s A_tile + u A_tile A_scene + t0)      forward + backward + loss
         + c_opt * opt_s / N_opt                                     optimizer step
         + c_sp * batch * t0                   (sp > 1)              SPIM's fixed cost per pass
         + bytes_ds / c_bw                     (world > 1)           DeepSpeed's collectives

``s``, ``u``, ``t0`` are MEASURED. ``u`` (the attention term: under SPIM a rank's
queries see the whole scene's keys, so it grows with tile x scene) is timed
directly: the model's ``scaled_dot_product_attention`` calls are recorded at two
probe sides (:func:`attention_calls`: shapes, dtype, mask, dropout, causality);
a call whose queries and keys both grow with the scene is global (keys = the
scene), any other is windowed (keys = its window: a cost linear in the tile);
each distinct global call is timed on its own, forward + backward, at queries =
keys = n tokens, n doubled until a pass nears 0.3 s (the main job's ViT: 2308
tokens, 0.12 s; its 1024 x 1024 scene has 4097), and ``u`` = the sum of its
seconds per query x key token x (tokens per pixel)^2 (:func:`attention_term`;
sdpa's cost per token pair is flat from ~1000 tokens on: 2.31e-8 s at 1154,
2308 and 4097 tokens, 2 heads of 64, one CPU thread). ``s`` and ``t0``: the
plain model's forward/backward timed at the probe sides and two smaller ones
(the fastest of two passes, of five at the small sides; thread CPU time with
one torch thread, which other jobs' load inflates less than the wall clock),
less the measured ``u A^2``, fitted by non-negative least squares (``t0`` on
the relative error, then ``s`` on the absolute one: :func:`_fit_time`). (Before,
``u`` was the probes' curvature, extrapolated from <= 512 px: 1.57-2.58e-12
over six profiles of the main job's ViT on the shared machine, against
1.36-1.42e-12 measured directly.) ``t0`` is the per-pass fixed cost (the time at
A -> 0: dispatch of every op). ``opt_s``: one step of the config's optimizer
with its gradient clipping on all parameters, divided over ``N_opt = world``
ranks from ZeRO stage 1 on. ``bytes_ds``: :func:`grad_comm_bytes` (gradient
all-reduce, ZeRO's all-gather of the updated partitions). SPIM's own cost at
sp > 1 (Python dispatch of the sharded ops, halo / norm all-reduce / all-to-all
latencies) is modelled as ``c_sp`` times the plain model's ``t0``: both count
the model's ops weighted by their fixed cost. On this machine the sp > 1 steps
left 4.5 x t0 (ViT-UPerNet, t0 ~9 ms) and 2.9 x t0 (ResNet-18-UPerNet, t0 ~50
ms) after the other terms; the leaf-module count (127 vs 121) or the aten op
count per pass (729 vs 509) would have ranked the two models the wrong way round
(the ResNet's SPIM cost, ~0.15 s, is ~4 x the ViT's, ~0.04 s). Not measured
beyond sp = 2 (more neighbours may cost more per op). ``c_time``, ``c_opt``
(DeepSpeed's step with its flat-buffer copies / torch's optimizer step),
``c_sp`` and ``c_bw`` are CALIBRATED (:data:`DEFAULT_TIME_COEFFS`, or
:func:`calibrate_from_bench` from ``rest-ds bench`` runs on the target machine:
the step time is this machine's, not a GPU's, unless calibrated there).
Measured against quiet bench runs of nc_landsat7_rest / nc_landsat7_resnet18 on
this machine (1 and 2 ranks, ZeRO-2, 256 to 1024 px; coefficients fitted to the
443 x 489 runs only): median |error| 5 %, from -19 % (the ViT at 256 x 256) to
+10 % (the ViT at 1024 x 1024, whose attention term was then extrapolated from
probes of at most 512 px); the probes vary with the machine's load: three
profiles of each model with the default coefficients gave -20 %..+11 %. With
``u`` timed directly (2026-12-08, six profiles on the loaded shared machine,
c_time and c_sp refitted per profile to the 443 x 489 runs): the ViT at 1024 x
1024 on 1 rank -6.2..+0.3 % (curvature: +2.8..+31 %), on 2x1 -12.7..-6.7 %
(curvature: -4.5..+21 %); 256 x 256 to 512 x 512 on 1 rank -2.1..+3.2 %; the
2-rank runs at the larger scenes stay low (512 x 1024 on 1x2: -10.6..-8.3 %):
SPIM's cost beyond ``c_sp t0`` grows with the scene (not modelled).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config_schema import ConfigError

GIB = 1024 ** 3

# Calibrated by calibrate() on 13 CPU measure_step runs (fp32, gloo, 1 and 2 ranks; tiny ViT-UPerNet
# (52 k params) and ResNet-18-UPerNet (11.5 M) at 128-384 px, ZeRO 0 and 2, AdamW and SGD, with and
# without activation checkpointing; 2026-12-07): c_act_{one,sp}[_ckpt]: multiplier of the measured
# activation fit on a tile (one rank / sp > 1: SPIM's halo and staging buffers; with checkpointing:
# the recomputation's own peak), c_fixed_sp: bytes per rank of an sp group (communication staging),
# c_fixed: bytes per rank. The fitted model was within -3.2..+4.3 % of those runs; tests/test_plan.py
# checks other configurations. (Repeats of one 2-rank run vary by about 4-8 %: the lifetimes of
# communication buffers depend on timing.)
DEFAULT_COEFFS = {"c_act_sp": 1.245, "c_act_sp_ckpt": 1.39, "c_act_one": 1.146, "c_act_one_ckpt": 1.37,
                  "c_fixed_sp": 1.46e6, "c_fixed": 0.0}
# Step time (module docstring): c_time: measured 1-rank forward+backward / the probes' prediction;
# c_opt: DeepSpeed's optimizer phase / the probe's torch optimizer step (+ clipping); c_sp: SPIM's
# fixed cost per pass at sp > 1 in units of the plain model's per-pass fixed cost t0; c_bw: bytes/s
# of one rank's DeepSpeed collectives. Calibrated by calibrate_from_bench on two quiet rest-ds bench
# runs of this machine (2 cores, gloo, one thread per rank, fp32, ZeRO-2; 2026-12-07, at e6d174a):
# nc_landsat7_rest at 443x489 / 256 / 512 / 1024 px and nc_landsat7_resnet18 at 443x489 / 256 / 512
# px, 1 rank and 1x2 / 2x1 (14 runs), profiles taken on the shared machine: c_time 0.963, c_opt 1.68,
# c_sp 3.14, c_bw 1.15e9 (per model: c_sp 4.5 ViT, 2.9 ResNet; c_bw 1.5e9, 1.1e9). The probes vary
# by 5-15 % with the machine's load (thread CPU time still shares caches and cores), and so does c_time.
# These were fitted with u from the probes' curvature; with u timed directly (attention_term) c_time
# refitted to the same 443 x 489 run came out 1.4-4.1 % higher in five of six paired profiles (2026-12-08,
# loaded machine: 0.955-1.141 over the profiles), within that noise: left as it was, to be refitted from
# the next quiet bench (calibrate_from_bench).
DEFAULT_TIME_COEFFS = {"c_time": 0.963, "c_opt": 1.68, "c_sp": 3.14, "c_bw": 1.15e9}


# --- the allocator measure -----------------------------------------------------------------------------
class LiveBytes:
    """Peak live bytes of CPU tensor allocations inside the ``with`` block (torch
    profiler memory events: the CPU allocator reports every allocation and every
    free of a block allocated inside the block; frees of older blocks are not
    reported, so they never make the count negative)."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        # kineto prints its start/stop probes and (without a GPU) "gpuGetDeviceCount failed" on
        # stderr when it first starts; a user's own KINETO_LOG_LEVEL wins
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        sizes = [(e.start_ns(), int(e.nbytes())) for e in self._prof.profiler.kineto_results.events()
                 if e.name() == "[memory]"]
        sizes.sort()
        cur = peak = 0
        for _, n in sizes:
            cur += n
            peak = max(peak, cur)
        self.peak, self.end = peak, cur
        del self._prof
        return False


# --- measurements ----------------------------------------------------------------------------------
def _train_config(model: dict, zero_stage: int = 2, optimizer: str = "adamw", precision: str = "fp32",
                  act_ckpt: bool = False, grid: tuple[int, int] | None = None, bucket: int | None = None):
    from .config import load_config

    return load_config(data={
        "name": "plan", "model": model, "data": {"scenes": ["(plan)"]},
        "mesh": {"grid": f"{grid[0]}x{grid[1]}" if grid else "auto"},
        "deepspeed": {"zero_stage": zero_stage, "precision": precision, "reduce_bucket_size": bucket},
        "optimizer": {"name": optimizer}, "train": {"activation_checkpointing": act_ckpt}})


def _opt_values(optimizer: str, momentum: float = 0.9) -> int:
    """Optimizer state values per parameter."""
    return 2 if optimizer in ("adamw", "adam") else (1 if momentum else 0)


def measure_step(spec: dict) -> dict:
    """Rank body (``torch.distributed`` initialised on gloo, e.g. under
    ``rest_ds.spim.spawn``): build the model, parallelize it over ``dp x sp``, hand it
    to DeepSpeed as the training engine does, and run ``spec['steps']`` (default 2)
    training steps on a random scene of ``spec['hw']``; returns this rank's peak live
    tensor bytes over all of it (:class:`LiveBytes`) and the time of one more step.

    ``spec``: model (ModelConfig mapping), in_chans, num_classes, hw, grid (PH, PW),
    zero_stage, optimizer, act_ckpt, steps, optionally bucket (deepspeed.reduce_bucket_size)."""
    import torch
    import torch.distributed as dist

    from ..spim import SpatialMesh, TileLayout, from_local, parallelize
    from . import deepspeed_compat as dsc
    from .engine import build_model, enable_activation_checkpointing, make_optimizer
    from .inference import padded_shape
    from .metrics import segmentation_loss

    dsc.init_comm()
    grid = tuple(spec["grid"])
    cfg = _train_config(spec["model"], spec["zero_stage"], spec["optimizer"], "fp32", spec["act_ckpt"], grid,
                        spec.get("bucket"))
    sp = grid[0] * grid[1]
    K, C = spec["num_classes"], spec["in_chans"]
    gen = torch.Generator().manual_seed(1)
    with LiveBytes() as lb:
        torch.manual_seed(0)
        model, _ = build_model(cfg.model, num_classes=K, in_chans=C)
        align = int(getattr(model, "align", None) or 1)
        if spec["act_ckpt"]:
            enable_activation_checkpointing(model)
        mesh = SpatialMesh.build(sp=sp, grid=grid)
        layout = TileLayout.even(*padded_shape(tuple(spec["hw"]), align), grid, align)
        rows, cols = layout.tile(*mesh.coord)
        if sp > 1:
            parallelize(model, mesh, align=align, rng_seed=0)
        aux = float(getattr(model, "aux_weight", 0.0)) if getattr(model, "aux_head", None) else 0.0
        engine, *_ = dsc.initialize(model, make_optimizer(model, cfg),
                                    dsc.ds_config(cfg, 1, params=dsc.param_count(model)))
        x = torch.randn((1, C, rows.stop - rows.start, cols.stop - cols.start), generator=gen)
        y = torch.randint(0, K, (1,) + tuple(x.shape[-2:]), generator=gen)
        if sp > 1:
            x = from_local(x, mesh, layout=layout)
            y = from_local(y, mesh, dims=(1, 2), layout=layout)

        def step():
            loss = segmentation_loss(engine(x), y, aux_weight=aux)
            engine.backward(loss)
            engine.step()

        for _ in range(int(spec.get("steps", 2))):
            step()
    dist.barrier()
    t0 = time.perf_counter()
    step()
    dist.barrier()
    secs = time.perf_counter() - t0
    n = dsc.param_count(engine.module)
    engine.destroy()
    return {"peak_bytes": lb.peak, "step_s": secs, "params": n, "rank": dist.get_rank(),
            "tile_px": (rows.stop - rows.start) * (cols.stop - cols.start)}


def measure_steps(specs: list[dict]) -> list[dict]:
    """Rank body: :func:`measure_step` of each spec in turn (one set-up of the ranks)."""
    return [measure_step(s) for s in specs]


@dataclass
class ModelProfile:
    """What :func:`profile_model` measured of a model (one process, plain model,
    training mode): ``params``; per activation-checkpointing setting (``"0"``/``"1"``)
    the fit ``peak(A) = a A + q A^2 + b`` of one forward/backward's peak live bytes
    over scene pixels ``A`` (gradients already allocated, so the fit holds activations and
    backward temporaries), the fit ``t(A) = s A + u A^2 + t0`` of that forward/backward's
    seconds (``u``: the attention measured on its own, :func:`attention_term`; ``s``, ``t0``
    fitted to what the probes leave after it; ``s_per_px``: the least seconds per pixel over
    the probes), and ``times[setting]``: ``[side, seconds]`` per timed probe side; ``opt_s``:
    one optimizer step (with gradient clipping where configured) over all parameters;
    ``attention``: :func:`attention_term`'s result plus ``calls`` (per sdpa call: ``q``, ``k``
    shapes at the second probe side, ``keys`` "scene" or "window", ``rho_q``, ``rho_k``)."""

    encoder: str
    params: int
    largest_layer: int
    align: int
    fits: dict[str, dict[str, float]] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)
    times: dict[str, list[list[float]]] = field(default_factory=dict)
    opt_s: float = 0.0
    attention: dict = field(default_factory=dict)


def _fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Least squares ``y = a x + q x^2 + b`` with ``q >= 0`` (a linear fit when the
    curvature comes out negative: then it is measurement noise)."""
    import numpy as np

    xs = np.array([p[0] for p in points], dtype=np.float64)
    ys = np.array([p[1] for p in points], dtype=np.float64)
    if len(points) >= 3:
        (q, a, b) = np.polyfit(xs, ys, 2)
        if q >= 0 and a >= 0:
            return float(a), float(q), float(b)
    a, b = np.polyfit(xs, ys, 1)
    return float(max(a, 0.0)), 0.0, float(b)


def _fit_time(points: list[tuple[float, float]], quadratic: bool = True) -> tuple[float, float, float]:
    """Non-negative least squares ``t = s A + u A^2 + t0`` in two stages: ``t0`` from a fit
    on the relative error (the small probes pin it: on the absolute error it varied 2x between
    profiles of one model on this shared machine), then ``s`` and ``u`` on the absolute error of
    ``t - t0`` (the largest probes, the ones nearest real tiles, weigh most). ``u = 0`` unless
    ``quadratic`` (a model without attention: its probes' curvature is the machine's noise,
    and extrapolated to a large scene it would dominate)."""
    import numpy as np
    from scipy.optimize import nnls

    xs = np.array([p[0] for p in points], dtype=np.float64)
    ys = np.array([p[1] for p in points], dtype=np.float64)
    m = max(float(xs.max()), 1.0)
    cols = np.stack([xs / m, (xs / m) ** 2 * quadratic, np.ones_like(xs)], axis=1)  # scaled: well-conditioned
    w = 1.0 / np.maximum(ys, 1e-12)
    t0 = float(nnls(cols * w[:, None], ys * w)[0][2])
    (s, u), _ = nnls(cols[:, :2], ys - t0)
    return float(s / m), float(u / m ** 2), t0


class _SeesAttention:
    """``with _SeesAttention() as sa: model(x)``: ``sa.calls`` records every
    ``F.scaled_dot_product_attention`` call of the pass (whose cost grows with tile x scene
    under SPIM when its keys are the scene's tokens), in order: the shapes of ``q``, ``k``,
    ``v`` and of the mask (None: none), the dtype, ``dropout_p``, ``is_causal``, ``scale`` and
    ``enable_gqa``; ``sa.seen``: whether there was any."""

    _ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

    def __enter__(self):
        import torch.nn.functional as F
        from torch.overrides import TorchFunctionMode

        outer = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is F.scaled_dot_product_attention:
                    a = {**dict(zip(outer._ARGS, args)), **(kwargs or {})}
                    m = a.get("attn_mask")
                    outer.calls.append({
                        "q": tuple(a["query"].shape), "k": tuple(a["key"].shape), "v": tuple(a["value"].shape),
                        "dtype": str(a["query"].dtype).replace("torch.", ""),
                        "mask": None if m is None else (tuple(m.shape), str(m.dtype).replace("torch.", "")),
                        "dropout_p": float(a.get("dropout_p") or 0.0), "is_causal": bool(a.get("is_causal")),
                        "scale": a.get("scale"), "enable_gqa": bool(a.get("enable_gqa"))})
                return func(*args, **(kwargs or {}))

        self.calls, self._mode = [], Mode()
        self._mode.__enter__()
        return self

    @property
    def seen(self) -> bool:
        return bool(self.calls)

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def attention_calls(model, in_chans: int, sides: tuple[int, int]) -> list[dict]:
    """The ``scaled_dot_product_attention`` calls of ``model``'s forward (no gradients) on
    random square scenes of the two ``sides``, paired in call order and classified:
    ``keys = "scene"`` where the queries and the keys both grow with the scene (global
    attention: under SPIM the rank's tile's queries meet the whole scene's keys, a cost in
    tile x scene), with ``rho_q``, ``rho_k`` (tokens per pixel: the slope of the token counts
    over the pixels); ``keys = "window"`` where they do not (windowed attention, a fixed key
    set: keys = its window, a cost linear in the tile that the probes' linear term holds).
    Each entry: the call at the larger side (:class:`_SeesAttention`'s fields) plus those.
    Raises ValueError when the two passes call it a different number of times."""
    import torch

    gen = torch.Generator().manual_seed(2)
    seen = []
    for s in sides:
        with torch.no_grad(), _SeesAttention() as sa:
            model(torch.randn((1, in_chans, s, s), generator=gen))
        seen.append(sa.calls)
    if len(seen[0]) != len(seen[1]):
        raise ValueError(f"the model calls scaled_dot_product_attention {len(seen[0])} times at {sides[0]} px "
                         f"but {len(seen[1])} times at {sides[1]} px: its attention term cannot be measured")
    dA = float(sides[1] ** 2 - sides[0] ** 2)
    out = []
    for a, b in zip(*seen):
        dq, dk = b["q"][-2] - a["q"][-2], b["k"][-2] - a["k"][-2]
        glob = dq > 0 and dk > 0
        out.append({**b, "keys": "scene" if glob else "window",
                    "rho_q": dq / dA if glob else 0.0, "rho_k": dk / dA if glob else 0.0})
    return out


ATTN_PROBE_S = 0.3  # seconds: the largest isolated attention pass the probe times
ATTN_PROBE_BYTES = 2 ** 30  # bytes of one head set's scores (n x n): a bound on the timed tokens


def _time_attention(call: dict, clock, n_max: int) -> tuple[float, float, int]:
    """Seconds per (query token x key token) of one recorded attention ``call`` (its batch and
    head dims, head width, dtype, mask, dropout, causality), forward and backward (to q, k, v)
    apart: timed on its own at ``n`` queries x ``n`` keys, ``n`` doubled from the call's own key
    count until a pass takes over ``ATTN_PROBE_S / 4`` (the next would take ~``ATTN_PROBE_S``),
    or reaches ``n_max`` or ``ATTN_PROBE_BYTES`` of scores; the faster of two passes at the
    last ``n``, divided by ``n^2`` (sdpa's cost grows as Nq x Nk once it is large). Returns
    (forward, backward, n)."""
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, call["dtype"])
    lead_q, lead_k = call["q"][:-2], call["k"][:-2]
    heads = math.prod(lead_q) or 1
    n = max(16, min(call["k"][-2], n_max))
    kw = {"dropout_p": call["dropout_p"], "is_causal": call["is_causal"], "scale": call["scale"]}
    if call["enable_gqa"]:
        kw["enable_gqa"] = True
    gen = torch.Generator().manual_seed(3)

    def one(n: int) -> tuple[float, float]:
        q = torch.randn((*lead_q, n, call["q"][-1]), generator=gen).to(dt).requires_grad_()
        k = torch.randn((*lead_k, n, call["k"][-1]), generator=gen).to(dt).requires_grad_()
        v = torch.randn((*lead_k, n, call["v"][-1]), generator=gen).to(dt).requires_grad_()
        mask = None
        if call["mask"] is not None:  # the recorded mask's shape, its token dims at n (broadcast dims kept)
            shape, mdt = call["mask"]
            shape = (*shape[:-2], *(1 if d == 1 else n for d in shape[-2:]))
            mask = (torch.ones(shape, dtype=torch.bool) if mdt == "bool"
                    else torch.zeros(shape, dtype=getattr(torch, mdt)))
        t = clock()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
        tf = clock()
        out.backward(torch.ones_like(out))
        return tf - t, clock() - tf

    one(n)  # untimed: one-off set-up
    while True:
        runs = [one(n), one(n)]
        tf, tb = min(runs, key=lambda r: r[0] + r[1])
        bigger = 2 * n
        if (tf + tb > ATTN_PROBE_S / 4 or bigger > n_max
                or heads * bigger * bigger * torch.empty((), dtype=dt).element_size() > ATTN_PROBE_BYTES):
            return tf / n ** 2, tb / n ** 2, n
        n = bigger


def attention_term(calls: list[dict], clock, n_max: int = 16384) -> dict:
    """The attention term of :func:`step_time` from recorded calls (:func:`attention_calls`):
    ``u`` (seconds per tile pixel x scene pixel, forward + backward) = the sum over the global
    calls (``keys = "scene"``) of their timed seconds per query x key token
    (:func:`_time_attention`, once per distinct call) x ``rho_q rho_k``; ``u_fwd`` the forward's
    part (activation checkpointing recomputes it). Windowed calls add nothing here (their cost
    is linear in the tile). Also ``timed``: one entry per distinct timed call."""
    cache: dict = {}
    u = u_fwd = 0.0
    for c in calls:
        if c["keys"] != "scene":
            continue
        key = tuple((k, repr(v)) for k, v in c.items() if k not in ("q", "k", "v", "keys", "rho_q", "rho_k")) + (
            c["q"][:-2], c["q"][-1], c["k"][:-2], c["k"][-1], c["v"][-1])
        if key not in cache:
            cache[key] = _time_attention(c, clock, n_max)
        tf, tb, _ = cache[key]
        u += (tf + tb) * c["rho_q"] * c["rho_k"]
        u_fwd += tf * c["rho_q"] * c["rho_k"]
    timed = [{"q": list(k[-5]) + [k[-4]], "fwd_s_per_pair": tf, "bwd_s_per_pair": tb, "n": n}
             for k, (tf, tb, n) in cache.items()]
    return {"u": u, "u_fwd": u_fwd, "timed": timed}


PROBE_BUDGET = 2e12  # parameters x probe pixels: bounds the probes' forward/backward cost on a CPU


def probe_sides(params: int, align: int) -> tuple[int, int, int]:
    """Three probe scene sides, multiples of ``align``: ``8, 12, 16 x max(align, 16)``,
    the largest at most 512 px and ``sqrt(PROBE_BUDGET / params)`` (a 300 M-parameter
    encoder is probed on 64-96 px scenes, seconds each on a CPU core), at least 3 x align."""
    base = max(align, 16)
    cap = min(512, int(math.sqrt(PROBE_BUDGET / max(params, 1))))
    cap = max(3 * align, cap // align * align)
    sides = [max(align, min(cap, k * base) // align * align) for k in (8, 12, 16)]
    if len(set(sides)) < 3:  # the cap merged them: the three largest multiples of align up to it
        sides = [cap - 2 * align, cap - align, cap]
    return tuple(sides)


def profile_model(model_cfg: "ModelConfig | dict", in_chans: int, num_classes: int,
                  act_ckpt: tuple[bool, ...] = (False,),
                  sides: tuple[int, ...] | None = None, train_cfg: "TrainConfig | None" = None) -> ModelProfile:
    """Measure ``model_cfg`` (with activation checkpointing too when ``act_ckpt`` holds True
    and the encoder has the switch) on small synthetic square scenes (three sides, multiples of
    the model's alignment, :func:`probe_sides`) in this process; a few seconds for
    small models, about a minute for a 300 M-parameter encoder on a CPU core. The weights are
    random (the values do not matter). The forward/backward is also timed at two smaller sides
    (2 and 4 x max(align, 16)), which pin the per-pass fixed cost ``t0``; the model's
    ``scaled_dot_product_attention`` calls are recorded at the two smallest probe sides and
    timed on their own (:func:`attention_calls`, :func:`attention_term`: under a second for a
    few distinct calls), which gives the attention term ``u``; then one step of
    ``train_cfg``'s optimizer (its parameter groups and gradient clipping; None: AdamW) is timed
    on the gradients (``opt_s``)."""
    import torch

    from .engine import build_model, enable_activation_checkpointing
    from .metrics import segmentation_loss

    torch.manual_seed(0)
    model, mcfg = build_model(model_cfg, num_classes=num_classes, in_chans=in_chans)
    align = int(getattr(model, "align", None) or 1)
    if sides is None:
        sides = probe_sides(sum(p.numel() for p in model.parameters()), align)
    params = sum(p.numel() for p in model.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    aux = float(getattr(model, "aux_weight", 0.0)) if getattr(model, "aux_head", None) else 0.0
    prof = ModelProfile(encoder=str(mcfg["encoder"]["name"]), params=params, largest_layer=largest, align=align,
                        sizes=list(sides))
    model.train()
    gen = torch.Generator().manual_seed(1)
    # one torch thread: its CPU time, which other jobs' load does not inflate; several: wall
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    cks = []  # the settings measured: checkpointing only where the encoder has the switch
    for ck in act_ckpt:
        if ck:
            try:
                enable_activation_checkpointing(model, True)
            except ConfigError:  # the encoder has no switch: no checkpointing choice
                continue
        cks.append(ck)

    def use(ck: bool) -> None:
        if True in cks:
            enable_activation_checkpointing(model, ck)

    base = max(align, 16)
    small = sorted({k * base // align * align for k in (2, 4)} - set(sides))
    small = [v for v in small if v < min(sides)]
    points: dict = {ck: [] for ck in cks}
    timed: dict = {ck: [] for ck in cks}
    # the attention term, measured directly: the model's sdpa calls at two probe sides (which
    # grow with the scene: global), each timed on its own at thousands of tokens (u), instead of
    # the probes' curvature, which this shared machine's noise swamps at <= 512 px
    try:
        calls = attention_calls(model, in_chans, (sides[0], sides[1]))
        prof.attention = attention_term(calls, clock)
        prof.attention["calls"] = [{k: c[k] for k in ("q", "k", "keys", "rho_q", "rho_k")} for c in calls]
    except ValueError as e:  # the calls cannot be paired: the probes' curvature, as before, and why
        prof.attention = {"u": None, "note": str(e)}
    for i, s in enumerate([*small, *sides]):
        x = torch.randn((1, in_chans, s, s), generator=gen)
        y = torch.randint(0, num_classes, (1, s, s), generator=gen)
        # Timed: the faster of two passes per setting, the settings interleaved, after an untimed
        # one each at the first side (one-off set-up costs, and a drift of the machine's speed,
        # then favour neither). The gradients exist before the measured passes (accumulated into
        # in place): their allocation would otherwise hide the activations of a large model at a
        # small probe. The small timing-only sides are cheap: five passes there steady t0.
        times: dict = {ck: [] for ck in cks}
        try:
            for _ in range((1 if i == 0 else 0) + (2 if s in sides else 5)):
                for ck in cks:
                    use(ck)
                    t0 = clock()
                    segmentation_loss(model(x), y, aux_weight=aux).backward()
                    times[ck].append(clock() - t0)
        except (RuntimeError, ValueError):
            if s in sides:
                raise
            continue  # a small timing-only side the model cannot take (BatchNorm of a 1 x 1 map): skipped
        for ck in cks:
            timed[ck].append([s, min(times[ck][1:] if i == 0 else times[ck])])
            if s not in sides:
                continue
            use(ck)
            model.zero_grad(set_to_none=False)
            with LiveBytes() as lb:
                loss = segmentation_loss(model(x), y, aux_weight=aux)
                loss.backward()
            del loss
            points[ck].append((float(s * s), float(lb.peak)))
    for ck in cks:
        a, q, b = _fit(points[ck])
        # s and t0 from what the probes leave after the measured attention (recomputed forward too
        # under checkpointing, an upper bound where not every attention block is checkpointed)
        if prof.attention["u"] is None:
            s_px, u, t0 = _fit_time([(float(s * s), t) for s, t in timed[ck]])
        else:
            u = prof.attention["u"] + (prof.attention["u_fwd"] if ck else 0.0)
            s_px, _, t0 = _fit_time([(float(s * s), t - u * float(s * s) ** 2) for s, t in timed[ck]],
                                    quadratic=False)
        prof.fits["1" if ck else "0"] = {"a": a, "q": q, "b": b, "s": s_px, "u": u, "t0": t0,
                                         "s_per_px": min(t / (s * s) for s, t in timed[ck] if s in sides)}
        prof.times["1" if ck else "0"] = timed[ck]
    prof.opt_s = _time_optimizer(model, train_cfg, clock)
    model.zero_grad(set_to_none=True)
    return prof


def _time_optimizer(model, train_cfg, clock) -> float:
    """Seconds of one optimizer step over ``model``'s parameters (their gradients exist):
    the faster of two after one untimed (which allocates the optimizer state); DeepSpeed's
    gradient clipping (``deepspeed.gradient_clipping`` > 0) is part of its step, so timed with it."""
    import torch

    from .engine import make_optimizer

    opt = make_optimizer(model, train_cfg) if train_cfg is not None else torch.optim.AdamW(model.parameters())
    clip = float(getattr(getattr(train_cfg, "deepspeed", None), "gradient_clipping", 0.0) or 0.0)
    ps = [p for p in model.parameters() if p.grad is not None]
    secs = []
    for _ in range(3):
        t0 = clock()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(ps, clip)
        opt.step()
        secs.append(clock() - t0)
    del opt
    return min(secs[1:])


# --- the model -----------------------------------------------------------------------------------------
# DeepSpeed's ZeRO gradient buckets: reduce_bucket_size values (deepspeed.reduce_bucket_size; by
# default min(5e8, params), deepspeed_compat.bucket_sizes: the value the engine passes to DeepSpeed),
# allocated whatever the gradients need. Stage 1 stages them in fp32 and holds two at its peak
# (measured: 2 x 5e8 x 4 bytes at DeepSpeed's default), stages 2 and 3 one in the model's precision.
def reduce_bucket(params: int, configured: int | None = None) -> int:
    """Values of DeepSpeed's reduce bucket for a model of ``params`` (``configured``:
    ``deepspeed.reduce_bucket_size``, None: the default the engine uses)."""
    from .deepspeed_compat import bucket_sizes

    return bucket_sizes(params, configured)[0]


def _bucket_bytes(stage: int, w: int, bucket: int) -> float:
    return 0.0 if stage == 0 else (2 * 4 * bucket if stage == 1 else w * bucket)


def static_bytes(params: int, world: int, stage: int, precision: str, opt_values: int,
                 largest_layer: int = 0, bucket: int | None = None) -> dict[str, float]:
    """Per-rank bytes of parameters, gradients, fp32 master copy, optimizer state and
    DeepSpeed's buckets for ``params`` values over ``world`` ranks (module docstring);
    ``bucket``: ``deepspeed.reduce_bucket_size`` (None: sized to the model, as trained)."""
    P, N = float(params), float(world)
    w = 4 if precision == "fp32" else 2
    mixed = precision != "fp32"
    parts = {
        "params": w * P if stage < 3 else w * P / N + w * largest_layer,
        "grads": w * P if stage < 2 else w * P / N,
        "master": (4 * P if mixed else 0.0) if stage == 0 else 4 * P / N,
        "optimizer": 4 * opt_values * P / (1 if stage == 0 else N),
        "buckets": _bucket_bytes(stage, w, reduce_bucket(params, bucket)),
        # the optimizer step's temporaries: one fp32 tensor per (partitioned) parameter (Adam's
        # denominator, SGD's decayed gradient); they live after backward, when activations are gone
        "step_temp": 4 * P / (1 if stage == 0 else N),
    }
    return parts


def estimate(prof: ModelProfile, *, hw: tuple[int, int], grid: tuple[int, int], world: int, zero_stage: int,
             precision: str = "fp32", optimizer: str = "adamw", momentum: float = 0.9, act_ckpt: bool = False,
             coeffs: dict | None = None, batch: int = 1, bucket: int | None = None) -> dict[str, Any]:
    """Per-rank peak bytes (and their parts) and step seconds of one configuration:
    a scene of ``hw`` pixels (padded to the model's alignment) over ``grid`` (the sp
    ranks), ``world = dp x sp`` ranks, ``batch`` such scenes per rank and step (crop
    mode: the crops); ``bucket``: ``deepspeed.reduce_bucket_size`` (None: sized to the
    model, as the engine does). The peak is that of the rank with the largest tile."""
    from ..spim.tiling import TileLayout
    from .inference import padded_shape

    c = {**DEFAULT_COEFFS, **(coeffs or {})}
    sp = grid[0] * grid[1]
    if world % sp:
        raise ValueError(f"{world} ranks are not a multiple of the grid's {sp} tiles")
    H, W = padded_shape(tuple(hw), prof.align)
    layout = TileLayout.even(H, W, grid, prof.align)
    tile = max((layout.rows[i + 1] - layout.rows[i]) * (layout.cols[j + 1] - layout.cols[j])
               for i in range(grid[0]) for j in range(grid[1]))
    fit = prof.fits["1" if act_ckpt else "0"]
    w = 4 if precision == "fp32" else 2
    key = "c_act_one" if sp == 1 else "c_act_sp"
    c_act = c.get(f"{key}_ckpt", c[key]) if act_ckpt else c[key]
    act = batch * (fit["a"] * tile + fit["q"] * tile * H * W) * c_act * w / 4
    parts = static_bytes(prof.params, world, zero_stage, precision, _opt_values(optimizer, momentum),
                         prof.largest_layer, bucket)
    parts["activations"] = act
    parts["overhead"] = c["c_fixed"] + (c["c_fixed_sp"] if sp > 1 else 0.0)
    times = step_time(prof, fit, tile=tile, scene_px=H * W, sp=sp, world=world, zero_stage=zero_stage,
                      precision=precision, batch=batch, coeffs=c)
    step_s = sum(times.values())
    return {"grid": tuple(grid), "sp": sp, "dp": world // sp, "world": world, "zero_stage": zero_stage,
            "act_ckpt": act_ckpt, "precision": precision, "scene": (H, W), "tile_px": tile,
            # pixels along the interior tile borders: what the halo exchanges scale with
            "border_px": (grid[0] - 1) * W + (grid[1] - 1) * H,
            "parts": parts, "peak_bytes": peak_of(parts), "step_s": step_s, "time_parts": times}


def grad_comm_bytes(params: int, world: int, zero_stage: int, precision: str = "fp32") -> float:
    """Bytes one rank sends per step in DeepSpeed's collectives over ``world`` ranks (ring
    algorithms): the gradient all-reduce ``2 (N-1)/N w P`` (stages 0-2; ZeRO-1/2 reduce
    then the updated partitions are all-gathered, ``(N-1)/N w P`` more), stage 3 the
    parameters gathered in forward and in backward and the gradients reduce-scattered
    (``3 (N-1)/N w P``); 0 on one rank."""
    if world <= 1:
        return 0.0
    w = 4 if precision == "fp32" else 2
    f = (world - 1) / world * w * float(params)
    return {0: 2 * f, 1: 3 * f, 2: 3 * f}.get(zero_stage, 3 * f)


def step_time(prof: ModelProfile, fit: dict, *, tile: int, scene_px: int, sp: int, world: int, zero_stage: int,
              precision: str = "fp32", batch: int = 1, coeffs: dict | None = None) -> dict[str, float]:
    """Seconds of one training step on the rank with the largest tile, by part (module
    docstring): ``compute`` = c_time x batch x (s tile + u tile scene_px + t0),
    ``optimizer`` = c_opt x opt_s / N (N = world from ZeRO stage 1 on, else 1),
    ``spim`` = c_sp x batch x t0 (sp > 1), ``comm`` = :func:`grad_comm_bytes` / c_bw
    (world > 1). ``fit``: one entry of ``prof.fits`` (older profiles without ``s``/``u``/``t0``
    fall back to ``s_per_px`` alone)."""
    c = {**DEFAULT_TIME_COEFFS, **(coeffs or {})}
    s, u, t0 = fit.get("s", fit.get("s_per_px", 0.0)), fit.get("u", 0.0), fit.get("t0", 0.0)
    n_opt = world if zero_stage >= 1 else 1
    return {"compute": c["c_time"] * batch * (s * tile + u * tile * scene_px + t0),
            "optimizer": c["c_opt"] * prof.opt_s / n_opt,
            "spim": c["c_sp"] * batch * t0 if sp > 1 else 0.0,
            "comm": grad_comm_bytes(prof.params, world, zero_stage, precision) / c["c_bw"]}


def peak_of(parts: dict[str, float]) -> float:
    """Activations (forward/backward) and the optimizer step's temporaries do not live at once."""
    rest = sum(v for k, v in parts.items() if k not in ("activations", "step_temp"))
    return rest + max(parts.get("activations", 0.0), parts.get("step_temp", 0.0))


def calibrate(rows: list[dict], prof_of: dict[str, ModelProfile]) -> dict[str, float]:
    """Fit ``c_act_sp``, ``c_act_one`` and ``c_fixed`` to measured per-rank peaks.

    ``rows``: one per measured configuration: ``model`` (a key of ``prof_of``), ``hw``,
    ``grid``, ``world``, ``zero_stage``, ``optimizer``, ``act_ckpt``, ``precision``,
    optionally ``bucket`` (``deepspeed.reduce_bucket_size``; absent: sized to the model)
    and ``peak_bytes`` (the largest over the ranks, as measure_step / rest-ds bench
    report it). Least squares on the relative error."""
    import numpy as np

    A, y = [], []
    for r in rows:
        e = estimate(prof_of[r["model"]], hw=tuple(r["hw"]), grid=tuple(r["grid"]), world=r["world"],
                     zero_stage=r["zero_stage"], precision=r.get("precision", "fp32"),
                     optimizer=r.get("optimizer", "adamw"), act_ckpt=r.get("act_ckpt", False),
                     bucket=r.get("bucket"), coeffs={"c_act_sp": 1.0, "c_act_sp_ckpt": 1.0, "c_act_one": 1.0, "c_act_one_ckpt": 1.0,
                             "c_fixed_sp": 0.0, "c_fixed": 0.0})
        parts, sp, m = e["parts"], e["sp"], float(r["peak_bytes"])
        act = parts["activations"]
        # m ~ rest + max(act * c_act(sp), step_temp) + c_fixed, weighted by 1/m (relative error); the
        # rows whose peak is the optimizer step say nothing about c_act
        if act < parts["step_temp"]:
            act = 0.0
        base = peak_of({**parts, "activations": 0.0}) if act == 0.0 else peak_of(parts) - parts["activations"]
        ck = bool(r.get("act_ckpt", False))
        A.append([act * (sp > 1 and not ck) / m, act * (sp > 1 and ck) / m, act * (sp == 1 and not ck) / m,
                  act * (sp == 1 and ck) / m, (sp > 1) / m, 1.0 / m])
        y.append((m - base) / m)
    from scipy.optimize import nnls

    sol, _ = nnls(np.array(A), np.array(y))  # every coefficient >= 0
    out = dict(zip(("c_act_sp", "c_act_sp_ckpt", "c_act_one", "c_act_one_ckpt", "c_fixed_sp", "c_fixed"),
                   (float(v) for v in sol)))
    for key, sp_many in (("c_act_sp", True), ("c_act_one", False)):  # a case nothing measured: as without
        if not any(r.get("act_ckpt") and (r["grid"][0] * r["grid"][1] > 1) == sp_many for r in rows):
            out[f"{key}_ckpt"] = out[key]
    return out


# --- a run's candidates ----------------------------------------------------------------------------
def _factor_grids(sp: int) -> list[tuple[int, int]]:
    return [(a, sp // a) for a in range(1, sp + 1) if sp % a == 0]


def candidates(prof: ModelProfile, *, hw: tuple[int, int], ranks: int, sp: int | None = None,
               grid: tuple[int, int] | None = None, stages=(0, 1, 2, 3), ckpt=(False, True),
               precision: str = "fp32", optimizer: str = "adamw", momentum: float = 0.9,
               coeffs: dict | None = None, batch: int = 1, bucket: int | None = None) -> list[dict]:
    """:func:`estimate` of every layout of ``ranks`` ranks (sp dividing ``ranks``, or the
    given ``sp`` / ``grid``), ZeRO stage and activation-checkpointing choice."""
    from .inference import padded_shape

    H, W = padded_shape(tuple(hw), prof.align)
    sps = [grid[0] * grid[1]] if grid else ([sp] if sp else [d for d in range(1, ranks + 1) if ranks % d == 0])
    out = []
    for s in sps:
        for g in ([grid] if grid else _factor_grids(s)):
            if H // prof.align < g[0] or W // prof.align < g[1]:
                continue  # fewer alignment units than tiles along a side
            for z in stages:
                for c in ckpt:
                    if c and str(1) not in prof.fits:
                        continue
                    out.append(estimate(prof, hw=hw, grid=g, world=ranks, zero_stage=z, precision=precision,
                                        optimizer=optimizer, momentum=momentum, act_ckpt=c, coeffs=coeffs,
                                        batch=batch, bucket=bucket))
    return out


def recommend(cands: list[dict], memory_bytes: float | None, headroom: float = 0.9) -> dict | None:
    """The candidate to run: among those whose peak fits ``headroom x memory`` (all when
    no memory is given), the fastest step per scene (step_s / dp), then the least halo
    traffic (smallest sp, then the shortest tile borders), the lowest ZeRO stage (least
    gradient traffic), no recomputation, the smallest peak. None when nothing fits."""
    ok = [c for c in cands if memory_bytes is None or c["peak_bytes"] <= headroom * memory_bytes]
    return min(ok, key=_preference) if ok else None


def _preference(c: dict) -> tuple:
    return (round(c["step_s"] / c["dp"], 6), c["sp"], c["border_px"], c["zero_stage"], c["act_ckpt"],
            c["peak_bytes"])


def max_scene(prof: ModelProfile, *, devices: int, memory_bytes: float, aspect: float = 1.0,
              headroom: float = 0.9, precision: str = "fp32", optimizer: str = "adamw", momentum: float = 0.9,
              sp: int | None = None, ckpt=(False, True), coeffs: dict | None = None,
              bucket: int | None = None) -> dict | None:
    """The largest scene (``H = aspect x W``, multiples of the alignment) whose per-rank
    peak fits ``headroom x memory`` on ``devices`` ranks, over every layout, ZeRO stage
    and checkpointing choice; the winning :func:`estimate` with ``side`` added, or None."""
    best = None
    a = prof.align
    for s in ([sp] if sp else [d for d in range(1, devices + 1) if devices % d == 0]):
        for g in _factor_grids(s):
            for z in (0, 1, 2, 3):
                for c in ckpt:
                    if c and "1" not in prof.fits:
                        continue

                    def peak(units: int) -> float:
                        w = units * a
                        h = max(a, int(round(w * aspect / a)) * a)
                        return estimate(prof, hw=(h, w), grid=g, world=devices, zero_stage=z, precision=precision,
                                        optimizer=optimizer, momentum=momentum, act_ckpt=c, coeffs=coeffs,
                                        bucket=bucket)

                    lo = max(g)  # at least one alignment unit per tile
                    if peak(lo)["peak_bytes"] > headroom * memory_bytes:
                        continue
                    hi = lo
                    while peak(hi * 2)["peak_bytes"] <= headroom * memory_bytes and hi < 10 ** 7:
                        hi *= 2
                    hi *= 2
                    while hi - lo > 1:  # peak(lo) fits, peak(hi) does not
                        mid = (lo + hi) // 2
                        lo, hi = (mid, hi) if peak(mid)["peak_bytes"] <= headroom * memory_bytes else (lo, mid)
                    e = peak(lo)
                    px = e["scene"][0] * e["scene"][1]
                    if best is None or px > best["scene"][0] * best["scene"][1] or (
                            px == best["scene"][0] * best["scene"][1] and e["step_s"] < best["step_s"]):
                        best = e
    return best


def calibrate_from_bench(path: str, profile_of) -> dict[str, float]:
    """Coefficients from ``rest-ds bench`` JSON. Step time (:func:`step_time`): ``c_opt`` =
    median over the 1-rank runs of their optimizer phase (``phases_s['optimizer']``) / ``opt_s``;
    ``c_time`` = median over the 1-rank runs of (measured step - optimizer) / predicted
    forward+backward (over every run's residual after the other terms where no run has
    1 rank); ``c_bw`` =
    median over the runs with ranks > 1 of the bytes one rank sent in DeepSpeed's
    collectives (``bytes['ds:*']`` / ranks) per second blocked in them (``comm_s['ds:*']``);
    ``c_sp`` = least squares (relative error) of what the sp > 1 runs' steps leave after
    those terms over ``batch x t0``. Memory: the coefficients of :func:`calibrate` from the
    runs with an allocator peak (``cuda_peak_mib``; CPU runs report only the process RSS,
    which is not this model's measure). ``profile_of(config_path)`` gives
    ``(ModelProfile, TrainConfig)`` of a run's config. Only what the runs determine is returned."""
    import statistics

    with open(path) as f:
        data = json.load(f)
    runs = data.get("runs") if isinstance(data, dict) else None
    if not runs:
        raise ValueError(f"{path}: no 'runs' (not a rest-ds bench JSON)")
    rows, profs, timed, bws = [], {}, [], []
    bare = {"c_time": 1.0, "c_opt": 1.0, "c_sp": 1.0, "c_bw": 1.0}  # each time part in its own unit
    for r in runs:
        prof, cfg = profile_of(r["config"])
        profs[r["config"]] = prof
        hw, grid = (r["scene"]["height"], r["scene"]["width"]), tuple(r["grid"])
        e = estimate(prof, hw=hw, grid=grid, world=r["ranks"], zero_stage=r["zero_stage"],
                     optimizer=cfg.optimizer.name, act_ckpt=cfg.train.activation_checkpointing,
                     precision=cfg.deepspeed.precision, bucket=cfg.deepspeed.reduce_bucket_size, coeffs=bare)
        if r.get("step_s"):
            timed.append((r, e["time_parts"]))
        ds_bytes = sum(v for k, v in (r.get("bytes") or {}).items() if k.startswith("ds:"))
        ds_secs = sum(v for k, v in (r.get("comm_s") or {}).items() if k.startswith("ds:") and v)
        if r["ranks"] > 1 and ds_bytes > 0 and ds_secs > 0:
            bws.append(ds_bytes / r["ranks"] / ds_secs)
        peaks = (r.get("memory") or {}).get("cuda_peak_mib")
        if peaks:
            rows.append({"model": r["config"], "hw": hw, "grid": grid, "world": r["ranks"],
                         "zero_stage": r["zero_stage"], "optimizer": cfg.optimizer.name,
                         "act_ckpt": cfg.train.activation_checkpointing, "precision": cfg.deepspeed.precision,
                         "bucket": cfg.deepspeed.reduce_bucket_size, "peak_bytes": max(peaks) * 2 ** 20})
    out = dict(calibrate(rows, profs)) if len(rows) >= 2 else {}
    if bws:
        out["c_bw"] = statistics.median(bws)
    c_bw = out.get("c_bw", DEFAULT_TIME_COEFFS["c_bw"])
    opts = [r["phases_s"]["optimizer"] / p["optimizer"] for r, p in timed if r["ranks"] == 1
            and p["optimizer"] > 0 and (r.get("phases_s") or {}).get("optimizer")]
    if opts:
        out["c_opt"] = statistics.median(opts)
    c_opt = out.get("c_opt", DEFAULT_TIME_COEFFS["c_opt"])
    one = [(r["step_s"] - c_opt * p["optimizer"]) / p["compute"] for r, p in timed
           if r["ranks"] == 1 and p["compute"] > 0]
    if one:
        out["c_time"] = statistics.median(one)
    elif timed:  # no 1-rank run: what the comm and SPIM terms (at their defaults) leave
        c_sp = DEFAULT_TIME_COEFFS["c_sp"]
        out["c_time"] = statistics.median((r["step_s"] - c_opt * p["optimizer"] - p["comm"] / c_bw -
                                           c_sp * p["spim"]) / p["compute"] for r, p in timed if p["compute"] > 0)
    if one:
        # sp > 1: the step minus the scaled compute, the optimizer and DeepSpeed's collectives, per t0
        num = den = 0.0
        for r, p in timed:
            if r.get("sp", r["grid"][0] * r["grid"][1]) > 1 and p["spim"] > 0:
                rest = r["step_s"] - out["c_time"] * p["compute"] - c_opt * p["optimizer"] - p["comm"] / c_bw
                num += p["spim"] * rest / r["step_s"] ** 2
                den += (p["spim"] / r["step_s"]) ** 2
        if den > 0:
            out["c_sp"] = max(0.0, num / den)
    return out


# --- from a training config ----------------------------------------------------------------------------
def device_memory_bytes() -> float | None:
    """The first CUDA device's memory, or None (no GPU)."""
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    return None


_CONFIG_PROFILES: dict = {}


def profile_config(cfg, in_chans: int, num_classes: int) -> ModelProfile:
    """:func:`profile_model` of a training config (both checkpointing settings, its optimizer
    and clipping), measured once per process per model / optimizer / bands / classes: a plan
    calibrated from bench runs of the same config then uses the very measurement (``t0``,
    ``opt_s``) its coefficients were fitted to, so that the probes' noise cancels."""
    key = (repr(cfg.model), repr(cfg.optimizer), repr(getattr(cfg, "finetune", None)),
           cfg.deepspeed.gradient_clipping, in_chans, num_classes)
    if key not in _CONFIG_PROFILES:
        _CONFIG_PROFILES[key] = profile_model(cfg.model, in_chans, num_classes, act_ckpt=(False, True),
                                              train_cfg=cfg)
    return _CONFIG_PROFILES[key]


def plan_run(cfg, *, ranks: int, hw: tuple[int, int] | None = None, memory_bytes: float | None = None,
             coeffs: dict | None = None, all_choices: bool = True, scenes: dict | None = None) -> dict:
    """The plan of a training config on ``ranks`` ranks: the model's profile, every
    candidate layout x ZeRO stage x checkpointing (or only the configured one with
    ``all_choices=False``), the configured one and the recommended one.
    ``hw`` defaults to the largest training scene's size (headers only)."""
    from .preflight import check_grid, preflight

    info = scenes or preflight(cfg, ranks)
    seen = [s for s in info["scenes"] if s["fetched"] and s["role"] == "train"]
    planned_hw = hw is not None  # a size to plan for (--scene): the config's scenes are not checked against it
    if hw is None:
        if not seen:
            raise ConfigError(cfg.source_file, "data.scenes", "no scene size known (samples not fetched: "
                                                              "'rest-ds data fetch NAME', or give --scene HxW)")
        big = max(seen, key=lambda s: s["height"] * s["width"])
        hw = (big["height"], big["width"])
    if info["in_chans"] is None or info["num_classes"] is None:
        raise ConfigError(cfg.source_file, "model", "bands and classes unknown: give model.encoder.in_chans and "
                                                    "model.num_classes, or a fetched scene")
    prof = profile_config(cfg, info["in_chans"], info["num_classes"])
    ck_ok = "1" in prof.fits
    a = cfg.data.augment  # every scene one grid must split, as the trainer checks (turned too under rot90)
    shapes = [] if planned_hw else [(s["height"], s["width"]) for s in info["scenes"] if s["fetched"]]
    shapes += [(s["width"], s["height"]) for s in seen] if a.rot90 and not a.crop and not planned_hw else []
    sp, grid = check_grid(cfg, ranks, prof.align, hw, shapes)
    o = cfg.optimizer
    kw = dict(precision=cfg.deepspeed.precision, optimizer=o.name, momentum=o.momentum, coeffs=coeffs,
              bucket=cfg.deepspeed.reduce_bucket_size)
    if cfg.data.mode == "crop":  # each rank: crops_per_rank crops of crop_size (capped by the scene), sp = 1
        n = min(cfg.data.crop_size, *hw)
        hw, kw["batch"] = (n, n), cfg.data.crops_per_rank
    configured = estimate(prof, hw=hw, grid=grid, world=ranks, zero_stage=cfg.deepspeed.zero_stage,
                          act_ckpt=cfg.train.activation_checkpointing and ck_ok, **kw)
    if all_choices:
        cands = candidates(prof, hw=hw, ranks=ranks, sp=1 if cfg.data.mode == "crop" else cfg.mesh.sp,
                           grid=(1, 1) if cfg.data.mode == "crop" else cfg.grid(),
                           ckpt=(False, True) if ck_ok else (False,), **kw)
    else:
        cands = [configured]
    return {"profile": prof, "hw": tuple(hw), "batch": kw.get("batch", 1), "ranks": ranks,
            "memory_bytes": memory_bytes, "configured": configured,
            "candidates": cands, "recommended": recommend(cands, memory_bytes), "notes": info["notes"],
            "checkpointing_possible": ck_ok}


def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= 0.1 * GIB else f"{b / 2 ** 20:.1f} MiB"


def _row(e: dict, memory_bytes: float | None, mark: str = "") -> str:
    p = e["parts"]
    fits = "" if memory_bytes is None else ("yes" if e["peak_bytes"] <= 0.9 * memory_bytes else "NO")
    return (f"  {e['grid'][0]}x{e['grid'][1]:<3} {e['dp']:>3} {e['sp']:>3}  {e['zero_stage']:>4}  "
            f"{'yes' if e['act_ckpt'] else 'no':>4}  {_gib(e['peak_bytes']):>10}  {_gib(p['params'] + p['grads']):>10}  "
            f"{_gib(p['master'] + p['optimizer']):>10}  {_gib(p['activations']):>10}  {_gib(p['buckets']):>10}  "
            f"{e['step_s']:>8.3g}  {fits:>4} {mark}")


def _timed(prof: ModelProfile) -> str:
    """Where the attention term came from, for the plan's 'measured' line."""
    t = (getattr(prof, "attention", None) or {}).get("timed")
    return f"; sdpa timed at {', '.join(str(x['n']) for x in t)} tokens" if t else ""


def format_plan(plan: dict, *, top: int = 12) -> str:
    """The plan as text: the model, one row per candidate (the best ``top`` by the
    recommendation's order, plus the configured one), the recommendation."""
    prof, mem = plan["profile"], plan["memory_bytes"]
    H, W = plan["hw"]
    fit0 = prof.fits["0"]
    what = f"scene {H}x{W} px" if plan.get("batch", 1) == 1 else f"crops {plan['batch']} x {H}x{W} px per rank"
    lines = [f"plan: {prof.encoder} model, {prof.params / 1e6:.2f} M parameters, align {prof.align}; {what} "
             f"on {plan['ranks']} rank(s); device memory "
             + (f"{mem / GIB:.1f} GiB (fits: peak <= 90%)" if mem else "not given (--memory GiB)"),
             f"  measured: {fit0['a']:.0f} B/px activations (+{fit0['q']:.2g} B/px^2); forward+backward "
             f"{fit0.get('s', fit0['s_per_px']) * 1e6:.2f} us/px + {fit0.get('u', 0.0):.2g} s/px^2 (tile x scene{_timed(prof)}) "
             f"+ {fit0.get('t0', 0.0) * 1e3:.1f} ms/pass, optimizer step {prof.opt_s * 1e3:.1f} ms "
             f"on this machine (sides {prof.sizes} px)",
             f"  {'grid':<5} {'dp':>3} {'sp':>3}  {'ZeRO':>4}  {'ckpt':>4}  {'peak':>10}  {'param+grad':>10}  "
             f"{'opt+master':>10}  {'activation':>10}  {'buckets':>10}  {'step s':>8}  {'fits':>4}"]
    order = sorted(plan["candidates"], key=lambda c: (bool(mem) and c["peak_bytes"] > 0.9 * mem, *_preference(c)))
    shown = order[:top]
    conf, rec = plan["configured"], plan["recommended"]
    key = lambda e: (e["grid"], e["zero_stage"], e["act_ckpt"])  # noqa: E731
    if all(key(e) != key(conf) for e in shown):
        shown.append(conf)
    for e in shown:
        mark = " ".join(m for m, c in (("<- configured", conf), ("<- recommended", rec))
                        if c is not None and key(c) == key(e))
        lines.append(_row(e, mem, mark))
    if len(order) > len(shown):
        lines.append(f"  ({len(order) - len(shown)} more)")
    if rec is None:
        lines.append("recommendation: nothing fits; use more ranks, activation checkpointing or a smaller scene")
    else:
        lines.append(f"recommendation: mesh.grid={rec['grid'][0]}x{rec['grid'][1]} mesh.sp={rec['sp']} "
                     f"deepspeed.zero_stage={rec['zero_stage']} "
                     f"train.activation_checkpointing={str(rec['act_ckpt']).lower()} "
                     f"(peak {_gib(rec['peak_bytes'])} per rank, ~{rec['step_s']:.3g} s/step here: "
                     + ", ".join(f"{k} {v:.3g}" for k, v in rec.get("time_parts", {}).items() if v) + ")")
    lines += [f"note: {n}" for n in plan["notes"]]
    if prof.attention.get("note"):
        lines.append(f"note: attention term from the probes' curvature (noisy): {prof.attention['note']}")
    return "\n".join(lines)


# --- rest-ds plan --------------------------------------------------------------------------------------
PLAN_DESCRIPTION = """\
Predict the per-rank peak memory and step time of a training run before it
starts, for every tile grid, ZeRO stage and activation-checkpointing choice on
--ranks ranks, and recommend one that fits --memory GiB per device. Or, with
--max-scene, the largest scene that fits --devices N devices of --memory GiB.

The model (rest_ds/train/plan.py): parameters, gradients, fp32 master copy and
optimizer state per ZeRO stage over the ranks, DeepSpeed's gradient buckets, the
activations of the model measured here on small synthetic scenes (a few
seconds) scaled to the rank's tile, and calibrated overheads. Step time: this
machine's (CPU) forward/backward time fitted over the tile (and, with global
attention, tile x scene) plus a per-pass fixed cost, the optimizer step divided
over the ranks from ZeRO 1, SPIM's fixed cost at sp > 1 and DeepSpeed's
collectives; a device's with --calibration BENCH.json (rest-ds bench there)."""


def _parse_hw(text: str) -> tuple[int, int]:
    import argparse

    try:
        parts = [int(v) for v in str(text).lower().replace(",", "x").split("x")]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or min(parts) < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not HxW (e.g. 4096x6144) or one side") from None
    return parts[0], parts[1]


def add_parser(subparsers) -> None:
    """Register ``plan`` on ``subparsers``."""
    import argparse

    from ..cli_args import positive_float, positive_int

    p = subparsers.add_parser("plan", help="predict per-rank memory and step time; recommend a layout",
                              description=PLAN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="YAML", help="training config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. mesh.grid=2x2")
    p.add_argument("--ranks", type=positive_int, metavar="N", help="ranks of the run (default: mesh.sp or 1)")
    p.add_argument("--memory", type=positive_float, metavar="GIB", help="memory per device in GiB (default: this GPU's)")
    p.add_argument("--scene", type=_parse_hw, metavar="HxW", help="scene size (default: the largest training scene)")
    p.add_argument("--max-scene", action="store_true", help="the largest scene that fits --devices x --memory")
    p.add_argument("--devices", type=positive_int, metavar="N", help="with --max-scene: devices (ranks)")
    p.add_argument("--calibration", metavar="JSON", help="rest-ds bench JSON (or a JSON of coefficients) to calibrate from")
    p.add_argument("--all", action="store_true", help="print every candidate, not the best 12")
    p.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    p.set_defaults(func=cmd_plan)


def _coeffs_from(path: str | None, cfg) -> dict | None:
    if path is None:
        return None
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict) and "runs" not in data:
        return {k: float(v) for k, v in data.items() if k in (*DEFAULT_COEFFS, *DEFAULT_TIME_COEFFS)}

    def profile_of(config_path):
        from .config import load_config

        c = load_config(config_path)
        from .preflight import preflight

        info = preflight(c, 1)
        return profile_config(c, info["in_chans"], info["num_classes"]), c

    return calibrate_from_bench(path, profile_of)


def cmd_plan(args) -> int:
    from ..cli_args import EXIT_FAIL, EXIT_OK, fail
    from ..data import DataError
    from .config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        coeffs = _coeffs_from(args.calibration, cfg)
        mem = args.memory * GIB if args.memory else device_memory_bytes()
        if args.max_scene:
            if not args.devices or not mem:
                raise ConfigError(None, "--max-scene", "needs --devices N and --memory GiB")
            from .preflight import preflight

            info = preflight(cfg, args.devices)
            prof = profile_config(cfg, info["in_chans"], info["num_classes"])
            aspect = args.scene[0] / args.scene[1] if args.scene else 1.0
            o = cfg.optimizer
            best = max_scene(prof, devices=args.devices, memory_bytes=mem, aspect=aspect,
                             precision=cfg.deepspeed.precision, optimizer=o.name, momentum=o.momentum,
                             sp=cfg.mesh.sp, ckpt=(False, True) if "1" in prof.fits else (False,),
                             coeffs=coeffs, bucket=cfg.deepspeed.reduce_bucket_size)
            if best is None:
                print(f"max-scene: nothing fits {args.devices} x {args.memory:g} GiB (the model's fixed memory "
                      f"alone is too large)", flush=True)
                return EXIT_FAIL
            H, W = best["scene"]
            print(f"max-scene: {H}x{W} px ({H * W / 1e6:.1f} Mpx) on {args.devices} x {mem / GIB:g} GiB: "
                  f"mesh.grid={best['grid'][0]}x{best['grid'][1]} mesh.sp={best['sp']} "
                  f"deepspeed.zero_stage={best['zero_stage']} "
                  f"train.activation_checkpointing={str(best['act_ckpt']).lower()}, peak "
                  f"{_gib(best['peak_bytes'])} per rank, ~{best['step_s']:.3g} s/step here", flush=True)
            out = {"max_scene": best}
        else:
            ranks = args.ranks or cfg.mesh.sp or 1
            plan = plan_run(cfg, ranks=ranks, hw=args.scene, memory_bytes=mem, coeffs=coeffs)
            print(format_plan(plan, top=10 ** 6 if args.all else 12), flush=True)
            out = {k: (asdict(v) if isinstance(v, ModelProfile) else v) for k, v in plan.items()}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1, default=list)
    except (ConfigError, DataError, ValueError, OSError) as e:
        return fail(e)
    return EXIT_OK


__all__ = ["LiveBytes", "ModelProfile", "profile_model", "profile_config", "step_time", "grad_comm_bytes",
           "static_bytes", "estimate", "candidates", "recommend",
           "max_scene", "calibrate", "calibrate_from_bench", "measure_step", "measure_steps", "plan_run",
           "format_plan", "add_parser", "cmd_plan", "DEFAULT_COEFFS"]
