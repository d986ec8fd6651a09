"""Necks between an encoder and a decoder, registered by name (plain PyTorch).

Neck contract: ``build_neck(name, in_channels, strides, **kwargs)`` returns a
module whose ``forward(features: list of NCHW maps, finest first)`` returns a
new list of NCHW maps, finest first, and which has ``out_channels: list[int]``
and ``strides: list[int]`` (total strides in input pixels) describing it.

Registered: ``simple_pyramid`` (:class:`SimpleFeaturePyramid`).

Under SPIM a neck that makes a coarser map raises the tile alignment the model
needs: ``Segmentor`` takes the lcm of the encoder's ``align`` and every stride
the decoder sees.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Callable, Sequence

import torch
from torch import nn

from .decoders import ConvNormAct, check_norm, norm_layer

NECKS: dict[str, Callable[..., nn.Module]] = {}


def register_neck(name: str):
    def deco(fn):
        if name in NECKS:
            raise ValueError(f"neck '{name}' is registered twice")
        NECKS[name] = fn
        return fn
    return deco


def build_neck(name: str, in_channels: Sequence[int], strides: Sequence[int], **kwargs) -> nn.Module:
    if name not in NECKS:
        raise ValueError(f"unknown neck '{name}'; known: {', '.join(sorted(NECKS)) or '(none)'}")
    return NECKS[name](in_channels=in_channels, strides=strides, **kwargs)


_SCALES = (Fraction(4), Fraction(2), Fraction(1), Fraction(1, 2))


class SimpleFeaturePyramid(nn.Module):
    """ViT simple feature pyramid (Li et al., ViTDet, 2022; mmseg ``Feature2Pyramid``).

    Rescales single-stride ViT maps by ``scales`` (each one of 4, 2, 1, 0.5):

    * 4: ``ConvTranspose2d(k=2, s=2)``, norm, GELU, ``ConvTranspose2d(k=2, s=2)``;
    * 2: ``ConvTranspose2d(k=2, s=2)``;
    * 1: identity;
    * 0.5: ``MaxPool2d(2)``.

    ``in_index`` (int): every scale is applied to ``features[in_index]`` (ViTDet:
    one map of the last block). ``in_index=None``: scale ``i`` is applied to
    ``features[i]`` (mmseg's ViT-UPerNet: maps of 4 different blocks); needs
    ``len(features) == len(scales)``.

    ``out_channels=None`` (mmseg ``Feature2Pyramid``): the transposed convs
    keep the channel count and there is no projection. ``out_channels=C``
    (ViTDet): the x4 branch goes to ``dim/2`` then ``dim/4`` channels, the x2
    branch to ``dim/2``, and every level ends with a 1x1 and a 3x3 conv to ``C``,
    each followed by ``norm`` (no activation).

    ``norm`` (``'ln'`` as in ViTDet, ``'bn'`` as in mmseg, ``'gn'``, ``'none'``)
    is used between the two transposed convs and in the projections; as in
    mmseg's ``ConvModule``, a conv followed by a norm has no bias. Output
    strides: ``stride / scale``; ``MaxPool2d(2)`` on a stride-16 map makes the
    model need tiles aligned to 32 under SPIM."""

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], scales: Sequence[float] = (4, 2, 1, 0.5),
                 in_index: int | None = -1, out_channels: int | None = None, norm: str = "ln"):
        super().__init__()
        check_norm(norm)
        in_channels = [int(c) for c in in_channels]
        strides = [int(s) for s in strides]
        if not in_channels or len(strides) != len(in_channels):
            raise ValueError(f"SimpleFeaturePyramid: {len(in_channels)} in_channels but {len(strides)} strides")
        fscales = [Fraction(s).limit_denominator(8) for s in scales]
        bad = [s for s, f in zip(scales, fscales) if f not in _SCALES]
        if bad or not fscales:
            raise ValueError(f"SimpleFeaturePyramid: scales must be among 4, 2, 1, 0.5, got {list(scales)}")
        if in_index is None:
            if len(in_channels) != len(fscales):
                raise ValueError(f"SimpleFeaturePyramid: in_index=None maps scale i to level i, but there are "
                                 f"{len(fscales)} scales and {len(in_channels)} levels")
            sources = list(range(len(fscales)))
        else:
            if not -len(in_channels) <= in_index < len(in_channels):
                raise ValueError(f"SimpleFeaturePyramid: in_index {in_index} is out of range for "
                                 f"{len(in_channels)} levels")
            sources = [in_index % len(in_channels)] * len(fscales)
        out_strides = []
        for f, src in zip(fscales, sources):
            s = Fraction(strides[src]) / f
            if s.denominator != 1:
                raise ValueError(f"SimpleFeaturePyramid: scale {float(f)} of a stride-{strides[src]} map is not an "
                                 f"integer stride")
            out_strides.append(int(s))
        if out_strides != sorted(out_strides):
            raise ValueError(f"SimpleFeaturePyramid: output strides {out_strides} must increase (finest first); "
                             f"list the scales from largest to smallest")
        self.sources = tuple(sources)
        self.scales = tuple(float(f) for f in fscales)
        vitdet = out_channels is not None
        self.stages = nn.ModuleList()
        self.out_channels = []
        for f, src in zip(fscales, sources):
            c = in_channels[src]
            if f == 4:
                c1, c2 = (c // 2, c // 4) if vitdet else (c, c)
                stage = nn.Sequential(nn.ConvTranspose2d(c, c1, 2, 2, bias=norm == "none"), norm_layer(norm, c1),
                                      nn.GELU(), nn.ConvTranspose2d(c1, c2, 2, 2))
            elif f == 2:
                c2 = c // 2 if vitdet else c
                stage = nn.Sequential(nn.ConvTranspose2d(c, c2, 2, 2))
            elif f == 1:
                c2, stage = c, nn.Sequential()
            else:
                c2, stage = c, nn.Sequential(nn.MaxPool2d(2))
            if vitdet:
                if c2 < 1:
                    raise ValueError(f"SimpleFeaturePyramid: {c} channels are too few to halve for scale {float(f)}")
                stage.append(ConvNormAct(c2, out_channels, 1, norm=norm, act=False))
                stage.append(ConvNormAct(out_channels, out_channels, 3, norm=norm, act=False))
                c2 = out_channels
            self.stages.append(stage)
            self.out_channels.append(int(c2))
        self.in_channels = in_channels
        self.strides = out_strides

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.in_channels):
            raise ValueError(f"SimpleFeaturePyramid expects {len(self.in_channels)} feature maps, got {len(features)}")
        return [stage(features[src]) for stage, src in zip(self.stages, self.sources)]


@register_neck("simple_pyramid")
def simple_pyramid(in_channels: Sequence[int], strides: Sequence[int], scales: Sequence[float] = (4, 2, 1, 0.5),
                   in_index: int | None = -1, out_channels: int | None = None,
                   norm: str = "ln") -> SimpleFeaturePyramid:
    return SimpleFeaturePyramid(in_channels, strides, scales, in_index, out_channels, norm)


__all__ = ["NECKS", "register_neck", "build_neck", "SimpleFeaturePyramid"]
