"""Third-party model zoo for the SPIM exactness tests (tests/test_spim_zoo.py).

Each factory takes no arguments and returns an *unmodified* model built by its
own library with random weights (nothing is downloaded: torchvision
``weights=None, weights_backbone=None``, timm ``pretrained=False``,
transformers from a config object). Only sizes are chosen here (class count,
tiny widths where the library has a knob for them), never the model's code.

Append-friendly: one small top-level function per model; a test picks
factories by name.
"""
from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 3


# --- torchvision segmentation models ------------------------------------------

def tv_deeplabv3_mobilenet_v3_large() -> nn.Module:
    """With the auxiliary FCN head (a second output, {'out', 'aux'})."""
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large
    return deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                                        aux_loss=True)


def tv_deeplabv3_resnet50() -> nn.Module:
    from torchvision.models.segmentation import deeplabv3_resnet50
    return deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)


def tv_lraspp_mobilenet_v3_large() -> nn.Module:
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large
    return lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)


def tv_fcn_resnet50() -> nn.Module:
    from torchvision.models.segmentation import fcn_resnet50
    return fcn_resnet50(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)


# --- timm backbones (features_only: every feature map is an output) -----------

def _timm(name: str, **kwargs) -> nn.Module:
    import timm
    return timm.create_model(name, pretrained=False, **kwargs)


def timm_efficientnet_b0_features() -> nn.Module:
    return _timm("efficientnet_b0", features_only=True)


def timm_tf_efficientnet_b0_features() -> nn.Module:
    """TensorFlow-ported weights layout: 'same' padding (Conv2dSame / F.pad by the input size)."""
    return _timm("tf_efficientnet_b0", features_only=True)


def timm_tf_efficientnetv2_b0_features() -> nn.Module:
    """EfficientNetV2: fused MBConv (EdgeResidual) stages, 'same' padding."""
    return _timm("tf_efficientnetv2_b0", features_only=True)


def timm_mixnet_s_features() -> nn.Module:
    """Mixed depthwise kernels (3x3 .. 9x9) on channel splits, concatenated."""
    return _timm("mixnet_s", features_only=True)


def timm_hrnet_w18_small_features() -> nn.Module:
    """Multi-resolution branches fused with nearest upsampling by scale factors."""
    return _timm("hrnet_w18_small", features_only=True)


def timm_hrnet_w18_small_v2_features() -> nn.Module:
    return _timm("hrnet_w18_small_v2", features_only=True)


def timm_regnetx_002_features() -> nn.Module:
    """Group convs."""
    return _timm("regnetx_002", features_only=True)


def timm_regnety_002_features() -> nn.Module:
    """Group convs and squeeze-excitation."""
    return _timm("regnety_002", features_only=True)


def timm_regnetz_005_features() -> nn.Module:
    """RegNetZ (timm byobnet): SE, SiLU, inverted bottlenecks."""
    return _timm("regnetz_005", features_only=True)


def timm_convnext_atto_features() -> nn.Module:
    """LayerNorm2d, depthwise 7x7, layer scale."""
    return _timm("convnext_atto", features_only=True)


def timm_convnext_atto_ols_features() -> nn.Module:
    """ConvNeXt with an overlapping stem (two 3x3 stride-2 convs instead of the 4x4 patchify)."""
    return _timm("convnext_atto_ols", features_only=True)


def timm_convnext_zepto_rms_features() -> nn.Module:
    """ConvNeXt with RmsNorm2d."""
    return _timm("convnext_zepto_rms", features_only=True)


def timm_convnextv2_atto_features() -> nn.Module:
    """ConvNeXt-V2: GlobalResponseNorm (an L2 norm over the whole scene per channel)."""
    return _timm("convnextv2_atto", features_only=True)


def timm_mobilenetv3_large_075_features() -> nn.Module:
    """Hard-swish, hard-sigmoid squeeze-excitation."""
    return _timm("mobilenetv3_large_075", features_only=True)


def timm_ese_vovnet19b_dw_features() -> nn.Module:
    """VoVNet with depthwise convs and effective squeeze-excitation: in float32 a few of its
    gradients exceed the reference's own rounding noise 10x (rounding amplified by the model;
    exact in float64: rest-ds verify's FP64-PASS)."""
    return _timm("ese_vovnet19b_dw", features_only=True)


