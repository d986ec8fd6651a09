"""Check that a model runs exactly under SPIM: sharded vs one process, same input.

``compare_sharded`` runs inside an initialised process group (every rank of the
sp group calls it); ``verify`` spawns the ranks on gloo itself. Errors are
``max|sharded - single| / max|single|`` per output, input gradient, parameter
gradient and (with ``step``) parameter and buffer after one SGD step.
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


@dataclass
class VerifyReport:
    """Relative errors by name; ``refused`` holds the refusal message, if any.

    ``noise_floor`` (when asked for) holds, per name, the error of the
    single-process fp32 run itself against a float64 run of the same model: how
    far fp32 rounding alone moves that quantity. A sharded error of that order
    is rounding, not a SPIM bug."""

    errors: dict[str, float] = field(default_factory=dict)
    noise_floor: dict[str, float] = field(default_factory=dict)
    comm_bytes: dict[str, int] = field(default_factory=dict)
    refused: str | None = None
    grid: tuple[int, int] = (1, 1)
    layout: tuple = ()

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def ok(self, tol: float) -> bool:
        return self.refused is None and all(v <= tol for v in self.errors.values())

    def failures(self, tol: float) -> dict[str, float]:
        return {k: v for k, v in self.errors.items() if not v <= tol}


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


def _grad_errors(model: nn.Module, ref: nn.Module) -> dict[str, float]:
    out = {}
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.grad is not None or p.grad is not None:
            both = p.grad is not None and q.grad is not None
            out[f"grad {n}"] = rel_error(p.grad, q.grad) if both else math.inf
    return out


def _param_errors(model: nn.Module, ref: nn.Module) -> dict[str, float]:
    return {f"param after step {n}": rel_error(p, q)
            for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters())}


def _buffer_errors(model: nn.Module, ref: nn.Module) -> dict[str, float]:
    return {f"buffer {n}": rel_error(b, c) for (n, b), (_, c) in zip(model.named_buffers(), ref.named_buffers())}


def compare_sharded(factory: Callable[[], nn.Module], x: torch.Tensor, mesh: SpatialMesh,
                    layout: TileLayout | None = None, train: bool = False, step: bool = False,
                    seed: int = 0, align: int = 1, lr: float = 0.1, dtype: torch.dtype | None = None,
                    noise_floor: bool = False, device: str | torch.device = "cpu") -> VerifyReport:
    """Run on every rank of the sp group; returns the same report on every rank.

    ``x`` is the whole input, identical on every rank. The reference runs on sp
    rank 0 only. ``dtype`` casts model and input (e.g. ``torch.float64`` to
    check the algorithm free of fp32 rounding). ``noise_floor`` also runs the
    reference in float64 and reports how far the fp32 reference itself is from it.
    ``device`` runs model and input there (``"cuda"``: this rank's current GPU;
    TF32 is switched off so fp32 means fp32). Several ranks may share one GPU: a
    gloo group stages what it sends through host memory."""
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
    ref = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double().train(train) if noise_floor and mesh.sp_index == 0 else None
    for r in (ref, ref64):  # the same random draws as the sharded run (rng.py), checkpoint recomputes included
        if r is not None:
            rng.install(r, seed)
    model.train(train)
    ref.train(train)
    report = VerifyReport(grid=mesh.grid, layout=(layout.rows, layout.cols))
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
        xr = x.detach().clone().requires_grad_(x.is_floating_point())
        rout = _outputs(ref(xr))
        rloss = _loss(rout, seed)
        if isinstance(rloss, torch.Tensor):
            rloss.backward()
        for i, (a, b) in enumerate(zip(outs, rout)):
            report.errors[f"output[{i}]"] = rel_error(a, b)
        if len(outs) != len(rout):
            report.errors["output count"] = math.inf
        if xr.grad is not None:
            report.errors["input grad"] = rel_error(gx, xr.grad)
        report.errors.update(_grad_errors(model, ref))
        if step:
            _sgd_step(ref, lr)
            report.errors.update(_param_errors(model, ref))
        report.errors.update(_buffer_errors(model, ref))
        if ref64 is not None:
            report.noise_floor = _fp64_floor(ref, ref64, x, rout, xr, seed, step, lr)
    if mesh.sp > 1:
        box = [report.errors]
        dist.broadcast_object_list(box, src=mesh.sp_ranks[0], group=mesh.sp_group)
        report.errors = box[0]
    return report


def _fp64_floor(ref, ref64, x, rout, xr, seed, step, lr) -> dict[str, float]:
    """Errors of the fp32 single-process run (already done: ``ref``, ``rout``,
    ``xr``) against the same model in float64."""
    x64 = x.detach().double().requires_grad_(x.is_floating_point())
    out64 = _outputs(ref64(x64))
    loss = _loss(out64, seed)
    if isinstance(loss, torch.Tensor):
        loss.backward()
    floor = {f"output[{i}]": rel_error(a, b) for i, (a, b) in enumerate(zip(rout, out64))}
    if xr.grad is not None:
        floor["input grad"] = rel_error(xr.grad, x64.grad)
    floor.update(_grad_errors(ref, ref64))
    if step:
        _sgd_step(ref64, lr)
        floor.update(_param_errors(ref, ref64))
    floor.update(_buffer_errors(ref, ref64))
    return floor


def _verify_rank(target, input_shape, grid, train, seed, align, rows, cols, dtype, noise_floor, device):
    factory = load_factory(target) if isinstance(target, str) else target
    mesh = SpatialMesh.build(grid=grid)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape, generator=gen)
    layout = TileLayout(rows, cols) if rows else None
    report = compare_sharded(factory, x, mesh, layout, train=train, step=train, seed=seed, align=align,
                             dtype=dtype, noise_floor=noise_floor, device=device)
    if mesh.sp > 1 and noise_floor:
        box = [report.noise_floor]
        dist.broadcast_object_list(box, src=mesh.sp_ranks[0], group=mesh.sp_group)
        report.noise_floor = box[0]
    return report


def verify(target: str | Callable[[], nn.Module], input_shape: tuple[int, ...], grid: tuple[int, int],
           train: bool = False, seed: int = 0, align: int = 1, layout: TileLayout | None = None,
           timeout_s: float = 600.0, dtype: torch.dtype | None = None, noise_floor: bool = False,
           device: str = "cpu") -> VerifyReport:
    """Spawn ``grid[0] * grid[1]`` gloo ranks and compare sharded vs one process.

    ``target`` is a factory or a ``module:factory`` / ``file.py:factory`` string;
    ``dtype``, ``noise_floor`` and ``device`` as in :func:`compare_sharded`
    (with ``"cuda"`` all ranks share the current GPU)."""
    from .spawn import spawn

    rows, cols = (layout.rows, layout.cols) if layout else ((), ())
    reports = spawn(_verify_rank, grid[0] * grid[1], target, tuple(input_shape), tuple(grid), train, seed,
                    align, rows, cols, dtype, noise_floor, device, timeout_s=timeout_s)
    return reports[0]
