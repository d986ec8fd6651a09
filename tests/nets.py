"""Small test networks and inputs shared by several test modules (module level:
the ranks of a spawned test unpickle them by name). Random weights only."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from rest_ds.models.registry import build_decoder

TOKENS_HW = (12, 14)  # TokenBlock's token grid


class TokenBlock(nn.Module):
    """(B, C, H, W) -> tokens -> ViT block(s) -> (B, C, H, W) on a TOKENS_HW grid
    (learned position table); optional class token (then also returns it)."""

    def __init__(self, dim=24, heads=4, depth=1, cls=False, fused=True):
        super().__init__()
        h, w = TOKENS_HW
        self.blocks = nn.ModuleList([Block(dim, heads, qkv_bias=True) for _ in range(depth)])
        for b in self.blocks:
            b.attn.fused_attn = fused
        self.cls = nn.Parameter(torch.randn(1, 1, dim)) if cls else None
        self.pos = nn.Parameter(0.1 * torch.randn(1, h * w + (1 if cls else 0), dim))

    def forward(self, x):
        B, C, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        if self.cls is not None:
            t = torch.cat([self.cls.expand(B, -1, -1), t], dim=1)
        t = t + self.pos
        for b in self.blocks:
            t = b(t)
        if self.cls is not None:
            cls_out, t = t[:, 0], t[:, 1:]
            return t.transpose(1, 2).reshape(B, C, h, w), cls_out
        return t.transpose(1, 2).reshape(B, C, h, w)


class Seg(nn.Module):
    """encoder -> registered decoder -> bilinear upsampling to the input's H x W
    (also for 5-D ``(B, C, T, H, W)`` inputs). With ``coords`` the Prithvi
    encoder gets fixed temporal and location coordinates."""

    def __init__(self, encoder: nn.Module, head: str, coords: bool = False):
        super().__init__()
        kw = dict(channels=16, pool_scales=(1, 2, 3), dropout=0.0) if head == "upernet" else dict(dropout=0.0, norm="none")
        self.encoder = encoder
        self.decoder = build_decoder(head, encoder.out_channels, encoder.strides, 3, **kw)
        self.coords = coords

    def forward(self, x):
        if self.coords:
            b, t = x.shape[0], (x.shape[2] if x.dim() == 5 else 1)
            tc = torch.tensor([[[2019.0 + i + s, 40.0 + 30 * i + 90 * s] for i in range(t)] for s in range(b)])
            lc = torch.tensor([[45.0 - 50 * s, 7.0 + 60 * s] for s in range(b)])
            f = self.encoder(x, tc.to(x.dtype), lc.to(x.dtype))
        else:
            f = self.encoder(x)
        return F.interpolate(self.decoder(f), size=x.shape[-2:], mode="bilinear", align_corners=False)


def randomize_positions(m: nn.Module, names=("rel_pos", "pos_embed"), std=0.1) -> nn.Module:
    """Position tables (parameters whose name contains one of ``names``) drawn from
    N(0, std) in place: zero-initialised tables would hide a wrong slice."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            if any(s in n for s in names):
                p.normal_(0, std)
    return m


def scene(shape, dtype) -> torch.Tensor:
    """A seeded random input of ``shape`` (4-D or 5-D) with a per-sample,
    per-channel offset (whole-scene statistics differ from per-tile ones)."""
    g = torch.Generator().manual_seed(1)
    offset = 2 * torch.randn(shape[:2] + (1,) * (len(shape) - 2), generator=g)
    return (torch.randn(shape, generator=g) + offset).to(dtype)


def conv_bn_pool_net() -> nn.Module:
    """Halo convs, whole-scene BatchNorm, max-pool and bilinear upsampling (3 -> 6 channels)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6),
                         nn.Upsample(scale_factor=2, mode="bilinear"))


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class CustomFunction(nn.Module):
    """A user's custom autograd.Function on the tile (SPIM refuses it by name)."""
    def forward(self, x):
        return _Double.apply(x)
