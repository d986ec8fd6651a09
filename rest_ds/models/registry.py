"""Encoders and decoders by name, so that a config can say ``encoder: vit_base``.

Encoder contract (every registered encoder factory returns such a module):
``forward(x: N x C x H x W) -> list of NCHW feature maps``, finest first, and
attributes ``out_channels: list[int]``, ``strides: list[int]`` (total stride of
each map) and ``align: int`` (the tile alignment SPIM needs: lcm of the stride
products, e.g. patch x window for a windowed ViT).

Decoder contract: ``factory(in_channels: list[int], strides: list[int],
num_classes: int, **kwargs) -> nn.Module`` whose ``forward(features)`` returns
logits at some feature stride (the finest for multi-level heads; a head on one
level returns that level's); the Segmentor upsamples them to the input.
"""
from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

ENCODERS: dict[str, Callable[..., nn.Module]] = {}
DECODERS: dict[str, Callable[..., nn.Module]] = {}


def _register(table: dict, kind: str, name: str):
    def deco(fn):
        if name in table:
            raise ValueError(f"{kind} '{name}' is registered twice")
        table[name] = fn
        return fn
    return deco


def register_encoder(name: str):
    return _register(ENCODERS, "encoder", name)


def register_decoder(name: str):
    return _register(DECODERS, "decoder", name)


def _lookup(table: dict, kind: str, name: str):
    if name not in table:
        raise ValueError(f"unknown {kind} '{name}'; known: {', '.join(sorted(table)) or '(none)'}")
    return table[name]


def import_encoders() -> None:
    """Import ``rest_ds.models.encoders``, whose modules register the encoders (timm and
    transformers are imported only then, not with ``rest_ds.models``)."""
    importlib.import_module("rest_ds.models.encoders")


def build_encoder(name: str, **kwargs) -> nn.Module:
    import_encoders()
    return _lookup(ENCODERS, "encoder", name)(**kwargs)


def build_decoder(name: str, in_channels: list[int], strides: list[int], num_classes: int, **kwargs) -> nn.Module:
    return _lookup(DECODERS, "decoder", name)(in_channels=in_channels, strides=strides, num_classes=num_classes, **kwargs)
