"""rest_ds.train.deepspeed_compat: one test per DeepSpeed adaptation, and its version check.

In this process: the version check (warns once on another version, names the
adaptation when an internal is missing), the DeepSpeed config (ZeRO buckets sized
to the model or as configured), the config keys' round trip and the planner's use
of the same bucket, the ZeRO-3 hook wrapper's refusal, the checkpoint allow-list.
On 2 gloo ranks (one spawn): the CPU all-reduce /dev/shm files exist under the
name the adaptation rebuilds and are unlinked, the comm backend has every op bench
wraps, a ZeRO-2 engine receives the bucket sizes and a ZeRO-3 engine of a
parallelized model gets its hooks adapted and trains one step equal to one
process, and zero_to_fp32 consolidates a ZeRO-2 checkpoint into the engine's weights.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from rest_ds.train import deepspeed_compat as dsc
from rest_ds.train.config import ConfigError, load_config
from tests.harness import TOL32, run_ranks


MODEL = {"encoder": {"name": "prithvi_vit", "kwargs": {"embed_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 8}},
         "decoder": {"name": "upernet", "channels": 8}}   # only validated: the engine cases build their own nets


def _cfg(**deepspeed):
    return load_config(data={"name": "compat", "model": MODEL,
                             "data": {"scenes": ["(compat)"]}, "deepspeed": deepspeed})


# --- the version check --------------------------------------------------------------------------
def test_installed_deepspeed_is_the_series_the_adaptations_were_written_for():
    assert dsc.version_matches(), dsc.installed_version()
    assert dsc.version_matches("0.19.8") and not dsc.version_matches("0.20.0") and not dsc.version_matches("dev")


def test_check_names_the_adaptation(monkeypatch):
    with pytest.raises(dsc.DeepSpeedCompatError, match=r"adaptation 'some adaptation'.*it has no X"):
        dsc.check("some adaptation", False, "it has no X")
    with pytest.warns(RuntimeWarning, match=r"adaptation 'leak only'.*it has no Y"):
        assert not dsc.check("leak only", False, "it has no Y", error=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dsc.check("present", True, "unused")                       # same series: silent
    monkeypatch.setattr(dsc, "installed_version", lambda: "0.20.1")
    monkeypatch.setattr(dsc, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match=r"'present'.*DeepSpeed 0.20.1 is installed.*not verified"):
        dsc.check("present", True, "unused")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dsc.check("present", True, "unused")                              # once per adaptation


# --- the config: ZeRO buckets ------------------------------------------------------------------
def test_bucket_sizes_follow_the_model_unless_configured():
    assert dsc.bucket_sizes(52_001) == (52_002, 52_002)                   # even (DeepSpeed's alignment)
    assert dsc.bucket_sizes(10 ** 10) == (dsc.DS_DEFAULT_BUCKET,) * 2
    assert dsc.bucket_sizes(None) == (dsc.DS_DEFAULT_BUCKET,) * 2
    assert dsc.bucket_sizes(52_001, 1000, 2000) == (1000, 2000)


def test_ds_config_passes_the_buckets():
    zero = dsc.ds_config(_cfg(zero_stage=2), 1, params=12_345)["zero_optimization"]
    assert zero == {"stage": 2, "reduce_bucket_size": 12_346, "allgather_bucket_size": 12_346}
    zero = dsc.ds_config(_cfg(zero_stage=3, reduce_bucket_size=4096, allgather_bucket_size=8192), 1,
                         params=12_345)["zero_optimization"]
    assert zero == {"stage": 3, "reduce_bucket_size": 4096, "allgather_bucket_size": 8192,
                    "memory_efficient_linear": False}
    assert dsc.ds_config(_cfg(zero_stage=0), 1, params=12_345)["zero_optimization"] == {"stage": 0}


def test_bucket_keys_round_trip_and_are_validated():
    cfg = _cfg(zero_stage=1, reduce_bucket_size=100_000, allgather_bucket_size=200_000)
    again = load_config(data=cfg.to_dict())
    assert (again.deepspeed.reduce_bucket_size, again.deepspeed.allgather_bucket_size) == (100_000, 200_000)
    assert _cfg().deepspeed.reduce_bucket_size is None
    with pytest.raises(ConfigError, match="deepspeed.allgather_bucket_size.*even"):
        _cfg(allgather_bucket_size=1001)
    with pytest.raises(ConfigError, match="deepspeed.reduce_bucket_size.*>= 2"):
        _cfg(reduce_bucket_size=0)
    with pytest.raises(ConfigError, match="deepspeed.reduce_bucket_size.*integer"):
        _cfg(reduce_bucket_size="many")


def test_planner_models_the_same_bucket():
    from rest_ds.train.plan import ModelProfile, estimate

    prof = ModelProfile(encoder="x", params=1_000_001, largest_layer=0, align=1,
                        fits={"0": {"a": 100.0, "q": 0.0, "b": 0.0, "s_per_px": 1e-6}})
    kw = dict(hw=(64, 64), grid=(1, 1), world=2, precision="fp32", optimizer="sgd")
    auto = dsc.bucket_sizes(prof.params)[0]
    assert estimate(prof, zero_stage=2, **kw)["parts"]["buckets"] == 4 * auto
    assert estimate(prof, zero_stage=1, **kw)["parts"]["buckets"] == 2 * 4 * auto
    assert estimate(prof, zero_stage=2, bucket=5000, **kw)["parts"]["buckets"] == 4 * 5000
    assert estimate(prof, zero_stage=0, bucket=5000, **kw)["parts"]["buckets"] == 0


# --- ZeRO-3 hooks and checkpoints, in this process ---------------------------------------------------
def test_zero3_hooks_refused_when_deepspeed_sets_none():
    with pytest.raises(dsc.DeepSpeedCompatError, match="ZeRO-3 backward hooks.*pre_bwd_fn / post_bwd_fn"):
        dsc.zero3_spatial_hooks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_checkpoint_allow_list_resolves():
    assert len(dsc.checkpoint_globals()) == len(dsc.CHECKPOINT_GLOBALS)


# --- on 2 ranks ------------------------------------------------------------------------------------
def _ranks(tmp: str):
    import copy
    import os

    import deepspeed
    import torch.distributed as dist

    from rest_ds.spim import SpatialMesh, TileLayout, from_local, parallelize
    from rest_ds.spim.verify import rel_error

    os.environ["LOCAL_SIZE"] = str(dist.get_world_size())   # as the deepspeed launcher on one host
    dsc.quiet()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.use_deterministic_algorithms(True)
    rank, out = dist.get_rank(), {}
    shm = dsc.cpu_allreduce_shm_name(rank)
    out["shm_before"] = os.path.exists(shm)
    out["shm_unlinked"] = dsc.unlink_cpu_allreduce_shm()
    out["shm_after"] = os.path.exists(shm)
    out["shm_again"] = dsc.unlink_cpu_allreduce_shm()   # a second init_comm: nothing to do
    real = dsc.comm_backend
    dsc.comm_backend = lambda: object()                  # a DeepSpeed whose backend lacks the shm op
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["shm_other_ds"] = (dsc.unlink_cpu_allreduce_shm(), [str(w.message) for w in caught])
    finally:
        dsc.comm_backend = real
    cdb = dsc.comm_backend()
    out["comm_ops_missing"] = [n for n in dsc.COMM_OPS if not callable(getattr(cdb, n, None))]

    # ZeRO-2 receives the buckets; zero_to_fp32 consolidates its checkpoint
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    n = dsc.param_count(net)
    eng, *_ = dsc.initialize(net, torch.optim.SGD(net.parameters(), lr=0.1), dsc.ds_config(_cfg(zero_stage=2), 1, n))
    out["params"] = n
    out["zero2_buckets"] = (eng.zero_reduce_bucket_size(), eng.zero_allgather_bucket_size(),
                            eng.optimizer.reduce_bucket_size, eng.optimizer.allgather_bucket_size)
    x = torch.randn(1, 3, 8, 10)
    eng.backward(eng(x).square().mean())
    eng.step()
    eng.save_checkpoint(tmp, tag="t")
    dist.barrier()
    if rank == 0:
        sd = dsc.fp32_state_dict(tmp, "t")
        out["fp32_error"] = max(rel_error(sd[k], v) for k, v in eng.module.state_dict().items())
        out["fp32_keys"] = sorted(sd) == sorted(eng.module.state_dict())
    eng.destroy()

    # ZeRO-3 on a parallelized model: hooks adapted, one step equals one process
    mesh = SpatialMesh.build(grid=(1, 2))
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(4, 2, 3, padding=1))
    ref = copy.deepcopy(net)
    parallelize(net, mesh)
    eng, *_ = dsc.initialize(net, torch.optim.SGD(net.parameters(), lr=0.5),
                             dsc.ds_config(_cfg(zero_stage=3), 1, dsc.param_count(net)))
    out["zero3_adapted"] = sum(isinstance(m.__dict__.get(a), dsc._TileAware)
                               for m in eng.module.modules() for a in ("pre_bwd_fn", "post_bwd_fn"))
    out["zero3_modules"] = len(list(eng.module.modules()))
    x = torch.randn(1, 3, 8, 13, generator=torch.Generator().manual_seed(2))
    layout = TileLayout.even(8, 13, mesh.grid, 1)
    rows, cols = layout.tile(*mesh.coord)
    loss = eng(from_local(x[..., rows, cols].contiguous(), mesh, layout=layout)).square().mean()
    eng.backward(loss)
    eng.step()
    with deepspeed.zero.GatheredParameters(list(eng.module.parameters())):
        after = {k: p.detach().clone() for k, p in eng.module.named_parameters()}
    ropt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref(x).square().mean().backward()
    ropt.step()
    out["zero3_error"] = max(rel_error(after[k], p.detach()) for k, p in ref.named_parameters())
    eng.destroy()

    # DeepSpeed's collectives through shared memory: the same results as gloo's, bit for bit, each
    # on the transport it is meant for: gloo (torch.distributed, which DeepSpeed's backend calls)
    # only where the route does not apply, SPIM's mailboxes, or DeepSpeed's own shm op (neither)
    import deepspeed.comm as ds_dist

    out["routed"] = dsc.route_host_collectives(mesh)
    out["routed_again"] = dsc.route_host_collectives(mesh)        # idempotent
    calls = []
    real_ar, real_ag, real_ex = dist.all_reduce, dist.all_gather_into_tensor, mesh.shm.start_exchange

    def via(fn, *args, **kwargs) -> str:
        calls.clear()
        dist.all_reduce = lambda *a, **k: (calls.append("gloo"), real_ar(*a, **k))[1]
        dist.all_gather_into_tensor = lambda *a, **k: (calls.append("gloo"), real_ag(*a, **k))[1]
        mesh.shm.start_exchange = lambda *a, **k: (calls.append("mailboxes"), real_ex(*a, **k))[1]
        try:
            fn(*args, **kwargs)
        finally:
            dist.all_reduce, dist.all_gather_into_tensor = real_ar, real_ag
            del mesh.shm.start_exchange
        return "gloo" if "gloo" in calls else "mailboxes" if calls else "deepspeed"

    g = torch.Generator().manual_seed(10 + rank)
    same = {}
    for name, t in {"fp32": torch.randn(3001, generator=g),
                    "fp64": torch.randn(70001, dtype=torch.float64, generator=g),
                    "int64": torch.randint(-9, 9, (5, 7), generator=g)}.items():
        mine, ref_t = t.clone(), t.clone()
        used = via(ds_dist.all_reduce, mine)
        real_ar(ref_t)
        same[name] = (torch.equal(mine, ref_t), used)
    big = torch.randn(64, 9, generator=g)
    w = torch.ones(3, requires_grad=True)
    for name in ("max", "non-contiguous", "inside backward"):
        mine, ref_t = big.t(), big.t().clone()
        if name == "max":
            used = via(ds_dist.all_reduce, mine, op=ds_dist.ReduceOp.MAX)
        elif name == "non-contiguous":
            used = via(ds_dist.all_reduce, mine)
        else:  # from a gradient hook (SPIM's exchanges may be in flight there): fp64, not DeepSpeed's op
            mine, ref_t = big.double(), big.double()
            h = w.register_hook(lambda gr: (ds_dist.all_reduce(mine), gr)[1])
            used = via(lambda: (w * 2).sum().backward())
            h.remove()
        real_ar(ref_t, op=dist.ReduceOp.MAX if name == "max" else dist.ReduceOp.SUM)
        same[name] = (torch.equal(mine.contiguous(), ref_t.contiguous()), used)
    shard = torch.randn(1003, generator=g)
    gathered, ref_parts = torch.empty(2 * 1003), [torch.empty(1003) for _ in range(2)]
    used = via(ds_dist.all_gather_into_tensor, gathered, shard)
    dist.all_gather(ref_parts, shard)
    same["all_gather_into_tensor"] = (torch.equal(gathered, torch.cat(ref_parts)), used)
    out["routed_same"] = same
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_ranks, 2, str(tmp_path_factory.mktemp("ds")))


@pytest.mark.timeout(600)
def test_cpu_allreduce_shm_files_named_and_unlinked(ranks):
    for r in ranks:
        assert r["shm_before"] and r["shm_unlinked"] and not r["shm_after"] and not r["shm_again"], r
        done, msgs = r["shm_other_ds"]
        assert not done and any("adaptation 'unlink the CPU all-reduce /dev/shm files'" in m
                                and "shm_comm_op" in m for m in msgs), msgs


@pytest.mark.timeout(600)
def test_comm_backend_has_the_accounted_ops(ranks):
    # the collectives ZeRO 0-3 use on CPU must be accounted (bench skips ops a backend lacks)
    used = {"all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast", "barrier"}
    assert not used & set(ranks[0]["comm_ops_missing"]), ranks[0]["comm_ops_missing"]


@pytest.mark.timeout(600)
def test_deepspeed_receives_the_bucket_sizes(ranks):
    b = dsc.bucket_sizes(ranks[0]["params"])
    assert ranks[0]["zero2_buckets"] == (b[0], b[1], b[0], b[1])


@pytest.mark.timeout(600)
def test_zero_to_fp32_consolidates_the_engine_weights(ranks):
    assert ranks[0]["fp32_keys"] and ranks[0]["fp32_error"] == 0.0


@pytest.mark.timeout(600)
def test_deepspeed_collectives_through_shared_memory_equal_gloo(ranks):
    for r in ranks:
        assert r["routed"] == r["routed_again"] == ["all_reduce", "all_gather_into_tensor"], r["routed"]
        same = r["routed_same"]
        assert all(equal for equal, _ in same.values()), same
        # routed: no gloo call; not routable (MAX, a strided view, inside backward): gloo, still right.
        # fp32 on DeepSpeed's shm op (LOCAL_SIZE == world here), other dtypes and the gather on the mailboxes
        assert {k: t for k, (_, t) in same.items()} == {
            "fp32": "deepspeed", "fp64": "mailboxes", "int64": "mailboxes", "max": "gloo", "non-contiguous": "gloo",
            "inside backward": "gloo", "all_gather_into_tensor": "mailboxes"}, same


@pytest.mark.timeout(600)
def test_zero3_hooks_adapted_and_step_equals_one_process(ranks):
    r = ranks[0]
    assert r["zero3_adapted"] == 2 * r["zero3_modules"]
    assert r["zero3_error"] <= TOL32, r["zero3_error"]
