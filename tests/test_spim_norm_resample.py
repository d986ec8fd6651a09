"""Normalisation, resampling, adaptive pooling and the pixel loss under SPIM.

For six grids with uneven tiles, every case is compared with one process on
the same input: outputs, input grad, parameter grads (and, in training,
parameters after one SGD step and every buffer such as BatchNorm running
stats) within 1e-5 relative. One spawn per grid runs every case. Also: two
training steps of BatchNorm (running stats after a step), that a plain
interpolate to a size no sharded tensor has stays plain, and refusals by name.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rest_ds.spim import SPIMError, SpatialMesh, TileLayout, gather, parallelize, shard
from rest_ds.spim.parallelize import average_gradients
from rest_ds.spim.verify import compare_sharded, rel_error

from .harness import TOL32 as TOL
from .harness import expected_check_names, grid_params, run_ranks

GRIDS = [(1, 2), (2, 1), (2, 2), (1, 3), (2, 3), (3, 2)]
FAST_GRID = (2, 2)  # the fast tier's grid: both axes split (corner halos)
SEED = 5


def uneven(n: int, parts: int, grow: bool) -> tuple[int, ...]:
    """Tiles growing (or shrinking) by ~35% per grid index: uneven, never the even split."""
    w = [1 + 0.35 * i for i in range(parts)]
    if not grow:
        w = w[::-1]
    bounds, acc = [0], 0.0
    for i in range(parts - 1):
        acc += w[i]
        bounds.append(int(n * acc / sum(w)))
    return tuple(bounds) + (n,)


def layout_for(shape, grid) -> TileLayout:
    return TileLayout(uneven(shape[-2], grid[0], True), uneven(shape[-1], grid[1], False))


# --- normalisation -------------------------------------------------------------
class ConvNorm(nn.Module):
    """conv -> norm -> relu -> conv; ``twice`` applies the norm a second time
    (two running-stat updates in one forward, e.g. the cumulative factor);
    ``channels_last``: the norm sees a channels-last map and an in-place ReLU
    follows it (as in the UPerNet head, whose maps come from tokens)."""

    def __init__(self, norm: nn.Module, twice: bool = False, channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        # no bias before a norm: its true gradient is 0, so only rounding noise would be compared
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = norm
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=not twice)
        self.twice = twice

    def forward(self, x):
        y = self.conv1(x)
        if self.channels_last:
            y = F.relu(self.norm(y.contiguous(memory_format=torch.channels_last)), inplace=True)
        else:
            y = F.relu(self.norm(y))
        y = self.conv2(y)
        return self.norm(y) if self.twice else y


class TokenBatchNorm(nn.Module):
    """BatchNorm1d over tokens: LeViT's ``bn(x.flatten(0, 1))`` of (B, N, C) tokens
    (the token dim merged with the batch) and a BatchNorm1d of (B, C, N)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.lin, self.mix = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        self.bn_flat, self.bn_bcn = nn.BatchNorm1d(4), nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.conv(x)
        B, C, H, W = y.shape
        t = self.lin(y.flatten(2).transpose(1, 2))  # (B, N, C)
        # channels mixed between the norms: bn_flat's weight would otherwise have a zero gradient
        t = self.mix(F.relu(self.bn_flat(t.flatten(0, 1)).reshape_as(t)))
        return self.bn_bcn(t.transpose(1, 2)).reshape(B, C, H, W)


def token_bn():
    return TokenBatchNorm()


class TokenGroupNorm(nn.Module):
    """GroupNorm over token-layout tensors (MobileViTv2's GroupNorm(1, C) of unfolded
    patches (B, C, P, N)): of (B, C, N) and of (B, C, 1, N), in float64 inside."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Linear(4, 4)
        self.gn1, self.gn2 = nn.GroupNorm(1, 4), nn.GroupNorm(2, 4)
        self.double()

    def forward(self, x):
        y = self.conv(x.double())
        B, C, H, W = y.shape
        t = self.mix(self.gn1(y.flatten(2)).transpose(1, 2)).transpose(1, 2)
        return self.gn2(t.unsqueeze(2)).squeeze(2).reshape(B, C, H, W)


def token_gn():
    return TokenGroupNorm()


def _random_running_stats(norm: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(norm.running_mean.shape, generator=g))
        norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=g) + 0.5)
    return norm


def bn_train():
    return ConvNorm(nn.BatchNorm2d(4))


def bn_momentum_none():
    return ConvNorm(nn.BatchNorm2d(4, momentum=None), twice=True)


def bn_eval():
    return ConvNorm(_random_running_stats(nn.BatchNorm2d(4)))


def bn_no_stats():
    return ConvNorm(nn.BatchNorm2d(4, affine=False, track_running_stats=False))


def group_norm():
    return ConvNorm(nn.GroupNorm(2, 4))


def group_norm_channels_last():
    return ConvNorm(nn.GroupNorm(2, 4), channels_last=True)


def instance_norm():
    return ConvNorm(nn.InstanceNorm2d(4))


def instance_norm_tracked():
    return ConvNorm(nn.InstanceNorm2d(4, affine=True, track_running_stats=True))


def instance_norm_tracked_eval():
    return ConvNorm(_random_running_stats(nn.InstanceNorm2d(4, affine=True, track_running_stats=True)))


class ChannelsLastLN(nn.Module):
    """ConvNeXt-style LayerNorm over channels after a permute."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.ln = nn.LayerNorm(4)
        self.pw = nn.Linear(4, 4)

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)
        y = self.pw(self.ln(y))
        return y.permute(0, 3, 1, 2)


