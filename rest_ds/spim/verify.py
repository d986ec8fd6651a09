"""Check that a model runs exactly under SPIM: sharded vs one process, same input.

``compare_sharded`` runs inside an initialised process group (every rank of the
sp group calls it); ``verify`` spawns the ranks on gloo itself. Per output,
input gradient, parameter gradient and (with ``step``) parameter and buffer
after one SGD step: the relative error ``max|sharded - single| / max|single|``.

The verdict (``VerifyReport.classify``), when the reference's rounding noise was
measured (``noise_floor=True``; ``verify`` and ``rest-ds verify`` always do):
sp rank 0 runs the one-process reference twice, in float32 and in float64,
from the same weights, input and random draws. Their difference per quantity
is how far fp32 rounding alone moves it (``n32``); the float64 floor is
estimated as ``n64 = n32 * eps64 / eps32``. Both are at least ``eps`` times the
largest float64 value among the checks of the same kind (outputs, parameter
gradients, parameters after the step, buffers): torch's CPU kernels sum fp32
in double, so the fp32 movement alone understates how a sum of those values
rounds. With the run's reference ``ref`` (its own dtype), ``n`` the run dtype's
noise and ``k = NOISE_K``:

* ``FAIL``      ``max|sharded - ref| > tol * max|ref| + k * n``;
* ``PASS``      ``max|sharded - ref| <= tol * max|ref|``;
* ``ZERO-REF``  in between, for a quantity zero in exact arithmetic as
                measured: ``max|ref64| <= k * n64`` (its float64 value is
                float64 rounding; e.g. the gradient of a conv bias feeding a
                train-mode BatchNorm). Its relative error is noise over zero;
                the report gives its absolute size;
* ``ROUNDING``  in between otherwise: within the reference's own measured
                rounding noise (an ill-conditioned quantity in this precision).

Only ``FAIL`` fails. Without a measured noise the rule is ``error <= tol``.

A float32 run can exceed that bound where the model itself amplifies rounding
beyond what the reference's own float32 run shows (a ReLU whose input is ~1e-7
and flips sign between the two rounding paths, BatchNorm over a 1x1 bin, a long
sum with cancellation). With ``confirm_tol`` (``verify`` and ``rest-ds verify``
pass their ``tol``) every float32 run that has a ``FAIL`` is run again in
float64, and a check that passes there is ``FP64-PASS``: the algorithm is exact
and only float32 rounding moved it (a SPIM error, e.g. a per-tile statistic,
fails in float64 just as much: the tests plant one). ``FP64-PASS`` does not fail.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten

from .comm import all_reduce_, broadcast_, comm_stats
from .errors import SPIMError, SPIMUnsupportedError
from .mesh import SpatialMesh
from .parallelize import average_gradients, parallelize
from . import rng
from .sharding import gather, shard
from .tensor import SpatialTensor
from .tiling import TileLayout


# k of the verdict: a sharded error up to k times the reference's own measured
# rounding noise is rounding. The sharded run rounds along another path (tile
# sums, all-reduces) than the reference, so its error is of the order of the
# reference's noise, not equal to it; 10 leaves room for that while a SPIM bug
# (an error of the order of the quantity itself) stays far above it.
NOISE_K = 10.0
CLASSES = ("PASS", "ROUNDING", "ZERO-REF", "FP64-PASS", "FAIL")


@dataclass
class VerifyReport:
    """Relative errors by name; ``refused`` holds the refusal message, if any.

    With a measured reference noise (module docstring) also, per name:
    ``abs_errors`` (``max|sharded - ref|``), ``sizes`` (``max|ref|``),
    ``noise_abs`` (the run dtype's measured rounding noise of the reference,
    absolute), ``noise_floor`` (the same relative to ``sizes``), ``zero``
    (zero in exact arithmetic as measured) and ``ref64_sizes``
    (``max|float64 reference|``). ``dtype`` is the run's dtype. ``float64``: the
    float64 run of the same model and input where a float32 run had a FAIL and
    ``confirm_tol`` was given (module docstring), else None."""

    errors: dict[str, float] = field(default_factory=dict)
    noise_floor: dict[str, float] = field(default_factory=dict)
    comm_bytes: dict[str, int] = field(default_factory=dict)
    refused: str | None = None
    grid: tuple[int, int] = (1, 1)
    layout: tuple = ()
    abs_errors: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, float] = field(default_factory=dict)
    noise_abs: dict[str, float] = field(default_factory=dict)
    zero: dict[str, bool] = field(default_factory=dict)
    ref64_sizes: dict[str, float] = field(default_factory=dict)
    dtype: str = ""
    float64: "VerifyReport | None" = None

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def classify(self, tol: float, k: float = NOISE_K) -> dict[str, str]:
        """name -> PASS / ROUNDING / ZERO-REF / FP64-PASS / FAIL (module docstring)."""
        out = self._classify(tol, k)
        if self.float64 is not None:
            again = self.float64._classify(tol, k)
            for name, c in out.items():
                if c == "FAIL" and again.get(name, "FAIL") != "FAIL":
                    out[name] = "FP64-PASS"
        return out

    def _classify(self, tol: float, k: float) -> dict[str, str]:
        out = {}
        for name, rel in self.errors.items():
            n = self.noise_abs.get(name)
            if n is None:  # not measured (or not floating point): the plain relative rule
                out[name] = "PASS" if rel <= tol else "FAIL"
                continue
            err, size = self.abs_errors[name], self.sizes[name]
            if not err <= tol * size + k * n:
                out[name] = "FAIL"
            elif err <= tol * size:
                out[name] = "PASS"
            else:  # passes only thanks to the measured noise: say which kind
                out[name] = "ZERO-REF" if self.zero.get(name, False) else "ROUNDING"
        return out

    def ok(self, tol: float) -> bool:
        return self.refused is None and not self.failures(tol)

    def failures(self, tol: float) -> dict[str, float]:
        cls = self.classify(tol)
        return {k: v for k, v in self.errors.items() if cls[k] == "FAIL"}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` (absolute error when b is all zero; inf on shape mismatch or NaN)."""
    if a.shape != b.shape:
        return math.inf
    if not (a.is_floating_point() or a.is_complex()):
        return 0.0 if torch.equal(a.detach(), b.detach()) else math.inf
    a, b = a.detach().double(), b.detach().double()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    err = diff / scale if scale > 0 else diff
    return err if err == err else math.inf


