"""``Segmentor``: an encoder that returns a feature pyramid plus a decoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Segmentor(nn.Module):
    """``forward(x: N x C x H x W) -> logits N x num_classes x H x W``.

    ``encoder(x)`` must return a list of NCHW feature maps, finest first (timm's
    ``features_only=True`` models do); ``decoder(features)`` returns logits at
    some resolution, which are upsampled bilinearly (``align_corners=False``) to
    the input's H x W.

    ``align`` (optional) records the tile alignment the model needs under SPIM:
    the deepest total stride of the encoder."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, align: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.align = align

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        if isinstance(features, torch.Tensor):
            features = [features]
        logits = self.decoder(list(features))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)


__all__ = ["Segmentor"]
