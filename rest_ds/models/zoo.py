"""Model factories for ``rest-ds verify`` / training: random weights, no downloads.

Each factory is a named :class:`~rest_ds.models.config.ModelConfig` built by
:func:`~rest_ds.models.config.build_segmentor`, the one builder of the YAML
models too: ``config(name, **kwargs)`` is the config, ``FACTORIES[name](**kwargs)``
the model (``build_segmentor(config(name, **kwargs))``), so writing
``config(name).to_yaml(path)`` gives a model YAML that builds the same model. A
``configs/models/NAME.yaml`` named like a factory must hold that factory's
config (tests/test_models_decoders.py checks it).

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

import inspect
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .config import DecoderConfig, EncoderConfig, ModelConfig, build_segmentor
from .decoders import ConvBNReLU
from .registry import register_encoder
from .segmentor import Segmentor


def _upernet(encoder: str, encoder_kwargs: dict[str, Any], num_classes: int, in_chans: int, channels: int,
             dropout: float, pool_scales: Sequence[int], ppm_norm: str) -> ModelConfig:
    return ModelConfig(encoder=EncoderConfig(encoder, in_chans=in_chans, kwargs=dict(encoder_kwargs)),
                       decoder=DecoderConfig("upernet", channels=channels, norm="bn", dropout=dropout,
                                             kwargs={"pool_scales": list(pool_scales), "ppm_norm": ppm_norm}),
                       num_classes=num_classes)


def resnet18_upernet_config(num_classes: int = 7, in_chans: int = 3, channels: int = 128, dropout: float = 0.0,
                            pool_scales: Sequence[int] = (1, 2, 3, 6), ppm_norm: str = "bn") -> ModelConfig:
    """timm ``resnet18`` (features at strides 4, 8, 16, 32; 64-512 channels) + UPerNet head."""
    return _upernet("timm_cnn", {"model_name": "resnet18", "out_indices": [1, 2, 3, 4]}, num_classes, in_chans,
                    channels, dropout, pool_scales, ppm_norm)


def convnext_nano_upernet_config(num_classes: int = 7, in_chans: int = 3, channels: int = 128,
                                 dropout: float = 0.0, pool_scales: Sequence[int] = (1, 2, 3, 6),
                                 ppm_norm: str = "bn") -> ModelConfig:
    """timm ``convnext_nano`` (features at strides 4, 8, 16, 32; 80-640 channels) + UPerNet head."""
    return _upernet("timm_cnn", {"model_name": "convnext_nano"}, num_classes, in_chans, channels, dropout,
                    pool_scales, ppm_norm)


def swin_tiny_upernet_config(num_classes: int = 7, in_chans: int = 3, channels: int = 128, dropout: float = 0.0,
                             pool_scales: Sequence[int] = (1, 2, 3, 6), ppm_norm: str = "bn",
                             **timm_kwargs) -> ModelConfig:
    """timm ``swin_tiny_patch4_window7_224`` (Swin-T: features at strides 4-32, 96-768 channels; any
    scene size) + UPerNet head, the REST paper's configuration; ``align`` 224 (patch 4 x window 7 x 2^3)."""
    return _upernet("timm_swin", {"model_name": "swin_tiny_patch4_window7_224", **timm_kwargs}, num_classes,
                    in_chans, channels, dropout, pool_scales, ppm_norm)


def segformer_b0_config(num_classes: int = 7, in_chans: int = 3, channels: int = 256, dropout: float = 0.0,
                        drop_path_rate: float = 0.0, **config_kwargs) -> ModelConfig:
    """SegFormer-B0: transformers' MiT-b0 encoder (spatial-reduction attention, sr 8/4/2/1) + the
    all-MLP head ``channels`` wide; ``align`` 32 (stage strides x sr: 4x8 = 8x4 = 16x2 = 32x1)."""
    return ModelConfig(encoder=EncoderConfig("hf_segformer", in_chans=in_chans,
                                             kwargs={"variant": "mit_b0", "drop_path_rate": drop_path_rate,
                                                     **config_kwargs}),
                       decoder=DecoderConfig("segformer_mlp", channels=channels, dropout=dropout),
                       num_classes=num_classes)


def tiny_cnn_upernet_config(num_classes: int = 7, in_chans: int = 3, channels: int = 16, dropout: float = 0.0,
                            pool_scales: Sequence[int] = (1, 2, 3, 6), ppm_norm: str = "bn") -> ModelConfig:
    """:class:`TinyCNN` (encoder ``tiny_cnn``) + a narrow UPerNet head."""
    return _upernet("tiny_cnn", {}, num_classes, in_chans, channels, dropout, pool_scales, ppm_norm)


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


@register_encoder("tiny_cnn")
def tiny_cnn(in_chans: int = 3, widths: Sequence[int] = (8, 16, 24, 32)) -> TinyCNN:
    """:class:`TinyCNN` as a registered encoder (for fast tests and YAML models)."""
    return TinyCNN(in_chans, widths)


#: name -> ModelConfig factory (keyword arguments: the factory's)
CONFIGS: dict[str, Callable[..., ModelConfig]] = {
    "resnet18_upernet": resnet18_upernet_config,
    "convnext_nano_upernet": convnext_nano_upernet_config,
    "swin_tiny_upernet": swin_tiny_upernet_config,
    "tiny_cnn_upernet": tiny_cnn_upernet_config,
    "segformer_b0": segformer_b0_config,
}


def config(name: str, **kwargs) -> ModelConfig:
    """The :class:`ModelConfig` of zoo model ``name`` (ValueError naming the known ones otherwise)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown zoo model '{name}' (known: {', '.join(sorted(CONFIGS))})")
    return CONFIGS[name](**kwargs)


def _factory(name: str) -> Callable[..., Segmentor]:
    make_config = CONFIGS[name]

    def factory(*args, **kwargs) -> Segmentor:
        return build_segmentor(make_config(*args, **kwargs))

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"``build_segmentor({make_config.__name__}(...))``: {make_config.__doc__}"
    factory.__signature__ = inspect.signature(make_config).replace(return_annotation=Segmentor)
    return factory


resnet18_upernet = _factory("resnet18_upernet")
convnext_nano_upernet = _factory("convnext_nano_upernet")
swin_tiny_upernet = _factory("swin_tiny_upernet")
tiny_cnn_upernet = _factory("tiny_cnn_upernet")
segformer_b0 = _factory("segformer_b0")

FACTORIES = {
    "resnet18_upernet": resnet18_upernet,
    "convnext_nano_upernet": convnext_nano_upernet,
    "tiny_cnn_upernet": tiny_cnn_upernet,
    "segformer_b0": segformer_b0,
}

__all__ = ["resnet18_upernet", "convnext_nano_upernet", "swin_tiny_upernet", "tiny_cnn_upernet", "segformer_b0",
           "TinyCNN", "tiny_cnn", "FACTORIES", "CONFIGS", "config", "resnet18_upernet_config",
           "convnext_nano_upernet_config", "swin_tiny_upernet_config", "tiny_cnn_upernet_config",
           "segformer_b0_config"]