def load_factory(target: str) -> Callable[[], nn.Module]:
    """``package.module:factory`` or ``path/to/file.py:factory``."""
    if ":" not in target:
        raise SPIMError(f"target '{target}' must be 'package.module:factory' or 'path/to/file.py:factory'")
    mod_name, fn_name = target.rsplit(":", 1)
    if mod_name.endswith(".py") or "/" in mod_name:
        path = Path(mod_name)
        if not path.is_file():
            raise SPIMError(f"target file '{path}' does not exist")
        spec = importlib.util.spec_from_file_location(f"_rest_ds_target_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise SPIMError(f"'{mod_name}' has no callable '{fn_name}'")
    return fn


def _outputs(out):
    leaves, _ = tree_flatten(out)
    return [l for l in leaves if isinstance(l, torch.Tensor)]


def _loss(outs, seed):
    """sum_i <out_i, g_i> with fixed random g_i (same on every rank and in the reference)."""
    gen = torch.Generator().manual_seed(seed + 1)
    total = 0.0
    for o in outs:
        if o.is_floating_point() and o.requires_grad:
            g = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)
            total = total + (o * g).sum()
    return total


def _sgd_step(model: nn.Module, lr: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def _quantities(outs: list, xgrad, model: nn.Module, step: bool) -> dict[str, torch.Tensor]:
    """Everything compared, by name, in report order: outputs, input gradient,
    parameter gradients, parameters after the step, buffers."""
    q = {f"output[{i}]": o for i, o in enumerate(outs)}
    if xgrad is not None:
        q["input grad"] = xgrad
    q.update({f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
    if step:
        q.update({f"param after step {n}": p for n, p in model.named_parameters()})
    q.update({f"buffer {n}": b for n, b in model.named_buffers()})
    return q


def _run_reference(ref: nn.Module, x: torch.Tensor, seed: int, step: bool, lr: float) -> dict[str, torch.Tensor]:
    """The plain model on the whole input in this process: forward, the fixed
    linear loss, backward and (``step``) the SGD step."""
    xr = x.detach().clone().requires_grad_(x.is_floating_point())
    rout = _outputs(ref(xr))
    rloss = _loss(rout, seed)
    if isinstance(rloss, torch.Tensor):
        rloss.backward()
    if step:
        _sgd_step(ref, lr)
    return _quantities(rout, xr.grad, ref, step)


def _amax(t: torch.Tensor) -> float:
    return t.detach().double().abs().max().item() if t.numel() else 0.0


def _fill_errors(report: VerifyReport, sq: dict, rq: dict) -> None:
    for name in dict.fromkeys(list(sq) + list(rq)):
        a, b = sq.get(name), rq.get(name)
        report.errors[name] = math.inf if a is None or b is None else rel_error(a, b)
        if a is not None and b is not None and a.shape == b.shape and b.is_floating_point():
            diff = _amax(a.detach().double() - b.detach().double())
            report.abs_errors[name] = diff if diff == diff else math.inf
            report.sizes[name] = _amax(b)
    n_out = sum(1 for k in sq if k.startswith("output["))
    if n_out != sum(1 for k in rq if k.startswith("output[")):
        report.errors["output count"] = math.inf


_KINDS = ("output[", "input grad", "grad ", "param after step ", "buffer ")


def _kind(name: str) -> str:
    return next((k for k in _KINDS if name.startswith(k)), name)


def _fill_noise(report: VerifyReport, rq: dict, oq: dict, run64: bool) -> None:
    """Noise of the reference per quantity from the two precisions (module docstring)."""
    eps32, eps64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    n32s, r64s = {}, {}
    for name, r in rq.items():
        o = oq.get(name)
        if name not in report.abs_errors or o is None or o.shape != r.shape:
            continue
        r64, r32 = (r, o) if run64 else (o, r)
        n32 = _amax(r32.detach().double() - r64.detach().double())
        if n32 == n32:
            n32s[name], r64s[name] = n32, _amax(r64)
    scale: dict[str, float] = {}  # the largest float64 value of each kind of check
    for name, v in r64s.items():
        scale[_kind(name)] = max(scale.get(_kind(name), 0.0), v)
    for name, n32 in n32s.items():
        # no rounding is smaller than the dtype's resolution of the largest value of its
        # kind: torch's CPU kernels accumulate fp32 sums in double, so the fp32 movement
        # alone can understate how much a sum of the same values rounds
        s = scale[_kind(name)]
        n32 = max(n32, eps32 * s)
        n64 = max(n32 * eps64 / eps32, eps64 * s)
        noise = n64 if run64 else n32
        report.noise_abs[name] = noise
        size = report.sizes[name]
        report.noise_floor[name] = noise / size if size > 0 else noise
        report.ref64_sizes[name] = r64s[name]
        report.zero[name] = r64s[name] <= NOISE_K * n64


def compare_sharded(factory: Callable[[], nn.Module], x: torch.Tensor, mesh: SpatialMesh,
                    layout: TileLayout | None = None, train: bool = False, step: bool = False,
                    seed: int = 0, align: int = 1, lr: float = 0.1, dtype: torch.dtype | None = None,
                    noise_floor: bool = False, device: str | torch.device = "cpu",
                    confirm_tol: float | None = None) -> VerifyReport:
    """Run on every rank of the sp group; returns the same report on every rank.

    ``x`` is the whole input, identical on every rank. The reference runs on sp
    rank 0 only, with the same random draws as the sharded run (``rng.install``).
    ``dtype`` casts model and input (e.g. ``torch.float64`` to check the
    algorithm free of fp32 rounding). ``noise_floor`` also runs the reference in
    the other precision (float64 for a float32 run, float32 for a float64 run)
    to measure its rounding noise per quantity, which the verdict uses (module
    docstring). ``device`` runs model and input there (``"cuda"``: this rank's
    current GPU; TF32 is switched off so fp32 means fp32). Several ranks may
    share one GPU: a gloo group stages what it sends through host memory.
    ``confirm_tol``: a float32 run (with ``noise_floor``) that has a FAIL at this
    tolerance runs again in float64 (``report.float64``; module docstring)."""
    device = torch.device(device)
    # CUDA has no deterministic kernel for some backward ops (upsampling,
    # adaptive pooling); there run-to-run noise stays far below the tolerances
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    layout = layout or TileLayout.even(x.shape[-2], x.shape[-1], mesh.grid, align)
    torch.manual_seed(seed)
    model = factory().to(device)
    x = x.to(device)
    if dtype is not None:
        model = model.to(dtype)
        x = x.to(dtype)
    with torch.no_grad():  # identical weights on every rank, whatever the factory did
        for t in list(model.parameters()) + list(model.buffers()):
            broadcast_(t.data, mesh, record=False)
    run64 = x.dtype == torch.float64
    ref = copy.deepcopy(model).train(train) if mesh.sp_index == 0 else None
    other = None
    if noise_floor and mesh.sp_index == 0 and x.is_floating_point():
        other = copy.deepcopy(model).to(torch.float32 if run64 else torch.float64).train(train)
    for r in (ref, other):  # the same random draws as the sharded run (rng.py), checkpoint recomputes included
        if r is not None:
            rng.install(r, seed)
    model.train(train)
    report = VerifyReport(grid=mesh.grid, layout=(layout.rows, layout.cols), dtype=str(x.dtype).replace("torch.", ""))
    comm_stats().reset()
    try:
        parallelize(model, mesh, align=align, rng_seed=seed)
        xs = x.detach().clone().requires_grad_(x.is_floating_point())
        out = model(shard(xs, mesh, layout))
        outs = [gather(o) if isinstance(o, SpatialTensor) else o for o in _outputs(out)]
        loss = _loss(outs, seed)
        if isinstance(loss, torch.Tensor):
            loss.backward()
    except SPIMUnsupportedError as e:
        report.refused = str(e)
        return report
    average_gradients(model, mesh)
    gx = xs.grad
    if gx is not None and mesh.sp > 1:
        gx = all_reduce_(gx.clone(), mesh, record=False) / mesh.sp
    if step:
        _sgd_step(model, lr)
    report.comm_bytes = dict(comm_stats().bytes)
    if mesh.sp_index == 0:
        rq = _run_reference(ref, x, seed, step, lr)
        _fill_errors(report, _quantities(outs, gx, model, step), rq)
        if other is not None:
            oq = _run_reference(other, x.to(torch.float32 if run64 else torch.float64), seed, step, lr)
            _fill_noise(report, rq, oq, run64)
    if mesh.sp > 1:
        names = ("errors", "abs_errors", "sizes", "noise_abs", "noise_floor", "zero", "ref64_sizes")
        box = [{n: getattr(report, n) for n in names}]
        dist.broadcast_object_list(box, src=mesh.sp_ranks[0], group=mesh.sp_group)
        for n in names:
            setattr(report, n, box[0][n])
    if (confirm_tol is not None and noise_floor and report.dtype == "float32" and report.refused is None
            and report.failures(confirm_tol)):  # the same report on every rank: all run it or none
        report.float64 = compare_sharded(factory, x.detach().cpu(), mesh, layout, train=train, step=step, seed=seed,
                                         align=align, lr=lr, dtype=torch.float64, noise_floor=True, device=device)
    return report


def _verify_rank(target, input_shape, grid, train, seed, align, rows, cols, dtype, noise_floor, device, confirm_tol):
    factory = load_factory(target) if isinstance(target, str) else target
    mesh = SpatialMesh.build(grid=grid)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape, generator=gen)
    layout = TileLayout(rows, cols) if rows else None
    return compare_sharded(factory, x, mesh, layout, train=train, step=train, seed=seed, align=align,
                           dtype=dtype, noise_floor=noise_floor, device=device, confirm_tol=confirm_tol)


def verify(target: str | Callable[[], nn.Module], input_shape: tuple[int, ...], grid: tuple[int, int],
           train: bool = False, seed: int = 0, align: int = 1, layout: TileLayout | None = None,
           timeout_s: float = 600.0, dtype: torch.dtype | None = None, noise_floor: bool = True,
           device: str = "cpu", confirm_tol: float | None = 1e-5) -> VerifyReport:
    """Spawn ``grid[0] * grid[1]`` gloo ranks and compare sharded vs one process.

    ``target`` is a factory or a ``module:factory`` / ``file.py:factory`` string;
    ``dtype``, ``noise_floor`` (here on by default: the verdict of
    :meth:`VerifyReport.classify` then tells rounding from SPIM errors) and
    ``device`` as in :func:`compare_sharded` (with ``"cuda"`` all ranks share
    the current GPU); ``confirm_tol``: the verdict's tolerance, which decides
    whether a float32 run is confirmed in float64 (None: never)."""
    from .spawn import spawn

    rows, cols = (layout.rows, layout.cols) if layout else ((), ())
    reports = spawn(_verify_rank, grid[0] * grid[1], target, tuple(input_shape), tuple(grid), train, seed,
                    align, rows, cols, dtype, noise_floor, device, confirm_tol, timeout_s=timeout_s)
    return reports[0]
