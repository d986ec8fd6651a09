"""``Segmentor``: encoder -> optional neck -> decoder -> upsampling to the input size."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _up_to(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)


def model_align(encoder: nn.Module, strides: Sequence[int] = ()) -> int | None:
    """lcm of ``encoder.align`` (if present) and ``strides``; None when neither is known."""
    vals = [int(v) for v in [getattr(encoder, "align", None), *strides] if v]
    return math.lcm(*vals) if vals else None


class Segmentor(nn.Module):
    """``forward(x: N x C x H x W)`` -> logits ``N x num_classes x H x W``.

    ``encoder(x)`` returns a list of NCHW feature maps, finest first (a single
    tensor is taken as a one-level list; timm's ``features_only=True`` models
    qualify); ``neck`` (optional) maps that list to another list;
    ``decoder(features)`` returns logits at some stride, which are upsampled
    bilinearly (``align_corners=False``) to the input's H x W.

    Auxiliary head (optional, training only): ``aux_head([features[aux_level]])``
    on one level of the (post-neck) features, built for that level alone. In
    training mode the forward then returns the tuple ``(logits, aux_logits)``,
    both ``N x num_classes x H x W``; the loss is ``loss(logits) + aux_weight *
    loss(aux_logits)``. In eval mode, or without an aux head, it returns the
    logits tensor alone.

    ``align``: the tile alignment in input pixels the model needs under SPIM.
    Default: the lcm of ``encoder.align`` (when the encoder has one) and the
    strides of the features the decoder sees (``neck.strides`` or
    ``encoder.strides``)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, align: int | None = None, *,
                 neck: nn.Module | None = None, aux_head: nn.Module | None = None, aux_level: int = -1,
                 aux_weight: float = 0.4):
        super().__init__()
        self.encoder = encoder
        self.neck = neck
        self.decoder = decoder
        self.aux_head = aux_head
        self.aux_level = int(aux_level)
        self.aux_weight = float(aux_weight)
        if align is None:
            strides = getattr(neck, "strides", None) if neck is not None else getattr(encoder, "strides", None)
            align = model_align(encoder, strides or ())
        self.align = align

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps the decoder sees (after the neck), finest first."""
        features = self.encoder(x)
        features = [features] if isinstance(features, torch.Tensor) else list(features)
        if self.neck is not None:
            features = list(self.neck(features))
        return features

    def forward(self, x: torch.Tensor):
        features = self.features(x)
        logits = _up_to(self.decoder(features), x)
        if self.aux_head is None or not self.training:
            return logits
        if not -len(features) <= self.aux_level < len(features):
            raise ValueError(f"aux_level {self.aux_level} is out of range for {len(features)} feature levels")
        return logits, _up_to(self.aux_head([features[self.aux_level]]), x)


__all__ = ["Segmentor", "model_align"]