def layer_norm_channels_last():
    return ChannelsLastLN()


# --- resampling ------------------------------------------------------------------
class Interp(nn.Module):
    """conv -> one interpolate per call in ``calls`` -> one output each (after a 1x1 conv)."""

    def __init__(self, calls):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.head = nn.Conv2d(2, 2, 1)
        self.calls = calls

    def forward(self, x):
        y = torch.tanh(self.conv(x))
        return tuple(self.head(F.interpolate(y, **kw)) for kw in self.calls)


UP = (13, 16)    # 13 -> 29 rows: non-integer upsampling
DOWN = (29, 31)  # 29 -> 11 rows: non-integer downsampling


def _calls(mode, size, scales):
    acs = [None] if mode in ("nearest", "nearest-exact", "area") else [False, True]
    out = []
    for ac in acs:
        extra = {} if ac is None else {"align_corners": ac}
        out.append(dict(mode=mode, size=size, **extra))
        for sf in scales:
            out.append(dict(mode=mode, scale_factor=sf, **extra))
    return out


def _interp_factory(mode, size, scales):
    def factory():
        return Interp(_calls(mode, size, scales))
    return factory


INTERP = {}
for _mode in ("nearest", "nearest-exact", "bilinear", "bicubic", "area"):
    INTERP[f"interp_{_mode}_up"] = (_interp_factory(_mode, (29, 37), [(2.3, 1.7)]), UP)
    INTERP[f"interp_{_mode}_down"] = (_interp_factory(_mode, (11, 13), [0.42]), DOWN)
# globals so that spawned ranks can find the factories by name
globals().update({name: f for name, (f, _) in INTERP.items()})


def interp_recompute():
    return Interp([dict(mode="bilinear", scale_factor=1.7, recompute_scale_factor=True),
                   dict(mode="nearest", scale_factor=(2.5, 0.7), recompute_scale_factor=True)])


class UpsampleModules(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.up_size = nn.Upsample(size=(20, 27), mode="nearest")
        self.up_ac = nn.UpsamplingBilinear2d(scale_factor=3)  # align_corners=True
        self.up_cubic = nn.Upsample(scale_factor=1.5, mode="bicubic")
        self.up4 = nn.Upsample(scale_factor=4, mode="bilinear")

    def forward(self, x):
        y = self.conv(x)
        # x4 of a channels-last map (the UPerNet head's layout): torch's kernel on the tile,
        # border strips recomputed, a channels-last gradient in backward
        up4 = self.up4(y.contiguous(memory_format=torch.channels_last))
        return self.up2(y), self.up_size(y), self.up_ac(y), self.up_cubic(y), up4


def upsample_modules():
    return UpsampleModules()


class UNetSkip(nn.Module):
    """Upsample a stride-2 map to the skip's size and concatenate: the output must
    reuse the skip's (uneven, non-proportional) partition."""

    def __init__(self):
        super().__init__()
        self.skip = nn.Conv2d(3, 3, 3, padding=1)
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fuse = nn.Conv2d(7, 2, 3, padding=1)

    def forward(self, x):
        s = self.skip(x)
        d = self.down(s)
        u = F.interpolate(d, size=s.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([s, u], dim=1))


def unet_skip():
    return UNetSkip()


class PPMHead(nn.Module):
    """UPerNet's pyramid pooling: pool to 1, 2, 3, 6 bins (replicated), 1x1 conv,
    upsample back with ``size=x.shape[2:]`` and concatenate with the sharded map;
    plus DeepLab's image pooling with nearest upsampling."""

    def __init__(self, bins=(1, 2, 3, 6)):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pools = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(4, 2, 1), nn.ReLU())
                                   for b in bins)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 2, 1))
        self.fuse = nn.Conv2d(4 + 2 * len(bins) + 2, 3, 3, padding=1)
        self.kinds: list[str] = []

    def forward(self, x):
        f = self.conv(x)
        ups = [F.interpolate(p(f), size=f.shape[2:], mode="bilinear", align_corners=False) for p in self.pools]
        ups.append(F.interpolate(self.image_pool(f), size=f.shape[-2:], mode="nearest"))
        # a plain interpolate to a size no sharded tensor has must stay plain
        small = F.interpolate(self.pools[-1][0](f), size=(4, 5), mode="bilinear")
        self.kinds = [type(u).__name__ for u in ups] + [type(small).__name__]
        return self.fuse(torch.cat([f] + ups, dim=1)), small


