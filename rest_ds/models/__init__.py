"""Single-device segmentation models (plain PyTorch + timm encoders).

Nothing here knows about SPIM: ``rest_ds.spim.parallelize`` runs these models
unmodified on a spatially sharded scene."""
from .decoders import PPM, ConvBNReLU, UPerHead
from .segmentor import Segmentor
from .zoo import FACTORIES, TinyCNN, convnext_nano_upernet, resnet18_upernet, tiny_cnn_upernet

__all__ = ["ConvBNReLU", "PPM", "UPerHead", "Segmentor", "TinyCNN", "resnet18_upernet",
           "convnext_nano_upernet", "tiny_cnn_upernet", "FACTORIES"]