def timm_resnet26d_features() -> nn.Module:
    """Deep stem, average-pool downsample shortcuts."""
    return _timm("resnet26d", features_only=True)


def timm_resnet18d_os8_features() -> nn.Module:
    """Dilated for segmentation (output_stride=8: layer3/4 with dilation 2/4 instead of stride)."""
    return _timm("resnet18d", features_only=True, output_stride=8)


def timm_gcresnet33ts_features() -> nn.Module:
    """GCNet global-context blocks: softmax over the scene's tokens, a matmul contracting over them."""
    return _timm("gcresnet33ts", features_only=True)


def timm_regnety_002_classifier() -> nn.Module:
    """With its classifier: global average pool + linear head (replicated output)."""
    return _timm("regnety_002", num_classes=NUM_CLASSES)


def timm_efficientnet_b0_classifier() -> nn.Module:
    """With its classifier (conv head, global pool, dropout, linear) and stochastic depth."""
    return _timm("efficientnet_b0", num_classes=NUM_CLASSES, drop_rate=0.2, drop_path_rate=0.2)


# --- transformers -------------------------------------------------------------

def hf_upernet_convnext() -> nn.Module:
    """``UperNetForSemanticSegmentation`` with a tiny ConvNeXt backbone with stochastic depth
    (the auxiliary head only runs when labels are given: off)."""
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation
    backbone = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1],
                              drop_path_rate=0.2, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = UperNetConfig(backbone_config=backbone, hidden_size=16, pool_scales=[1, 2, 3, 6],
                        use_auxiliary_head=False, num_labels=NUM_CLASSES)
    return UperNetForSemanticSegmentation(cfg)


# --- transformers / timm vision transformers (tiny widths) ---------------------
# Swin: patch 4 x window 4 x 2**3 = 128 px alignment (tests/test_models_swin.py);
# SegFormer / PVT-v2: stride 32 with the reduced-key attention of stage 1
# (sr ratio 8) on a 32-px grid (tests/test_spim_sr_attention.py).

_SWIN_TINY = dict(embed_dim=24, depths=(2, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=4)


def timm_swin_tiny_features() -> nn.Module:
    """timm Swin v1 (shifted windows: roll, window partition, relative position bias);
    ``strict_img_size=False`` lets it take scenes other than its 224 px reference.
    Features are NHWC."""
    return _timm("swin_tiny_patch4_window7_224", features_only=True, strict_img_size=False, **_SWIN_TINY)


def timm_swinv2_tiny_features() -> nn.Module:
    """timm Swin-V2: cosine attention with a learned scale, continuous position bias MLP."""
    return _timm("swinv2_tiny_window8_256", features_only=True, strict_img_size=False, **_SWIN_TINY)


def timm_pvt_v2_b0_features() -> nn.Module:
    """timm PVT-v2: spatial-reduction attention (keys/values from a strided conv), DWConv MLP."""
    return _timm("pvt_v2_b0", features_only=True, embed_dims=[8, 16, 24, 32], num_heads=[1, 1, 2, 2],
                 depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2])


def hf_segformer() -> nn.Module:
    """``SegformerForSemanticSegmentation`` (MiT encoder + all-MLP head; logits at stride 4)."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation
    cfg = SegformerConfig(num_channels=3, num_labels=NUM_CLASSES, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                          num_attention_heads=[1, 1, 2, 2], sr_ratios=[8, 4, 2, 1], decoder_hidden_size=16)
    return SegformerForSemanticSegmentation(cfg)


def hf_swin_backbone() -> nn.Module:
    """transformers ``SwinBackbone`` (every stage's NCHW map; pads to window multiples itself)."""
    from transformers import SwinConfig
    from transformers.models.swin.modeling_swin import SwinBackbone
    cfg = SwinConfig(num_channels=3, embed_dim=24, depths=[2, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=4,
                     out_features=["stage1", "stage2", "stage3", "stage4"])
    return SwinBackbone(cfg)
