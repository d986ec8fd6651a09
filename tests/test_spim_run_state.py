"""SPIM state belongs to the parallelized model (rest_ds/spim/context.py).

* importing rest_ds.spim leaves ``torch.autograd.Function.apply`` alone; the
  guard is installed only while a parallelized forward runs, and put back after
  it (also when the forward raises);
* ``unparallelize`` gives back the plain model: bitwise the outputs, gradients
  and buffers of a never-parallelized copy, with the same hooks (none left);
* two differently parallelized models (attention 'ulysses' vs 'allgather',
  different tile partitions of the same scene size) run interleaved and one
  inside the other's forward, each equal to one process in float64;
* a checkpointed block recomputed in backward re-enters its model's run
  (replicated resampling routed as in the forward).
"""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch import nn

from rest_ds.spim import (SpatialMesh, TileLayout, average_gradients, gather, parallelize, rel_error, shard,
                          unparallelize)
from rest_ds.spim import attention as spim_attention
from rest_ds.spim import context
from rest_ds.spim.comm import all_reduce_
from rest_ds.spim.errors import SPIMUnsupportedError

from .harness import TOL64 as TOL, run_grid
from .nets import CustomFunction

STOCK_APPLY = torch._C._FunctionBase.__dict__["apply"]
HW = (6, 16)
# the same 16-px width split two ways: 8 | 8 (model A) and 5 | 11 (model B)
LAYOUT_A = TileLayout((0, 6), (0, 8, 16))
LAYOUT_B = TileLayout((0, 6), (0, 5, 16))
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
              "_load_state_dict_post_hooks")


class Net(nn.Module):
    """conv + BatchNorm + pooled context resampled back (routed replicated interpolate)
    + 2-head global attention; ``inner``, a separate model (not a submodule), is run
    on ``side`` inside this forward, between the two resamplings."""

    def __init__(self, c: int = 4, drop: float = 0.0, inner: nn.Module | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)  # a bias before BatchNorm has zero gradient
        self.norm = nn.BatchNorm2d(c)
        self.attn = Attention(c, num_heads=2, qkv_bias=True)
        self.attn.fused_attn = True  # F.scaled_dot_product_attention: the sequence-parallel rule
        self.drop = nn.Dropout(drop) if drop else nn.Identity()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self._inner = [inner]  # a list: not registered as a submodule

    def forward(self, x, side=None):
        y = F.relu(self.norm(self.conv(x)))
        y = y + F.interpolate(F.adaptive_avg_pool2d(y, 2), size=y.shape[-2:], mode="bilinear", align_corners=False)
        z = self._inner[0](side) if side is not None else None
        B, C, H, W = y.shape
        t = self.attn(y.flatten(2).transpose(1, 2))
        y = self.drop(y + t.transpose(1, 2).reshape(B, C, H, W))
        y = self.conv2(y) + F.interpolate(F.adaptive_avg_pool2d(y, 3), size=y.shape[-2:], mode="nearest")
        return y if z is None else (y, z)


class PooledContext(nn.Module):
    """A PPM-like branch: pooled bins (replicated) resampled back to the map's size."""

    def forward(self, y):
        return y + F.interpolate(F.adaptive_avg_pool2d(y, 2), size=y.shape[-2:], mode="bilinear",
                                 align_corners=False)


