"""Segmentation decoders in plain PyTorch (no SPIM imports), registered by name.

These are ordinary single-device modules. They only use ops whose meaning SPIM
preserves on a spatially sharded scene (convs, whole-scene BatchNorm /
GroupNorm, LayerNorm over channels, adaptive average pooling, bilinear /
nearest ``F.interpolate`` to sizes read from ``x.shape``), so
``rest_ds.spim.parallelize`` runs them unmodified and exactly.

Registered decoders (``rest_ds.models.registry.build_decoder(name, in_channels,
strides, num_classes, **kwargs)``), all NCHW, features finest first:

==========  =====================================================================
``upernet``   :class:`UPerHead` (PPM + FPN fusion, mmseg layout), stride ``strides[0]``
``fpn``       :class:`FPNHead` (semantic FPN, Kirillov et al. 2019), stride ``strides[0]``
``linear``    :class:`LinearHead` (norm + 1x1 conv; SETR-naive), stride ``strides[0]``
              or that of ``in_index``
``setr_pup``  :class:`SETRPUPHead` (progressive upsampling), stride
              ``strides[in_index] / up_scale ** num_convs``
``fcn``       :class:`FCNHead` (convs + classifier on one level; the usual auxiliary
              head), stride ``strides[in_index]``
``segformer_mlp``  :class:`SegFormerMLPHead` (SegFormer's all-MLP head), stride ``strides[0]``
==========  =====================================================================

The logits come out at the stride listed; :class:`~rest_ds.models.segmentor.Segmentor`
upsamples them to the input size.

Normalisation (``norm=``): ``'bn'`` (BatchNorm2d; under SPIM its statistics
cover the whole scene, so batch 1 is fine for full-resolution maps), ``'gn'``
(GroupNorm with the largest group count <= 32 that divides the channels and
leaves at least 2 channels per group),
``'ln'`` (LayerNorm over channels, :class:`LayerNorm2d`) or ``'none'`` (the conv
gets a bias instead).

PPM norm decision: the pooled branches of the pyramid pooling module run on
tiny maps (the ``1 x 1`` bin has one value per channel and image), where
training-mode BatchNorm fails at batch 1 and is numerically ill-conditioned at
batch 2. Whole-scene training usually runs at batch 1, so the branches default
to ``ppm_norm='none'`` (1x1 conv with bias + ReLU) whatever ``norm`` is;
``ppm_norm='bn'`` reproduces mmseg's ``UPerHead`` (and its state-dict keys)
exactly, ``'gn'`` is also accepted.

Dropout before the classifier is elementwise (``nn.Dropout``; mmseg uses
``Dropout2d``): under SPIM each element's mask is a function of the seed and
its global index (docs/design.md section 3), so a dropout head computes the
same on every grid and ``verify`` checks it exactly.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_decoder

NORMS = ("bn", "gn", "ln", "none")


def _resize(x: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def _up2(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 (``align_corners=False``) to the size read from the (global) shape."""
    return _resize(x, (2 * x.shape[-2], 2 * x.shape[-1]))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map (ViTDet / ConvNeXt ``LayerNorm2d``).

    Runs as permute -> ``F.layer_norm`` over the last dim -> permute, which SPIM
    executes per pixel (no communication)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def check_norm(norm: str, what: str = "norm") -> str:
    if norm not in NORMS:
        raise ValueError(f"{what} must be one of {', '.join(repr(n) for n in NORMS)}, got {norm!r}")
    return norm