def ppm():
    return PPMHead()


# --- adaptive pooling ----------------------------------------------------------
class Pools(nn.Module):
    def __init__(self, sizes=(1, 2, 3, 6, (2, 5))):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.pools = nn.ModuleList(nn.AdaptiveAvgPool2d(s) for s in sizes)

    def forward(self, x):
        y = self.conv(x)
        return tuple(p(y) for p in self.pools) + (y.mean((2, 3)), F.adaptive_avg_pool2d(y[0], 4))


def pools():
    return Pools()


class KeepAxisPool(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(size)

    def forward(self, x):
        return self.pool(self.conv(x))


def pool_keep_rows():
    return KeepAxisPool((None, 3))


def pool_keep_cols():
    return KeepAxisPool((3, None))


# --- losses ------------------------------------------------------------------------
LOSS_SHAPE = (2, 3, 13, 17)
K = 5


class Losses(nn.Module):
    """Every loss option on one set of logits; the model returns the losses."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(3, K, 3, padding=1)
        B, _, H, W = LOSS_SHAPE
        t = torch.randint(0, K, (B, H, W), generator=g)
        t[torch.rand((B, H, W), generator=g) < 0.2] = 255
        self.register_buffer("target", t)
        self.register_buffer("probs", torch.softmax(torch.randn((B, K, H, W), generator=g), 1))
        self.register_buffer("weight", torch.rand(K, generator=g) + 0.5)

    def forward(self, x):
        z = self.conv(x)
        t, w = self.target, self.weight
        # a sharded target made on the tiles: classes 0..3, 3 ignored
        ts = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0.5).long()
        return (
            F.cross_entropy(z, t.clamp(max=K - 1)),
            F.cross_entropy(z, t, weight=w, ignore_index=255),
            F.cross_entropy(z, t, ignore_index=255, label_smoothing=0.1),
            F.cross_entropy(z, t, weight=w, ignore_index=255, label_smoothing=0.2),
            F.cross_entropy(z, t, weight=w, ignore_index=255, reduction="sum", label_smoothing=0.1),
            F.cross_entropy(z, t, weight=w, ignore_index=255, reduction="none", label_smoothing=0.1),
            F.cross_entropy(z, ts, ignore_index=3),
            F.cross_entropy(z, self.probs, label_smoothing=0.1),
            F.nll_loss(F.log_softmax(z, 1), t, weight=w, ignore_index=255),
            nn.CrossEntropyLoss(weight=w, ignore_index=255)(z, t),
        )


def losses():
    return Losses()


class CELossModel(nn.Module):
    """A segmentation net whose forward returns its scalar training loss."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.Conv2d(4, K, 1))
        g = torch.Generator().manual_seed(4)
        B, _, H, W = LOSS_SHAPE
        t = torch.randint(0, K, (B, H, W), generator=g)
        t[:, :3, :4] = -100
        self.register_buffer("target", t)

    def forward(self, x):
        return F.cross_entropy(self.net(x), self.target)


def ce_loss_model():
    return CELossModel()


# --- refusals ------------------------------------------------------------------
def antialias():
    return Interp([dict(mode="bilinear", size=(7, 9), antialias=True)])


def lanczos():
    return Interp([dict(mode="lanczos", size=(20, 27))])


def spatial_layer_norm():
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.LayerNorm([4, 13, 17]))