class CheckpointedContext(nn.Module):
    """The pooled-context branch recomputed in backward (non-reentrant checkpoint):
    the recompute re-enters the model's run, with its routing of replicated resampling."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.ctx = PooledContext()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        return self.conv2(checkpoint(self.ctx, self.conv(x), use_reentrant=False))


def _scene(seed: int, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3, *HW), generator=g, dtype=torch.float64)


def _loss(outs, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)


def _hook_counts(model: nn.Module) -> dict:
    return {(name, d): len(getattr(m, d)) for name, m in model.named_modules() for d in HOOK_DICTS}


def _spim_attrs(model: nn.Module) -> list[str]:
    return [f"{name}.{k}" for name, m in model.named_modules() for k in vars(m) if k.startswith("_spim_")]


def _max_err(quantities: dict, reference: dict) -> dict[str, float]:
    return {k: rel_error(quantities[k], reference[k]) for k in reference}


def _grads(model: nn.Module, prefix: str) -> dict:
    return {f"{prefix} grad {n}": p.grad for n, p in model.named_parameters()}


def _buffers(model: nn.Module, prefix: str) -> dict:
    return {f"{prefix} buffer {n}": b for n, b in model.named_buffers()}


# --- rank body: every case of this module on the 1x2 grid ----------------------------------------
def _cases(grid) -> dict:
    mesh = SpatialMesh.build(grid=grid)
    torch.use_deterministic_algorithms(True)
    out = {"apply_stock_at_start": torch.autograd.Function.__dict__.get("apply") is STOCK_APPLY}
    out.update(_unparallelize_case(mesh))
    out.update(_guard_case(mesh))
    out.update(_two_models_case(mesh))
    out.update(_checkpoint_case(mesh))
    out["apply_stock_at_end"] = torch.autograd.Function.__dict__.get("apply") is STOCK_APPLY
    out["no_run_left"] = context.current() is None
    return out


def _unparallelize_case(mesh) -> dict:
    torch.manual_seed(0)
    m = Net(drop=0.25).double()
    plain = copy.deepcopy(m)
    x = _scene(1)
    parallelize(m, mesh, attention="allgather", rng_seed=3)
    m.eval()  # no running-stat update and no dropout: the weights and buffers stay the copy's
    sharded = gather(m(shard(x, mesh))).detach()
    unparallelize(m)
    res = {"parallel_eval_err": rel_error(sharded, plain.eval()(x).detach()),
           "hooks_equal": _hook_counts(m) == _hook_counts(plain), "spim_attrs": _spim_attrs(m)}
    # train mode, dropout on: any hook left behind (the shared-RNG one, say) would change the draws
    q = {}
    for name, net in (("unpar", m), ("plain", plain)):
        net.train()
        torch.manual_seed(7)
        xr = x.clone().requires_grad_()
        y = net(xr)
        _loss([y], 11).backward()
        q[name] = {"out": y.detach(), "xgrad": xr.grad, **_grads(net, ""), **_buffers(net, "")}
    res["bitwise_equal"] = {k: torch.equal(q["unpar"][k], q["plain"][k]) for k in q["plain"]}
    res["compared"] = len(q["plain"])
    try:
        unparallelize(m)
    except Exception as e:  # noqa: BLE001  (the test asserts the message)
        res["second_unparallelize"] = str(e)
    # parallelizing again works (the train step above moved the running statistics of both)
    parallelize(m, mesh, attention="allgather", rng_seed=3)
    m.eval()
    res["reparallel_err"] = rel_error(gather(m(shard(x, mesh))).detach(), plain.eval()(x).detach())
    unparallelize(m)
    return res


def _guard_case(mesh) -> dict:
    seen = []
    m = parallelize(Net().double(), mesh)
    h = m.conv.register_forward_pre_hook(
        lambda mod, args: seen.append(torch.autograd.Function.__dict__.get("apply") is not STOCK_APPLY))
    m(shard(_scene(2), mesh))
    h.remove()
    res = {"guard_during_forward": seen == [True],
           "guard_after_forward": torch.autograd.Function.__dict__.get("apply") is not STOCK_APPLY}
    bad = parallelize(nn.Sequential(nn.Conv2d(3, 3, 1), CustomFunction()).double(), mesh)
    try:
        bad(shard(_scene(2), mesh))
        res["refused"] = ""
    except SPIMUnsupportedError as e:
        res["refused"] = str(e)
    res["guard_after_raise"] = torch.autograd.Function.__dict__.get("apply") is not STOCK_APPLY
    res["run_after_raise"] = context.current() is not None
    return res


def _two_models_case(mesh) -> dict:
    torch.manual_seed(1)
    b = Net().double()
    a = Net(inner=b).double()
    a_ref = copy.deepcopy(a)          # copies b along (a_ref._inner[0])
    b_ref = a_ref._inner[0]
    parallelize(a, mesh, attention="ulysses")
    parallelize(b, mesh, attention="allgather")
    xa, xb = _scene(3), _scene(4)
    res = {}

    # the algorithms the attention rule chose, in call order
    chosen: list[str] = []
    stock_choose = spim_attention.choose_algorithm

    def spy(*args, **kwargs):
        chosen.append(stock_choose(*args, **kwargs))
        return chosen[-1]

    def counted(fn):
        chosen.clear()
        spim_attention.choose_algorithm = spy
        try:
            return fn(), list(chosen)
        finally:
            spim_attention.choose_algorithm = stock_choose

    # interleaved: B, A, B forwards, then the backwards
    xs = {k: v.clone().requires_grad_() for k, v in (("a", xa), ("b1", xb), ("b2", xb))}
    yb1, res["calls_b"] = counted(lambda: b(shard(xs["b1"], mesh, LAYOUT_B)))
    ya, res["calls_a"] = counted(lambda: a(shard(xs["a"], mesh, LAYOUT_A)))
    yb2, _ = counted(lambda: b(shard(xs["b2"], mesh, LAYOUT_B)))
    res["layouts"] = (ya.spec.cols, yb1.spec.cols)
    outs = [gather(ya), gather(yb1), gather(yb2)]
    _loss(outs, 5).backward()
    average_gradients(a, mesh)
    average_gradients(b, mesh)
    q = {"a out": outs[0], "b out 1": outs[1], "b out 2": outs[2],
         **{f"{k} xgrad": all_reduce_(v.grad.clone(), mesh, record=False) / mesh.sp for k, v in xs.items()},
         **_grads(a, "a"), **_grads(b, "b"), **_buffers(a, "a"), **_buffers(b, "b")}
    r = {k: v.clone().requires_grad_() for k, v in (("a", xa), ("b1", xb), ("b2", xb))}
    routs = [a_ref(r["a"]), b_ref(r["b1"]), b_ref(r["b2"])]
    _loss(routs, 5).backward()
    rq = {"a out": routs[0], "b out 1": routs[1], "b out 2": routs[2], **{f"{k} xgrad": v.grad for k, v in r.items()},
          **_grads(a_ref, "a"), **_grads(b_ref, "b"), **_buffers(a_ref, "a"), **_buffers(b_ref, "b")}
    res["interleaved_err"] = _max_err(q, rq)

    # nested: B runs inside A's forward (between A's two routed resamplings and before A's attention)
    for net in (a, b, a_ref, b_ref):
        net.zero_grad(set_to_none=True)
    xs = {k: v.clone().requires_grad_() for k, v in (("a", xa), ("b", xb))}
    (ya, yb), res["calls_nested"] = counted(lambda: a(shard(xs["a"], mesh, LAYOUT_A),
                                                      side=shard(xs["b"], mesh, LAYOUT_B)))
    res["nested_layouts"] = (ya.spec.cols, yb.spec.cols)
    outs = [gather(ya), gather(yb)]
    _loss(outs, 6).backward()
    average_gradients(a, mesh)
    average_gradients(b, mesh)
    q = {"a out": outs[0], "b out": outs[1],
         **{f"{k} xgrad": all_reduce_(v.grad.clone(), mesh, record=False) / mesh.sp for k, v in xs.items()},
         **_grads(a, "a"), **_grads(b, "b"), **_buffers(a, "a"), **_buffers(b, "b")}
    r = {k: v.clone().requires_grad_() for k, v in (("a", xa), ("b", xb))}
    routs = list(a_ref(r["a"], side=r["b"]))
    _loss(routs, 6).backward()
    rq = {"a out": routs[0], "b out": routs[1], **{f"{k} xgrad": v.grad for k, v in r.items()},
          **_grads(a_ref, "a"), **_grads(b_ref, "b"), **_buffers(a_ref, "a"), **_buffers(b_ref, "b")}
    res["nested_err"] = _max_err(q, rq)
    return res


def _checkpoint_case(mesh) -> dict:
    torch.manual_seed(2)
    m = CheckpointedContext().double()
    ref = copy.deepcopy(m)
    x = _scene(5)
    parallelize(m, mesh)
    xs = x.clone().requires_grad_()
    y = gather(m(shard(xs, mesh, LAYOUT_B)))
    _loss([y], 8).backward()
    average_gradients(m, mesh)
    q = {"out": y, "xgrad": all_reduce_(xs.grad.clone(), mesh, record=False) / mesh.sp, **_grads(m, "")}
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    _loss([yr], 8).backward()
    return {"checkpoint_err": _max_err(q, {"out": yr, "xgrad": xr.grad, **_grads(ref, "")})}


@pytest.fixture(scope="module")
def grid1x2():
    return run_grid(_cases, (1, 2))


# --- tests ------------------------------------------------------------------------------------------
def test_import_leaves_function_apply_alone():
    code = ("import torch; a = torch.autograd.Function.__dict__.get('apply'); import rest_ds.spim; "
            "import rest_ds.spim.ops; b = torch.autograd.Function.__dict__.get('apply'); "
            "print(a is b, b is torch._C._FunctionBase.__dict__['apply'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"], r.stdout


def test_run_stack_nests_and_leaves():
    # pure bookkeeping, no process group: two runs, one entered inside the other
    a, b = context.SPIMRun("ulysses"), context.SPIMRun("allgather")
    assert context.where() == "outside any module" and context.attention() == "auto"
    assert a.push("", "A", fresh=True)
    assert not a.push("enc", "Conv2d")       # already the current run: no second entry
    context.note_layout((0, 6), (0, 8, 16))
    assert b.push("", "B", fresh=True)
    assert context.where() == "module '<root>' (B)" and context.attention() == "allgather"
    assert context.layout_for(1, 2, 16) is None  # B has not seen A's layout
    context.note_layout((0, 6), (0, 5, 16))
    assert b.pop("")
    assert context.where() == "module 'enc' (Conv2d)" and context.attention() == "ulysses"
    assert context.layout_for(1, 2, 16) == (0, 8, 16)  # first one wins within A, B's not mixed in
    assert a.push("dec", "Up") is False
    assert a.pop("")                          # the root leaves, dropping frames an exception left behind
    assert context.current() is None and a.frames == [] and context.where() == "outside any module"
    assert not a.pop("dec")                   # a post-hook whose pre-hook never ran does nothing


def test_import_state_and_guard_scope(grid1x2):
    r = grid1x2
    assert r["apply_stock_at_start"] and r["apply_stock_at_end"] and r["no_run_left"], r
    assert r["guard_during_forward"] and not r["guard_after_forward"], r
    assert "autograd.Function" in r["refused"] and "_Double" in r["refused"], r["refused"]
    assert not r["guard_after_raise"] and not r["run_after_raise"], r


def test_unparallelize_restores_plain_model(grid1x2):
    r = grid1x2
    assert r["parallel_eval_err"] <= TOL, r["parallel_eval_err"]
    assert r["hooks_equal"] and r["spim_attrs"] == [], r
    assert r["compared"] > 10 and all(r["bitwise_equal"].values()), r["bitwise_equal"]
    assert "not parallelized" in r["second_unparallelize"], r
    assert r["reparallel_err"] <= TOL, r["reparallel_err"]


def test_two_models_interleaved_and_nested(grid1x2):
    r = grid1x2
    assert r["layouts"] == ((0, 8, 16), (0, 5, 16)) and r["nested_layouts"] == r["layouts"], r
    # A's attention runs Ulysses, B's all-gather of K/V, also when B runs inside A's forward
    assert r["calls_a"] == ["ulysses"] and r["calls_b"] == ["allgather"], r
    assert r["calls_nested"] == ["allgather", "ulysses"], r
    for case in ("interleaved_err", "nested_err"):
        errs = r[case]
        assert len(errs) > 20, errs
        bad = {k: v for k, v in errs.items() if not v <= TOL}
        assert not bad, f"{case}: {bad}"


def test_checkpoint_recompute_reenters_the_run(grid1x2):
    errs = grid1x2["checkpoint_err"]
    assert len(errs) == 6, errs
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, bad
