"""Model factories for ``rest-ds verify`` / training: random weights, no downloads.

Every factory takes no required arguments and returns a :class:`Segmentor`
mapping ``N x in_chans x H x W`` to ``N x num_classes x H x W`` logits. Its
``align`` attribute is the tile alignment SPIM needs (the deepest total
stride, 32 for all models here): interior tile borders must be multiples of it,
e.g. ``TileLayout.even(H, W, grid, align=model.align)``. ConvNeXt's 7x7
depthwise convs also need 3 pixels of halo at stride 32, so a tile with
neighbours on both sides of an axis must be at least 96 px along it (SPIM
refuses narrower tiles with an error naming the conv).

``dropout`` defaults to 0 so that a training step is deterministic and can be
checked against one process; pass ``dropout=0.1`` for mmseg's setting.
``channels`` is the UPerNet width (mmseg uses 512; 128 keeps a 1024 x 1024
scene affordable on CPU).

The UPerNet heads here are mmseg's (``ppm_norm='bn'``: BatchNorm in the PPM's
pooled branches, unlike the ``upernet`` decoder's default, see
``rest_ds.models.decoders``). Training mode with batch 1: the BatchNorm after
PPM's 1x1 bin sees one value per channel and raises, on one device as under
SPIM; with batch 2 it normalises two values per channel, which is numerically
ill-conditioned when they are close (float32 results then differ from float64
by far more than 1e-5 whatever the summation order). ``ppm_norm='none'``
trains at batch 1.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .decoders import ConvBNReLU, UPerHead
from .segmentor import Segmentor


def _timm_upernet(name: str, num_classes: int, in_chans: int, channels: int, dropout: float,
                  pool_scales: Sequence[int], ppm_norm: str, **timm_kwargs) -> Segmentor:
    import timm  # here, not at module level: importing rest_ds.models stays cheap (spawned ranks)

    encoder = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_chans, **timm_kwargs)
    info = encoder.feature_info
    decoder = UPerHead(info.channels(), channels, num_classes, pool_scales, dropout, ppm_norm=ppm_norm)
    return Segmentor(encoder, decoder, align=max(info.reduction()))


def resnet18_upernet(num_classes: int = 7, in_chans: int = 3, channels: int = 128, dropout: float = 0.0,
                     pool_scales: Sequence[int] = (1, 2, 3, 6), ppm_norm: str = "bn") -> Segmentor:
    """timm ``resnet18`` (features at strides 4, 8, 16, 32; 64-512 channels) + UPerNet head."""
    return _timm_upernet("resnet18", num_classes, in_chans, channels, dropout, pool_scales, ppm_norm,
                         out_indices=(1, 2, 3, 4))


def convnext_nano_upernet(num_classes: int = 7, in_chans: int = 3, channels: int = 128, dropout: float = 0.0,
                          pool_scales: Sequence[int] = (1, 2, 3, 6), ppm_norm: str = "bn") -> Segmentor:
    """timm ``convnext_nano`` (features at strides 4, 8, 16, 32; 80-640 channels) + UPerNet head."""
    return _timm_upernet("convnext_nano", num_classes, in_chans, channels, dropout, pool_scales, ppm_norm)


def swin_tiny_upernet(num_classes: int = 7, in_chans: int = 3, channels: int = 128, dropout: float = 0.0,
                      pool_scales: Sequence[int] = (1, 2, 3, 6), ppm_norm: str = "bn", **timm_kwargs) -> Segmentor:
    """timm ``swin_tiny_patch4_window7_224`` (Swin-T: features at strides 4-32, 96-768 channels; any
    scene size) + UPerNet head, the REST paper's configuration; ``align`` 224 (patch 4 x window 7 x 2^3)."""
    from .encoders.swin import TimmSwinEncoder

    encoder = TimmSwinEncoder("swin_tiny_patch4_window7_224", in_chans=in_chans, **timm_kwargs)
    decoder = UPerHead(encoder.out_channels, channels, num_classes, pool_scales, dropout, ppm_norm=ppm_norm)
    return Segmentor(encoder, decoder, align=encoder.align)


def segformer_b0(num_classes: int = 7, in_chans: int = 3, channels: int = 256, dropout: float = 0.0,
                 drop_path_rate: float = 0.0, **config_kwargs) -> Segmentor:
    """SegFormer-B0: transformers' MiT-b0 encoder (spatial-reduction attention, sr 8/4/2/1) + the
    all-MLP head ``channels`` wide; ``align`` 32 (stage strides x sr: 4x8 = 8x4 = 16x2 = 32x1)."""
    from .decoders import SegFormerMLPHead
    from .encoders.hf_segformer import HFSegformerEncoder

    encoder = HFSegformerEncoder("mit_b0", in_chans=in_chans, drop_path_rate=drop_path_rate, **config_kwargs)
    decoder = SegFormerMLPHead(encoder.out_channels, num_classes, channels, dropout)
    return Segmentor(encoder, decoder, align=encoder.align)


class TinyCNN(nn.Module):
    """A narrow CNN returning one feature map per width at strides 4, 8, 16, 32, ... (for fast tests).

    Stem: 3x3 stride-2 conv, 3x3 stride-2 max pool, 3x3 conv; then one 3x3
    stride-2 ``ConvBNReLU`` per level. Follows the encoder contract of
    ``rest_ds.models.registry`` (``out_channels``, ``strides``, ``align``)."""

    def __init__(self, in_chans: int = 3, widths: Sequence[int] = (8, 16, 24, 32)):
        super().__init__()
        w = list(widths)
        self.stem = nn.Sequential(ConvBNReLU(in_chans, w[0], 3, stride=2), nn.MaxPool2d(3, 2, 1), ConvBNReLU(w[0], w[0], 3))
        self.stages = nn.ModuleList(ConvBNReLU(a, b, 3, stride=2) for a, b in zip(w[:-1], w[1:]))
        self.channels = tuple(w)
        self.out_channels = list(w)
        self.strides = [2 ** (i + 2) for i in range(len(w))]
        self.align = self.strides[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = [x]
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def tiny_cnn_upernet(num_classes: int = 7, in_chans: int = 3, channels: int = 16, dropout: float = 0.0,
                     pool_scales: Sequence[int] = (1, 2, 3, 6), ppm_norm: str = "bn") -> Segmentor:
    """:class:`TinyCNN` + a narrow UPerNet head."""
    encoder = TinyCNN(in_chans)
    decoder = UPerHead(encoder.channels, channels, num_classes, pool_scales, dropout, ppm_norm=ppm_norm)
    return Segmentor(encoder, decoder, align=32)


FACTORIES = {
    "resnet18_upernet": resnet18_upernet,
    "convnext_nano_upernet": convnext_nano_upernet,
    "tiny_cnn_upernet": tiny_cnn_upernet,
    "segformer_b0": segformer_b0,
}

__all__ = ["resnet18_upernet", "convnext_nano_upernet", "tiny_cnn_upernet", "segformer_b0", "TinyCNN", "FACTORIES"]