class BadTarget(nn.Module):
    """A class index out of range in the last tile only."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, K, 1)
        t = torch.zeros(LOSS_SHAPE[:1] + LOSS_SHAPE[2:], dtype=torch.long)
        t[-1, -1, -1] = K
        self.register_buffer("target", t)

    def forward(self, x):
        return F.cross_entropy(self.conv(x), self.target)


def bad_target():
    return BadTarget()


# name -> (factory, input shape, train)
CASES = {
    "bn_train": (bn_train, (2, 3, 13, 17), True),
    "bn_momentum_none": (bn_momentum_none, (2, 3, 13, 17), True),
    "bn_eval": (bn_eval, (2, 3, 13, 17), False),
    "bn1d_tokens": (token_bn, (2, 3, 13, 17), True),
    "bn_no_running_stats": (bn_no_stats, (2, 3, 13, 17), False),
    "group_norm": (group_norm, (2, 3, 13, 17), True),
    "group_norm_tokens_fp64": (token_gn, (2, 3, 13, 17), True),
    "group_norm_channels_last": (group_norm_channels_last, (2, 3, 13, 17), True),
    "group_norm_channels_last_1": (group_norm_channels_last, (1, 3, 13, 17), True),
    "group_norm_1": (group_norm, (1, 3, 13, 17), True),
    "instance_norm": (instance_norm, (2, 3, 13, 17), True),
    "instance_norm_tracked": (instance_norm_tracked, (2, 3, 13, 17), True),
    "instance_norm_tracked_eval": (instance_norm_tracked_eval, (2, 3, 13, 17), False),
    "layer_norm_channels_last": (layer_norm_channels_last, (2, 3, 13, 17), True),
    **{name: (f, (1, 3) + shape, False) for name, (f, shape) in INTERP.items()},
    "interp_recompute_scale": (interp_recompute, (1, 3) + UP, False),
    "upsample_modules": (upsample_modules, (1, 3, 10, 9), False),
    "unet_skip": (unet_skip, (1, 3, 29, 25), False),
    "ppm": (ppm, (2, 3, 13, 17), False),
    "adaptive_pools": (pools, (2, 3, 13, 17), False),
    "losses": (losses, LOSS_SHAPE, False),
    "ce_loss_model": (ce_loss_model, LOSS_SHAPE, True),
}
REFUSALS = {
    "antialias": (antialias, (1, 3, 13, 17), "antialias=True"),
    "lanczos": (lanczos, (1, 3, 13, 17), "mode 'lanczos'"),
    "layer_norm_over_space": (spatial_layer_norm, (1, 3, 13, 17), "normalized_shape"),
}
# keep-one-axis pooling: exact where the pooled axis is not split, refused elsewhere
KEEP_AXIS = {"pool_keep_rows": (pool_keep_rows, 1), "pool_keep_cols": (pool_keep_cols, 0)}
def two_bn_steps(mesh, layout, x, factory=bn_momentum_none, lr=0.1):
    """Two training steps (forward, backward, SGD) sharded vs one process:
    outputs of both steps, parameters and running stats after both."""
    torch.manual_seed(SEED)
    model = factory()
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if mesh.sp > 1:
                dist.broadcast(t.data, src=mesh.sp_ranks[0], group=mesh.sp_group)
    ref = copy.deepcopy(model)
    model.train()
    ref.train()
    parallelize(model, mesh)
    g = torch.randn((2, 4) + tuple(x.shape[2:]), generator=torch.Generator().manual_seed(2))
    outs = []
    for _ in range(2):
        out = gather(model(shard(x, mesh, layout)))
        (out * g).sum().backward()
        average_gradients(model, mesh)
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
                p.grad = None
        outs.append(out.detach())
    errors = {}
    if mesh.sp_index == 0:
        for step in range(2):
            r = ref(x)
            (r * g).sum().backward()
            with torch.no_grad():
                for p in ref.parameters():
                    p -= lr * p.grad
                    p.grad = None
            errors[f"output step {step}"] = rel_error(outs[step], r)
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            errors[f"param after 2 steps {n}"] = rel_error(p, q)
        for (n, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
            errors[f"buffer after 2 steps {n}"] = rel_error(b, c)
    # running stats must be identical (bitwise) on every rank
    if mesh.sp > 1:
        mine = torch.cat([b.double().reshape(-1) for b in model.buffers()])
        spread = mine.clone()
        dist.all_reduce(spread, op=dist.ReduceOp.MAX, group=mesh.sp_group)
        low = mine.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=mesh.sp_group)
        errors["buffer spread over ranks"] = (spread - low).abs().max().item()
    box = [errors]
    if mesh.sp > 1:
        dist.broadcast_object_list(box, src=mesh.sp_ranks[0], group=mesh.sp_group)
    return box[0]


def plain_stays_plain(mesh, layout, x):
    """Types of PPMHead's upsampled branches inside a parallelized forward."""
    torch.manual_seed(SEED)
    model = parallelize(PPMHead(), mesh)
    model(shard(x, mesh, layout))
    return model.kinds


