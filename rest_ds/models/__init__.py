"""Single-device segmentation models (plain PyTorch + timm encoders).

Nothing here knows about SPIM: ``rest_ds.spim.parallelize`` runs these models
unmodified on a spatially sharded scene.

* decoders (registered by name, ``registry.build_decoder``): ``upernet``,
  ``fpn``, ``linear``, ``setr_pup``, ``fcn`` (:mod:`.decoders`);
* necks (``necks.build_neck``): ``simple_pyramid`` (:mod:`.necks`);
* encoders: registered by ``rest_ds.models.encoders`` (imported on demand by
  :func:`build_segmentor`);
* :class:`ModelConfig` (YAML, :mod:`.config`) -> :func:`build_segmentor` -> :class:`Segmentor`;
* fixed factories for ``rest-ds verify`` (:mod:`.zoo`): named ModelConfigs, built
  by the same :func:`build_segmentor`.
"""
from .config import (AuxHeadConfig, ConfigError, DecoderConfig, EncoderConfig, ModelConfig, NeckConfig,
                     build_segmentor, load_model_config)
from .decoders import (PPM, ConvBNReLU, ConvNormAct, FCNHead, FPNHead, LayerNorm2d, LinearHead, SETRPUPHead,
                       UPerHead)
from .necks import SimpleFeaturePyramid, build_neck, register_neck
from .registry import build_decoder, build_encoder, register_decoder, register_encoder
from .segmentor import Segmentor
from .zoo import FACTORIES, TinyCNN, convnext_nano_upernet, resnet18_upernet, tiny_cnn_upernet

__all__ = ["ConvBNReLU", "ConvNormAct", "LayerNorm2d", "PPM", "UPerHead", "FPNHead", "LinearHead", "SETRPUPHead",
           "FCNHead", "SimpleFeaturePyramid", "build_neck", "register_neck", "build_decoder", "build_encoder",
           "register_decoder", "register_encoder", "Segmentor", "ModelConfig", "EncoderConfig", "NeckConfig",
           "DecoderConfig", "AuxHeadConfig", "ConfigError", "build_segmentor", "load_model_config", "TinyCNN",
           "resnet18_upernet", "convnext_nano_upernet", "tiny_cnn_upernet", "FACTORIES"]
