"""Segmentation decoders in plain PyTorch (no SPIM imports).

These are ordinary single-device modules. They only use ops whose meaning SPIM
preserves on a spatially sharded scene (convs, BatchNorm, adaptive average
pooling, bilinear ``F.interpolate`` to a size read from ``x.shape``), so
``rest_ds.spim.parallelize`` runs them unmodified and exactly.

All tensors are NCHW.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    """``Conv2d(bias=False) -> BatchNorm2d -> ReLU`` with "same" padding for odd kernels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                      padding=dilation * (kernel_size - 1) // 2, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class PPM(nn.ModuleList):
    """Pyramid pooling (PSPNet): for each bin size ``b``, ``AdaptiveAvgPool2d(b)``
    then a 1x1 ``ConvBNReLU``, upsampled bilinearly back to the input's H x W.

    ``forward(x: N x in_channels x H x W)`` returns a list of
    ``len(pool_scales)`` tensors ``N x channels x H x W``.

    In training mode the BatchNorm of the ``b = 1`` branch sees ``N`` values per
    channel, so it needs a batch of at least 2 (as in mmseg)."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int):
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), ConvBNReLU(in_channels, channels, 1)) for b in pool_scales
        )
        self.pool_scales = tuple(pool_scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_resize(branch(x), x.shape[2:]) for branch in self]


class UPerHead(nn.Module):
    """UPerNet decode head, laid out like mmseg's ``UPerHead``.

    ``forward(features)`` takes ``len(in_channels)`` feature maps, finest first
    (``features[i]``: N x in_channels[i] x H_i x W_i), and returns logits
    ``N x num_classes x H_0 x W_0``:

    * PPM on the deepest level, concatenated with it, fused by a 3x3 ``ConvBNReLU``;
    * 1x1 lateral ``ConvBNReLU`` on the other levels;
    * top-down path: each level adds the bilinear upsampling of the level above
      to its own size;
    * a 3x3 ``ConvBNReLU`` on every level but the deepest;
    * all levels upsampled to the finest level's size, concatenated, fused by a
      3x3 ``ConvBNReLU``, dropout, 1x1 classifier.

    ``dropout`` is elementwise (``nn.Dropout``; mmseg uses ``Dropout2d``): under
    SPIM the masks of different tiles are independent draws, which DESIGN.md
    allows for dropout. ``dropout=0`` (an ``nn.Identity``) keeps training
    deterministic, which exactness checks need."""

    def __init__(self, in_channels: Sequence[int], channels: int = 128, num_classes: int = 7,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if len(in_channels) < 1:
            raise ValueError("UPerHead needs at least one input level")
        self.in_channels = tuple(in_channels)
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.in_channels):
            raise ValueError(f"UPerHead expects {len(self.in_channels)} feature maps, got {len(features)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        laterals.append(self.psp_forward(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])]
        outs.append(laterals[-1])
        size = outs[0].shape[2:]
        outs = [outs[0]] + [_resize(o, size) for o in outs[1:]]
        x = self.fpn_bottleneck(torch.cat(outs, dim=1))
        return self.conv_seg(self.dropout(x))


__all__ = ["ConvBNReLU", "PPM", "UPerHead"]