def _run_grid(grid):
    mesh = SpatialMesh.build(grid=grid)
    reports, refusals, extra = {}, {}, {}
    for name, (factory, shape, train) in CASES.items():
        x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
        reports[name] = compare_sharded(factory, x, mesh, layout_for(shape, grid), train=train, step=train,
                                        seed=SEED)
    for name, (factory, _) in KEEP_AXIS.items():
        x = torch.randn(2, 3, 13, 17, generator=torch.Generator().manual_seed(7))
        reports[name] = compare_sharded(factory, x, mesh, layout_for(x.shape, grid), seed=SEED)
    for name, (factory, shape, _) in REFUSALS.items():
        x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
        refusals[name] = compare_sharded(factory, x, mesh, layout_for(shape, grid), seed=SEED).refused
    try:
        x = torch.randn(LOSS_SHAPE, generator=torch.Generator().manual_seed(7))
        compare_sharded(bad_target, x, mesh, layout_for(LOSS_SHAPE, grid), seed=SEED)
        refusals["bad_target"] = None
    except SPIMError as e:
        refusals["bad_target"] = str(e)
    x = torch.randn(2, 3, 13, 17, generator=torch.Generator().manual_seed(7))
    extra["two_bn_steps"] = two_bn_steps(mesh, layout_for(x.shape, grid), x)
    extra["kinds"] = plain_stays_plain(mesh, layout_for(x.shape, grid), x)
    # after every forward (refused ones included) no routing mode is left behind
    extra["after"] = (type(F.interpolate(torch.randn(1, 1, 3, 3), size=(13, 17))).__name__,
                      torch._C._len_torch_function_stack())
    return reports, refusals, extra


@pytest.fixture(scope="module", params=grid_params(GRIDS, FAST_GRID))
def grid_results(request):
    grid = request.param
    return grid, run_ranks(_run_grid, grid[0] * grid[1], grid)


def _expected(factory, shape, train) -> set[str]:
    torch.manual_seed(SEED)
    return expected_check_names(factory().train(train), torch.randn(shape), step=train)


@pytest.mark.parametrize("case", list(CASES))
def test_exact(grid_results, case):
    grid, per_rank = grid_results
    rep = per_rank[0][0][case]
    assert rep.refused is None, rep.refused
    assert rep.grid == grid and rep.layout == (layout_for(CASES[case][1], grid).rows,
                                               layout_for(CASES[case][1], grid).cols)
    missing = _expected(*CASES[case]) - set(rep.errors)
    assert not missing, sorted(missing)
    assert rep.ok(TOL), rep.failures(TOL)


@pytest.mark.parametrize("case", list(KEEP_AXIS))
def test_keep_axis_pool(grid_results, case):
    grid, per_rank = grid_results
    rep = per_rank[0][0][case]
    if grid[KEEP_AXIS[case][1]] > 1:  # the pooled axis is split: refused by name
        assert rep.refused and "adaptive_avg_pool2d" in rep.refused and "module 'pool'" in rep.refused
    else:
        assert rep.refused is None, rep.refused
        assert {"output[0]", "input grad", "grad conv.weight"} <= set(rep.errors)
        assert rep.ok(TOL), rep.failures(TOL)


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_on_every_rank(grid_results, case):
    grid, per_rank = grid_results
    assert len(per_rank) == grid[0] * grid[1]
    for reports, refusals, _ in per_rank:
        msg = refusals[case]
        assert msg is not None and "not supported by SPIM" in msg
        assert REFUSALS[case][2] in msg and "module '" in msg, msg


def test_bad_target_raises_on_every_rank(grid_results):
    grid, per_rank = grid_results
    for _, refusals, _ in per_rank:
        msg = refusals["bad_target"]
        assert msg is not None and "cross_entropy" in msg and "outside [0, 5)" in msg, msg


def test_two_batchnorm_steps(grid_results):
    grid, per_rank = grid_results
    errors = per_rank[0][2]["two_bn_steps"]
    assert any(k.endswith("running_var") for k in errors) and "output step 1" in errors
    assert errors["buffer spread over ranks"] == 0.0
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, bad


def test_replicated_interpolate_routing(grid_results):
    grid, per_rank = grid_results
    for _, _, extra in per_rank:
        # the five upsampled pooled branches come out sharded, the 4x5 one stays plain
        assert extra["kinds"] == ["SpatialTensor"] * 5 + ["Tensor"], extra["kinds"]
        # outside the forward, plain stays plain even at a size seen inside it
        assert extra["after"] == ("Tensor", 0), extra["after"]