def gn_groups(channels: int, max_groups: int = 32) -> int:
    """The largest group count <= ``max_groups`` that divides ``channels`` and leaves
    at least 2 channels per group (so a 1 x 1 map is not normalised to all zeros);
    1 for a single channel."""
    return max([g for g in range(1, min(max_groups, channels // 2) + 1) if channels % g == 0] or [1])


def norm_layer(norm: str, channels: int) -> nn.Module:
    """``'bn'`` | ``'gn'`` | ``'ln'`` | ``'none'`` (``nn.Identity``) for ``channels`` channels."""
    check_norm(norm)
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(gn_groups(channels), channels)
    if norm == "ln":
        return LayerNorm2d(channels)
    return nn.Identity()


class ConvNormAct(nn.Sequential):
    """``Conv2d -> norm -> ReLU`` with "same" padding for odd kernels.

    Children ``0`` (conv), ``1`` (norm or Identity), ``2`` (ReLU or Identity), so
    state-dict keys do not depend on the choices. The conv has a bias only when
    ``norm == 'none'``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, norm: str = "bn", act: bool = True):
        check_norm(norm)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                      padding=dilation * (kernel_size - 1) // 2, dilation=dilation, bias=norm == "none"),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True) if act else nn.Identity(),
        )


class ConvBNReLU(ConvNormAct):
    """``Conv2d(bias=False) -> BatchNorm2d -> ReLU`` (``ConvNormAct`` with ``norm='bn'``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, norm="bn")


def _dropout(p: float) -> nn.Module:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _channels(in_channels: Sequence[int], what: str) -> tuple[int, ...]:
    chans = tuple(int(c) for c in in_channels)
    if not chans or any(c <= 0 for c in chans):
        raise ValueError(f"{what}: in_channels must be a non-empty list of positive ints, got {list(in_channels)}")
    return chans


def _level(index: int, n: int, what: str) -> int:
    if not -n <= index < n:
        raise ValueError(f"{what}: in_index {index} is out of range for {n} feature levels")
    return index % n


def _check_features(features: Sequence[torch.Tensor], n: int, what: str) -> None:
    if len(features) != n:
        raise ValueError(f"{what} expects {n} feature maps, got {len(features)}")


class PPM(nn.ModuleList):
    """Pyramid pooling (PSPNet): for each bin size ``b``, ``AdaptiveAvgPool2d(b)``
    then a 1x1 ``ConvNormAct`` (norm ``norm``, default none: conv with bias),
    upsampled bilinearly back to the input's H x W.

    ``forward(x: N x in_channels x H x W)`` returns a list of
    ``len(pool_scales)`` tensors ``N x channels x H x W``. With ``norm='bn'``
    in training mode the ``b = 1`` branch's BatchNorm sees ``N`` values per
    channel and needs a batch of at least 2 (as in mmseg)."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, norm: str = "none"):
        check_norm(norm, "ppm_norm")
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), ConvNormAct(in_channels, channels, 1, norm=norm))
            for b in pool_scales
        )
        self.pool_scales = tuple(pool_scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_resize(branch(x), x.shape[2:]) for branch in self]


class UPerHead(nn.Module):
    """UPerNet decode head, laid out like mmseg's ``UPerHead``.

    ``forward(features)`` takes ``len(in_channels)`` feature maps, finest first
    (``features[i]``: N x in_channels[i] x H_i x W_i), and returns logits
    ``N x num_classes x H_0 x W_0``:

    * PPM on the deepest level, concatenated with it, fused by a 3x3 conv;
    * 1x1 lateral convs on the other levels;
    * top-down path: each level adds the bilinear upsampling of the level above
      to its own size;
    * a 3x3 conv on every level but the deepest;
    * all levels upsampled to the finest level's size, concatenated, fused by a
      3x3 conv, dropout, 1x1 classifier.

    Every conv is ``ConvNormAct`` with ``norm``, except the PPM branches, which
    use ``ppm_norm`` (module docstring). ``norm='bn', ppm_norm='bn'`` is mmseg's
    head, key for key."""

    def __init__(self, in_channels: Sequence[int], channels: int = 128, num_classes: int = 7,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, norm: str = "bn",
                 ppm_norm: str = "none"):
        super().__init__()
        in_channels = _channels(in_channels, "UPerHead")
        self.in_channels = in_channels
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels, ppm_norm)
        self.bottleneck = ConvNormAct(in_channels[-1] + len(pool_scales) * channels, channels, 3, norm=norm)
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, channels, 1, norm=norm) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3, norm=norm) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvNormAct(len(in_channels) * channels, channels, 3, norm=norm)
        self.dropout = _dropout(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        _check_features(features, len(self.in_channels), "UPerHead")
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


class FPNHead(nn.Module):
    """Semantic FPN (Kirillov et al., Panoptic FPN, 2019; mmseg ``FPN`` + ``FPNHead``).

    FPN: 1x1 lateral conv per level (``fpn_norm``, no activation), top-down
    path adding the nearest-neighbour upsampling of the level above, a 3x3
    output conv per level (``fpn_norm``, no activation), all ``channels`` wide.
    Semantic head: level ``i`` goes through ``max(1, log2(strides[i] /
    strides[0]))`` stages of 3x3 ``ConvNormAct`` (``norm``, ``head_channels``
    wide), each but on the finest level followed by a bilinear x2 upsampling;
    the levels are summed at the finest stride (a level whose doubled size
    misses the finest size, on scenes not divisible by the strides, is resized
    to it), then dropout and a 1x1 classifier. Returns logits at ``strides[0]``.

    ``strides`` must be increasing powers-of-two multiples of ``strides[0]``.

    Defaults as in Panoptic FPN (detectron2): no norm in the FPN (convs with
    bias), GroupNorm in the semantic head. With ``norm='bn'`` and
    ``fpn_norm='none'`` the FPN output convs' biases reach the loss only through
    a 3x3 conv into BatchNorm, which removes them except at the zero-padded
    scene border: their gradients are tiny and dominated by rounding; use
    ``fpn_norm='bn'`` with ``norm='bn'`` (mmseg: FPN without norm)."""

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], num_classes: int, channels: int = 128,
                 head_channels: int | None = None, norm: str = "gn", fpn_norm: str = "none",
                 dropout: float = 0.1):
        super().__init__()
        in_channels = _channels(in_channels, "FPNHead")
        strides = [int(s) for s in strides]
        if len(strides) != len(in_channels):
            raise ValueError(f"FPNHead: {len(in_channels)} in_channels but {len(strides)} strides")
        steps = []
        for s in strides:
            ratio = s / strides[0]
            if ratio < 1 or ratio != 2 ** round(math.log2(ratio)):
                raise ValueError(f"FPNHead: strides {strides} must be powers-of-two multiples of the first")
            steps.append(round(math.log2(ratio)))
        if steps != sorted(steps):
            raise ValueError(f"FPNHead: strides {strides} must be increasing (finest first)")
        self.in_channels = in_channels
        self.strides = tuple(strides)
        head_channels = int(head_channels) if head_channels is not None else max(1, channels // 2)
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, channels, 1, norm=fpn_norm, act=False) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3, norm=fpn_norm, act=False)
                                       for _ in in_channels)
        self.ups = tuple(steps)
        self.scale_heads = nn.ModuleList(
            nn.Sequential(*(ConvNormAct(channels if k == 0 else head_channels, head_channels, 3, norm=norm)
                            for k in range(max(1, n))))
            for n in steps
        )
        self.dropout = _dropout(dropout)
        self.conv_seg = nn.Conv2d(head_channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        _check_features(features, len(self.in_channels), "FPNHead")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:], "nearest")
        pyramid = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)]
        out = None
        for x, head, n in zip(pyramid, self.scale_heads, self.ups):
            for k, stage in enumerate(head):
                x = stage(x)
                if k < n:
                    x = _up2(x)
            if out is None:
                out = x
            else:
                if x.shape[2:] != out.shape[2:]:
                    x = _resize(x, out.shape[2:])
                out = out + x
        return self.conv_seg(self.dropout(out))


class LinearHead(nn.Module):
    """SETR-naive / linear-probe head: ``norm -> dropout -> 1x1 conv`` per pixel.

    Input: ``features[in_index]``, or with ``in_index=None`` every level
    upsampled bilinearly to the finest level's size and concatenated (levels at
    the same stride pass through unchanged). With ``channels`` set, a 1x1
    ``ConvNormAct`` to ``channels`` (norm ``norm``) comes first and the norm
    step is inside it (SETR-naive: 1x1 conv, norm, ReLU, 1x1 classifier).
    Returns logits at the chosen level's stride (the finest with ``None``)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, in_index: int | None = None,
                 channels: int | None = None, norm: str = "bn", dropout: float = 0.1):
        super().__init__()
        in_channels = _channels(in_channels, "LinearHead")
        self.in_channels = in_channels
        self.in_index = None if in_index is None else _level(in_index, len(in_channels), "LinearHead")
        c = sum(in_channels) if in_index is None else in_channels[self.in_index]
        if channels is None:
            self.proj = norm_layer(norm, c)
            c_out = c
        else:
            self.proj = ConvNormAct(c, int(channels), 1, norm=norm)
            c_out = int(channels)
        self.dropout = _dropout(dropout)
        self.conv_seg = nn.Conv2d(c_out, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        _check_features(features, len(self.in_channels), "LinearHead")
        if self.in_index is not None:
            x = features[self.in_index]
        else:
            size = features[0].shape[2:]
            x = torch.cat([f if f.shape[2:] == size else _resize(f, size) for f in features], dim=1)
        return self.conv_seg(self.dropout(self.proj(x)))


class SETRPUPHead(nn.Module):
    """SETR progressive upsampling (mmseg ``SETRUPHead`` with ``num_convs=4,
    up_scale=2``): from ``features[in_index]``, ``num_convs`` x (``kernel_size``
    ``ConvNormAct`` ``channels`` wide + bilinear x``up_scale`` upsampling), then
    dropout and a 1x1 classifier. Returns logits at stride
    ``strides[in_index] / up_scale ** num_convs`` (stride 1 for a stride-16 ViT
    with the defaults). mmseg's LayerNorm on the input tokens is left to the
    encoder."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, in_index: int = -1, channels: int = 128,
                 num_convs: int = 4, up_scale: int = 2, kernel_size: int = 3, norm: str = "bn",
                 dropout: float = 0.1):
        super().__init__()
        in_channels = _channels(in_channels, "SETRPUPHead")
        if num_convs < 1 or up_scale < 1 or kernel_size % 2 != 1:
            raise ValueError(f"SETRPUPHead: need num_convs >= 1, up_scale >= 1 and an odd kernel_size "
                             f"(got {num_convs}, {up_scale}, {kernel_size})")
        self.in_channels = in_channels
        self.in_index = _level(in_index, len(in_channels), "SETRPUPHead")
        self.up_scale = int(up_scale)
        c = in_channels[self.in_index]
        self.convs = nn.ModuleList(ConvNormAct(c if i == 0 else channels, channels, kernel_size, norm=norm)
                                   for i in range(num_convs))
        self.dropout = _dropout(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        _check_features(features, len(self.in_channels), "SETRPUPHead")
        x = features[self.in_index]
        for conv in self.convs:
            x = conv(x)
            if self.up_scale > 1:
                x = _resize(x, (self.up_scale * x.shape[-2], self.up_scale * x.shape[-1]))
        return self.conv_seg(self.dropout(x))


class FCNHead(nn.Module):
    """FCN head (mmseg ``FCNHead``), the usual auxiliary head: on
    ``features[in_index]``, ``num_convs`` x ``ConvNormAct`` (``kernel_size``,
    ``dilation``, ``channels`` wide), optionally concatenated with the input and
    fused by one more conv (``concat_input``), then dropout and a 1x1
    classifier. Returns logits at ``strides[in_index]``."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, in_index: int = -1, channels: int = 128,
                 num_convs: int = 1, kernel_size: int = 3, dilation: int = 1, concat_input: bool = False,
                 norm: str = "bn", dropout: float = 0.1):
        super().__init__()
        in_channels = _channels(in_channels, "FCNHead")
        if num_convs < 0 or kernel_size % 2 != 1:
            raise ValueError(f"FCNHead: need num_convs >= 0 and an odd kernel_size (got {num_convs}, {kernel_size})")
        self.in_channels = in_channels
        self.in_index = _level(in_index, len(in_channels), "FCNHead")
        c = in_channels[self.in_index]
        if num_convs == 0 and c != channels:
            channels = c  # no conv: the classifier sees the input itself
        self.convs = nn.Sequential(*(ConvNormAct(c if i == 0 else channels, channels, kernel_size, dilation=dilation,
                                                 norm=norm) for i in range(num_convs)))
        self.conv_cat = ConvNormAct(c + channels, channels, kernel_size, norm=norm) if concat_input else None
        self.dropout = _dropout(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        _check_features(features, len(self.in_channels), "FCNHead")
        x = features[self.in_index]
        y = self.convs(x)
        if self.conv_cat is not None:
            y = self.conv_cat(torch.cat([x, y], dim=1))
        return self.conv_seg(self.dropout(y))


class SegFormerMLPHead(nn.Module):
    """SegFormer's all-MLP decode head (transformers ``SegformerDecodeHead``,
    mmseg ``SegformerHead``), the same arithmetic and parameter names as
    transformers': per level a linear map to ``channels`` over the channel dim,
    bilinear resize (``align_corners=False``) to the finest level, concatenation
    coarsest first, a 1x1 fuse conv without bias, BatchNorm, ReLU, dropout and
    a 1x1 classifier. Returns logits at ``strides[0]``."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        in_channels = _channels(in_channels, "SegFormerMLPHead")
        self.in_channels = in_channels
        self.linear_projections = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(c, channels)}) for c in in_channels)
        self.linear_fuse = nn.Conv2d(channels * len(in_channels), channels, 1, bias=False)
        self.batch_norm = nn.BatchNorm2d(channels)
        self.activation = nn.ReLU()
        self.dropout = _dropout(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        _check_features(features, len(self.in_channels), "SegFormerMLPHead")
        size = features[0].shape[2:]
        outs = []
        for f, lin in zip(features, self.linear_projections):
            y = lin["proj"](f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            outs.append(y if y.shape[2:] == size else _resize(y, size))
        x = self.activation(self.batch_norm(self.linear_fuse(torch.cat(outs[::-1], dim=1))))
        return self.classifier(self.dropout(x))


# --- registry factories (decoder contract: registry.py) ------------------------

@register_decoder("upernet")
def upernet(in_channels: Sequence[int], strides: Sequence[int], num_classes: int, channels: int = 128,
            pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, norm: str = "bn",
            ppm_norm: str = "none") -> UPerHead:
    return UPerHead(in_channels, channels, num_classes, pool_scales, dropout, norm, ppm_norm)


@register_decoder("fpn")
def fpn(in_channels: Sequence[int], strides: Sequence[int], num_classes: int, channels: int = 128,
        head_channels: int | None = None, norm: str = "gn", fpn_norm: str = "none", dropout: float = 0.1) -> FPNHead:
    return FPNHead(in_channels, strides, num_classes, channels, head_channels, norm, fpn_norm, dropout)


@register_decoder("linear")
def linear(in_channels: Sequence[int], strides: Sequence[int], num_classes: int, in_index: int | None = None,
           channels: int | None = None, norm: str = "bn", dropout: float = 0.1) -> LinearHead:
    return LinearHead(in_channels, num_classes, in_index, channels, norm, dropout)


@register_decoder("setr_pup")
def setr_pup(in_channels: Sequence[int], strides: Sequence[int], num_classes: int, in_index: int = -1,
             channels: int = 128, num_convs: int = 4, up_scale: int = 2, kernel_size: int = 3, norm: str = "bn",
             dropout: float = 0.1) -> SETRPUPHead:
    return SETRPUPHead(in_channels, num_classes, in_index, channels, num_convs, up_scale, kernel_size, norm, dropout)


@register_decoder("fcn")
def fcn(in_channels: Sequence[int], strides: Sequence[int], num_classes: int, in_index: int = -1,
        channels: int = 128, num_convs: int = 1, kernel_size: int = 3, dilation: int = 1,
        concat_input: bool = False, norm: str = "bn", dropout: float = 0.1) -> FCNHead:
    return FCNHead(in_channels, num_classes, in_index, channels, num_convs, kernel_size, dilation, concat_input,
                   norm, dropout)


@register_decoder("segformer_mlp")
def segformer_mlp(in_channels: Sequence[int], strides: Sequence[int], num_classes: int, channels: int = 256,
                  dropout: float = 0.1) -> SegFormerMLPHead:
    return SegFormerMLPHead(in_channels, num_classes, channels, dropout)


__all__ = ["NORMS", "LayerNorm2d", "norm_layer", "gn_groups", "check_norm", "ConvNormAct", "ConvBNReLU", "PPM",
           "UPerHead", "FPNHead", "LinearHead", "SETRPUPHead", "FCNHead", "SegFormerMLPHead"]
