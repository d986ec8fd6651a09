"""softmax / log_softmax along a sharded dim (a token dim and each grid dim) and
a matmul that contracts over the scene's tokens (GCNet-style attention pooling:
``x.view(B, C, H*W) @ softmax(attn).view(B, H*W, 1)``), F.normalize along a
sharded dim, cross-covariance attention (EdgeNeXt / XCiT) and ReLU linear
attention (EfficientViT), talking-heads attention (EfficientFormerV2), float64 on an uneven
2x2 grid vs one process: output, input grad, parameter grads and parameters
after one SGD step at 1e-10."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rest_ds.spim import SpatialMesh, TileLayout
from rest_ds.spim.verify import compare_sharded

from .harness import TOL64 as TOL
from .harness import check_report, offset_scene, run_grid
LAYOUT = TileLayout((0, 5, 12), (0, 7, 10))  # uneven 2x2 tiles of a 12x10 scene


class SoftmaxNet(nn.Module):
    """softmax over ``which``: 'tokens' (B, C, H*W) dim -1; 'tokens_trail' a token
    dim with channels merged behind the grid; 'rows' / 'cols' one grid dim of
    NCHW; 'cols_nhwc' the column dim of channels-last."""

    def __init__(self, which: str, log: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.which, self.log = which, log

    def forward(self, x):
        y = self.conv(x)
        B, C, H, W = y.shape
        sm = F.log_softmax if self.log else F.softmax
        w = self.which
        if w == "tokens":
            return sm(y.reshape(B, C, H * W) * 3, dim=-1).view(B, C, H, W) * y
        if w == "tokens_trail":
            t = y.permute(0, 2, 3, 1).reshape(B, H * W * C)
            return (t.log_softmax(1) if self.log else t.softmax(dim=1)).view(B, H, W, C).permute(0, 3, 1, 2) * y
        if w == "rows":
            return sm(y, dim=2) + y
        if w == "cols":
            return (torch.log_softmax(y, -1) if self.log else torch.softmax(y, -1)) * y
        if w == "cols_nhwc":
            return sm(y.permute(0, 2, 3, 1), dim=2).permute(0, 3, 1, 2) + y
        raise ValueError(w)


class GlobalContextPool(nn.Module):
    """timm GlobalContext's attention pooling, then a gate, plus a second
    contraction with a wider right operand (B, H*W, D)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.attn = nn.Conv2d(4, 1, 1)
        self.proj = nn.Conv2d(4, 2, 1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.conv(x)
        B, C, H, W = y.shape
        a = F.softmax(self.attn(y).reshape(B, 1, H * W), dim=-1).unsqueeze(3)  # (B, 1, HW, 1)
        ctx = y.reshape(B, C, H * W).unsqueeze(1) @ a  # (B, 1, C, 1), replicated
        gated = y * torch.sigmoid(self.fc(ctx.view(B, C))).view(B, C, 1, 1)
        v = self.proj(y).flatten(2).transpose(1, 2)  # (B, HW, 2)
        m = torch.matmul(y.flatten(2), v)  # (B, C, 2), replicated
        return gated, m


class CrossCovariance(nn.Module):
    """EdgeNeXt / XCiT cross-covariance attention: q and k L2-normalised over the
    scene's tokens (F.normalize along the sharded token dim), the replicated
    channel x channel map ``q @ k^T``, then ``attn @ v`` with a batched replicated
    left operand; plus F.normalize along one grid dim (rows, p=2) and along the
    columns (p=1)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.qkv = nn.Linear(4, 12)

    def forward(self, x):
        y = self.conv(x)
        B, C, H, W = y.shape
        t = y.reshape(B, C, H * W).permute(0, 2, 1)  # (B, N, C) tokens
        q, k, v = self.qkv(t).reshape(B, H * W, 3, 2, 2).permute(2, 0, 3, 4, 1).unbind(0)  # (B, heads, c, N)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)).softmax(-1)
        z = (attn @ v).permute(0, 3, 1, 2).reshape(B, H * W, C).transpose(1, 2).reshape(B, C, H, W)
        return z + F.normalize(y, dim=2) + F.normalize(y, p=1.0, dim=-1)


class LinearAttention(nn.Module):
    """EfficientViT's ReLU linear attention: v padded with a channel of ones
    (F.pad of a non-token dim of a token-layout tensor), ``q[:, :, 0:]`` (a
    slice that keeps the whole token dim), ``k^T @ v`` contracted
    over the scene's tokens, the queries times that replicated map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        B, _, H, W = y.shape
        q, k, v = y.reshape(B, 2, 6, H * W).transpose(-1, -2).chunk(3, dim=-1)  # (B, heads, N, 2)
        v = F.pad(v, (0, 1), mode="constant", value=1.0)
        q = q[:, :, 0:]  # a whole-dim slice of the token dim (MViTv2 without a class token)
        out = F.relu(q) @ (F.relu(k).transpose(-1, -2) @ v)
        out = out[..., :-1] / (out[..., -1:] + 1e-3)
        return out.transpose(-1, -2).reshape(B, 4, H, W)


class TalkingHeads(nn.Module):
    """EfficientFormerV2's talking-heads attention: 1x1 convs over the heads of the
    (B, heads, queries, keys) score map, whose query dim is sharded (token layout)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        # th1 without bias: a per-head constant before the softmax over keys has a zero gradient
        self.th1, self.th2 = nn.Conv2d(2, 2, 1, bias=False), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        B, _, H, W = y.shape
        q, k, v = y.reshape(B, 2, 6, H * W).transpose(-1, -2).chunk(3, dim=-1)  # (B, heads, N, 2)
        attn = self.th2(self.th1(q @ k.transpose(-2, -1)).softmax(-1))
        return (attn @ v).transpose(-1, -2).reshape(B, 4, H, W)


CASES = {f"{w}_{'log' if log else 'softmax'}": (lambda w=w, log=log: SoftmaxNet(w, log))
         for w in ("tokens", "tokens_trail", "rows", "cols", "cols_nhwc") for log in (False, True)}
CASES["global_context"] = GlobalContextPool
CASES["cross_covariance"] = CrossCovariance
CASES["linear_attention"] = LinearAttention
CASES["talking_heads"] = TalkingHeads


def _rank(grid):
    mesh = SpatialMesh.build(grid=grid)
    x = offset_scene(2, 3, LAYOUT.shape, torch.float64)
    out = {}
    for name, factory in CASES.items():
        rep = compare_sharded(factory, x, mesh, LAYOUT, train=True, step=True, dtype=torch.float64)
        out[name] = (rep.errors, rep.refused)
    return out


def test_softmax_and_token_contraction_exact():
    res = run_grid(_rank, (2, 2))
    for name, (errors, refused) in res.items():
        check_report(errors, refused, TOL, name)
        assert any(k.startswith("grad conv") for k in errors) and "input grad" in errors, (name, sorted(errors))
    assert set(res) == set(CASES)
