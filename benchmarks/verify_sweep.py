"""The third-party model sweeps of ``rest-ds verify``: 165 timm, torchvision and
transformers models (83 in the first sweep, 40 of new families in the second,
42 more in the third; 196 rows with the repeats on other grids and inputs),
each run through ``rest-ds verify --train`` at the settings it needs, one at a
time.

Every model is a factory in this file (random weights, no download; a small
segmentation head where the model has none), so any one of them is a
``rest-ds verify`` target on its own::

    .venv/bin/rest-ds verify benchmarks/verify_sweep.py:resnet18d --train
    .venv/bin/rest-ds verify benchmarks/verify_sweep.py:tv_swin_t --train   # align 224 from the model: 224 x 448

Each factory's model carries the ``align`` of its row of :data:`MODELS`, so
verify's defaults (grid 1x2, input 2 x 3 x 128 x 128 rounded up to the
alignment) match the sweep except where a row names another input shape.
The sweep::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/verify_sweep.py [--only NAME,...] [--out DIR]

prints one line per model (verdict, check counts by class, max error, seconds)
and writes DIR/verify_sweep.md and DIR/verify_sweep.json (default DIR
runs/verify_sweep). ``expect`` is the verdict V2's sweep found; a model whose
verdict differs is flagged ``CHANGED`` (a regression if it was PASS) and the
script exits 1. Seconds are wall clock on whatever machine runs it, not
benchmarks.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent


# ----------------------------------------------------------------- wrappers

class Dense(nn.Module):
    """A backbone's last feature map -> 1x1 conv to 3 classes -> bilinear upsampling to the input size.

    ``mode``: ``features`` (timm ``features_only``: a list of NCHW maps), ``features_nhwc`` (the same, NHWC),
    ``intermediates`` (timm ``forward_intermediates``), ``plain`` (the module returns one NCHW map),
    ``nhwc`` (one NHWC map), ``out`` (a dict with ``'out'``, torchvision segmentation: no head).
    """

    def __init__(self, backbone: nn.Module, ch: int, mode: str = "features", classes: int = 3):
        super().__init__()
        self.backbone = backbone
        self.mode = mode
        self.head = nn.Conv2d(ch, classes, 1) if mode != "out" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if self.mode == "out":
            return self.backbone(x)["out"]
        if self.mode == "features":
            f = self.backbone(x)[-1]
        elif self.mode == "features_nhwc":
            f = self.backbone(x)[-1].permute(0, 3, 1, 2)
        elif self.mode == "intermediates":
            f = self.backbone.forward_intermediates(x, intermediates_only=True)[-1]
        elif self.mode == "nhwc":
            f = self.backbone(x).permute(0, 3, 1, 2)
        else:
            f = self.backbone(x)
        return F.interpolate(self.head(f), size=(H, W), mode="bilinear", align_corners=False)


class _HF(nn.Module):
    """A transformers model -> 3-class map at the input size (``kind``: sam, segformer, upernet, dinov2)."""

    def __init__(self, m: nn.Module, ch: int, kind: str, patch: int = 14):
        super().__init__()
        self.m = m
        self.kind = kind
        self.patch = patch
        self.head = nn.Conv2d(ch, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if self.kind == "segformer":
            return F.interpolate(self.m(pixel_values=x).logits, size=(H, W), mode="bilinear")
        if self.kind == "upernet":
            return self.m(pixel_values=x).logits
        if self.kind == "sam":
            f = self.m(pixel_values=x).last_hidden_state
        else:  # dinov2: patch tokens (drop CLS) back to a map
            o = self.m(pixel_values=x).last_hidden_state[:, 1:]
            B, N, C = o.shape
            f = o.transpose(1, 2).reshape(B, C, H // self.patch, W // self.patch)
        return F.interpolate(self.head(f), size=(H, W), mode="bilinear")


# ----------------------------------------------------------------- builders

def _feat(name: str, **kw) -> nn.Module:
    import timm

    m = timm.create_model(name, pretrained=False, features_only=True, **kw)
    return Dense(m, m.feature_info.channels()[-1], "features")


def _feat_nhwc(name: str, **kw) -> nn.Module:
    d = _feat(name, **kw)
    d.mode = "features_nhwc"
    return d


def _inter(name: str, ch: int | None = None, **kw) -> nn.Module:
    import timm

    m = timm.create_model(name, pretrained=False, num_classes=0, **kw)
    return Dense(m, ch if ch is not None else m.num_features, "intermediates")


def _tv_seg(name: str) -> nn.Module:
    import torchvision

    m = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=3,
                                                      aux_loss=False)
    return Dense(m, 0, "out")


def _tv(name: str, features: Callable[[nn.Module], nn.Module], ch: int, mode: str = "plain", **kw) -> nn.Module:
    import torchvision

    m = getattr(torchvision.models, name)(weights=None, **kw)
    return Dense(features(m), ch, mode)


def _tv_googlenet() -> nn.Module:
    def feats(m):
        return nn.Sequential(m.conv1, m.maxpool1, m.conv2, m.conv3, m.maxpool2, m.inception3a, m.inception3b,
                             m.maxpool3, m.inception4a, m.inception4b, m.inception4c, m.inception4d,
                             m.inception4e, m.maxpool4, m.inception5a, m.inception5b)
    return _tv("googlenet", feats, 1024, aux_logits=False, init_weights=True)


def _hf_sam() -> nn.Module:
    from transformers import SamVisionConfig, SamVisionModel

    cfg = SamVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, output_channels=32,
                          image_size=128, patch_size=16, window_size=4, global_attn_indexes=[1], mlp_dim=128)
    return _HF(SamVisionModel(cfg), 32, "sam")


def _hf_segformer() -> nn.Module:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    cfg = SegformerConfig(hidden_sizes=[16, 32, 64, 128], decoder_hidden_size=64, num_labels=3, depths=[1, 1, 1, 1])
    return _HF(SegformerForSemanticSegmentation(cfg), 3, "segformer")


def _hf_upernet() -> nn.Module:
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

    bb = ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                        out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = UperNetConfig(backbone_config=bb, hidden_size=32, auxiliary_in_channels=64, use_auxiliary_head=False,
                        num_labels=3)
    return _HF(UperNetForSemanticSegmentation(cfg), 3, "upernet")


def _hf_dinov2() -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                       image_size=126, patch_size=14)
    return _HF(Dinov2Model(cfg), 64, "dinov2", patch=14)


# second sweep: builders for the families the first sweep had not tried

class _Tokens(nn.Module):
    """A module returning (B, N, C) patch tokens (``skip`` leading class tokens dropped) -> NCHW map at
    ``H/patch x W/patch`` -> 1x1 conv to 3 classes -> bilinear to the input size."""

    def __init__(self, m: nn.Module, ch: int, patch: int, skip: int = 0, call: Callable | None = None):
        super().__init__()
        self.m = m
        self.patch = patch
        self.skip = skip
        self.call = call
        self.head = nn.Conv2d(ch, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        t = (self.call(self.m, x) if self.call is not None else self.m(x))[:, self.skip:]
        f = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], H // self.patch, W // self.patch)
        return F.interpolate(self.head(f), size=(H, W), mode="bilinear")


class _HFOut(nn.Module):
    """A transformers model -> one NCHW map (``pick``: ``logits``, ``depth``, ``last`` = last_hidden_state,
    ``fmap`` = the last of a backbone's feature_maps, ``tokens`` = last_hidden_state's patch tokens after
    ``skip`` class tokens, ``m2f`` = Mask2Former's semantic map, ``fpn`` = the last FPN level (SAM 2),
    ``hidden`` = the last of the hidden states) -> 3 classes at the input size."""

    def __init__(self, m: nn.Module, ch: int, pick: str, patch: int = 16, skip: int = 0):
        super().__init__()
        self.m = m
        self.pick = pick
        self.patch = patch
        self.skip = skip
        self.head = nn.Conv2d(ch, 3, 1) if pick not in ("logits", "m2f") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        o = self.m(pixel_values=x, output_hidden_states=True) if self.pick == "hidden" else self.m(pixel_values=x)
        if self.pick == "logits":
            return F.interpolate(o.logits, size=(H, W), mode="bilinear")
        if self.pick == "m2f":  # the semantic-segmentation inference of Mask2Former: classes x masks
            cls = o.class_queries_logits.softmax(-1)[..., :-1]
            f = torch.einsum("bqc,bqhw->bchw", cls, o.masks_queries_logits.sigmoid())
            return F.interpolate(f, size=(H, W), mode="bilinear")
        if self.pick == "depth":
            f = o.predicted_depth.unsqueeze(1)
        elif self.pick == "last":
            f = o.last_hidden_state
        elif self.pick == "fmap":
            f = o.feature_maps[-1]
        elif self.pick == "fpn":
            f = o.fpn_hidden_states[-1]
        elif self.pick == "hidden":
            f = o.hidden_states[-1]
        else:
            t = o.last_hidden_state[:, self.skip:]
            f = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], H // self.patch, W // self.patch)
        return F.interpolate(self.head(f), size=(H, W), mode="bilinear")


def _hf_mobilevit(v2: bool = False) -> nn.Module:
    import transformers as tf

    if v2:
        cfg = tf.MobileViTV2Config(image_size=128, width_multiplier=0.5, num_labels=3)
        return _HFOut(tf.MobileViTV2ForSemanticSegmentation(cfg), 0, "logits")
    cfg = tf.MobileViTConfig(image_size=128, hidden_sizes=[64, 80, 96], neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320],
                             num_labels=3)
    return _HFOut(tf.MobileViTForSemanticSegmentation(cfg), 0, "logits")


def _hf_dpt(backbone: str = "vit") -> nn.Module:
    import transformers as tf

    if backbone == "vit":
        cfg = tf.DPTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128,
                           image_size=128, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                           neck_hidden_sizes=[16, 32, 64, 64], fusion_hidden_size=32, num_labels=3,
                           use_auxiliary_head=False)
        return _HFOut(tf.DPTForSemanticSegmentation(cfg), 0, "logits")
    bb = tf.Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128,
                         image_size=112, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                         reshape_hidden_states=False)
    cfg = tf.DPTConfig(backbone_config=bb, neck_hidden_sizes=[16, 32, 64, 64], fusion_hidden_size=32,
                       reassemble_factors=[4, 2, 1, 0.5], head_in_index=-1, is_hybrid=False)
    return _HFOut(tf.DPTForDepthEstimation(cfg), 1, "depth")


def _hf_beit() -> nn.Module:
    import transformers as tf

    cfg = tf.BeitConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128,
                        image_size=128, patch_size=16, use_relative_position_bias=True, out_indices=[0, 1, 2, 3],
                        pool_scales=[1, 2, 3, 6], auxiliary_channels=32, use_auxiliary_head=False, num_labels=3)
    return _HFOut(tf.BeitForSemanticSegmentation(cfg), 0, "logits")


def _hf_convnext(v2: bool = False) -> nn.Module:
    import transformers as tf

    kw = dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1])
    m = tf.ConvNextV2Model(tf.ConvNextV2Config(**kw)) if v2 else tf.ConvNextModel(tf.ConvNextConfig(**kw))
    return _HFOut(m, 128, "last")


def _hf_swin(v2: bool = False) -> nn.Module:
    import transformers as tf

    kw = dict(image_size=224, embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7,
              out_features=["stage4"])
    m = tf.Swinv2Backbone(tf.Swinv2Config(**kw)) if v2 else tf.SwinBackbone(tf.SwinConfig(**kw))
    return _HFOut(m, 256, "fmap")


def _hf_pvt_v2() -> nn.Module:
    import transformers as tf

    return _HFOut(tf.PvtV2Backbone(tf.PvtV2Config(depths=[1, 1, 1, 1], out_features=["stage4"])), 256, "fmap")


def _hf_upernet_swin() -> nn.Module:
    import transformers as tf

    bb = tf.SwinConfig(image_size=224, embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7,
                       out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = tf.UperNetConfig(backbone_config=bb, hidden_size=32, auxiliary_in_channels=64, use_auxiliary_head=False,
                           num_labels=3)
    return _HFOut(tf.UperNetForSemanticSegmentation(cfg), 0, "logits")


def _hf_mask2former() -> nn.Module:
    import transformers as tf

    bb = tf.SwinConfig(image_size=224, embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7,
                       out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = tf.Mask2FormerConfig(backbone_config=bb, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=64, num_queries=8, num_labels=3)
    return _HFOut(tf.Mask2FormerForUniversalSegmentation(cfg), 0, "m2f")


def _convmixer_narrow() -> nn.Module:
    from timm.models.convmixer import ConvMixer

    m = ConvMixer(dim=64, depth=4, kernel_size=7, patch_size=7, act_layer=nn.ReLU)  # convmixer_768_32's kernels
    return Dense(nn.Sequential(m.stem, m.blocks), 64, "plain")


def _tv_maxvit_narrow() -> nn.Module:
    from torchvision.models.maxvit import MaxVit

    m = MaxVit(input_size=(448, 448), stem_channels=16, partition_size=7, block_channels=[16, 32, 64, 128],
               block_layers=[1, 1, 1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=3)
    return Dense(nn.Sequential(m.stem, *m.blocks), 128, "plain")


def _tv_vit_b_16() -> nn.Module:
    import torchvision

    m = torchvision.models.vit_b_16(weights=None, image_size=128)

    def tokens(m: nn.Module, x: torch.Tensor) -> torch.Tensor:  # VisionTransformer.forward up to the encoder
        t = m._process_input(x)
        t = torch.cat([m.class_token.expand(t.shape[0], -1, -1), t], dim=1)
        return m.encoder(t)
    return _Tokens(m, 768, 16, skip=1, call=tokens)


# third sweep: builders for families neither sweep had tried

def _hf3(kind: str) -> nn.Module:
    import transformers as tf

    if kind == "dinov3_vit":  # RoPE on the patch tokens only, 4 register tokens
        cfg = tf.DINOv3ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                 patch_size=16, num_register_tokens=4, image_size=128)
        return _HFOut(tf.DINOv3ViTModel(cfg), 64, "tokens", patch=16, skip=5)
    if kind == "dinov3_convnext":
        cfg = tf.DINOv3ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])
        return _HFOut(tf.DINOv3ConvNextModel(cfg), 64, "hidden")
    if kind == "dinov2_registers":
        cfg = tf.Dinov2WithRegistersConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=128, image_size=128, patch_size=16, num_register_tokens=4)
        return _HFOut(tf.Dinov2WithRegistersModel(cfg), 64, "tokens", patch=16, skip=5)
    if kind == "vitdet":
        cfg = tf.VitDetConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=128,
                              patch_size=16, window_size=4, window_block_indices=[0],
                              use_relative_position_embeddings=True, pretrain_image_size=128)
        return _HFOut(tf.VitDetModel(cfg), 64, "last")
    if kind == "sam2":  # Hiera: windowed attention with query pooling at stage changes, one global block; FPN
        bb = tf.Sam2HieraDetConfig(hidden_size=16, num_attention_heads=1, blocks_per_stage=[1, 2, 2, 1],
                                   global_attention_blocks=[4], window_positional_embedding_background_size=[4, 4],
                                   window_size_per_stage=[8, 4, 4, 2], embed_dim_per_stage=[16, 32, 64, 128],
                                   num_attention_heads_per_stage=[1, 1, 2, 2], image_size=[256, 256])
        cfg = tf.Sam2VisionConfig(backbone_config=bb, backbone_channel_list=[128, 64, 32, 16], fpn_hidden_size=32)
        return _HFOut(tf.Sam2VisionModel(cfg), 32, "fpn")
    if kind == "pvt":  # PVT v1: spatial-reduction attention, a class token in the last stage
        cfg = tf.PvtConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
                           image_size=128)
        return _HFOut(tf.PvtModel(cfg), 64, "tokens", patch=32, skip=1)
    if kind == "swin2sr":
        cfg = tf.Swin2SRConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 1], window_size=8, image_size=64,
                               upscale=2)
        return _HFOut(tf.Swin2SRModel(cfg), 16, "last")
    if kind == "mobilenet_v2_deeplab":
        cfg = tf.MobileNetV2Config(depth_multiplier=0.35, num_labels=3, image_size=128)
        return _HFOut(tf.MobileNetV2ForSemanticSegmentation(cfg), 3, "logits")
    if kind == "data2vec_seg":
        cfg = tf.Data2VecVisionConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                                      intermediate_size=128, image_size=128, patch_size=16, out_indices=[1, 2, 3, 4],
                                      num_labels=3, use_auxiliary_head=False, pool_scales=[1, 2], channels=32)
        return _HFOut(tf.Data2VecVisionForSemanticSegmentation(cfg), 3, "logits")
    if kind == "glpn":
        cfg = tf.GLPNConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
                            decoder_hidden_size=16)
        return _HFOut(tf.GLPNForDepthEstimation(cfg), 1, "depth")
    if kind == "depth_anything":
        bb = tf.Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                             image_size=126, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                             reshape_hidden_states=False)
        cfg = tf.DepthAnythingConfig(backbone_config=bb, neck_hidden_sizes=[16, 32, 48, 64], fusion_hidden_size=16,
                                     head_hidden_size=8, reassemble_hidden_size=32, patch_size=14)
        return _HFOut(tf.DepthAnythingForDepthEstimation(cfg), 1, "depth")
    if kind == "vitmae":  # its random token shuffle: refused (a gather of the tokens)
        cfg = tf.ViTMAEConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                              image_size=128, patch_size=16, mask_ratio=0.0)
        return _HFOut(tf.ViTMAEModel(cfg), 64, "tokens", patch=16, skip=1)
    raise ValueError(kind)


# ----------------------------------------------------------------- the table

S128 = (2, 3, 128, 128)
WIN = (2, 3, 224, 448)     # one 7x7 window of 32-px tokens per tile side at the last stage: align 224
P14 = (2, 3, 112, 224)     # patch 14 models: 8 x 16 patches


@dataclass(frozen=True)
class Entry:
    family: str                       # "timm", "torchvision", "transformers"
    build: Callable[[], nn.Module]
    shape: tuple[int, int, int, int] = S128
    grid: str = "1x2"
    align: int = 32
    expect: str = "PASS"              # V2's verdict: PASS or REFUSED
    note: str = ""


def _t(name: str, **kw) -> Callable[[], nn.Module]:
    return lambda: _feat(name, **kw)


MODELS: dict[str, Entry] = {
    # timm CNNs and hybrids, features_only, 2x3x128x128, align 32
    "resnet18d": Entry("timm", _t("resnet18d")),
    "resnet26d": Entry("timm", _t("resnet26d")),
    "resnext26ts": Entry("timm", _t("resnext26ts")),
    "seresnet18": Entry("timm", _t("seresnet18")),
    "ecaresnet26t": Entry("timm", _t("ecaresnet26t")),
    "resnest14d": Entry("timm", _t("resnest14d")),
    "skresnet18": Entry("timm", _t("skresnet18")),
    "res2net50_14w_8s": Entry("timm", _t("res2net50_14w_8s")),
    "nf_resnet26": Entry("timm", _t("nf_resnet26")),
    "cspresnet50": Entry("timm", _t("cspresnet50")),
    "cspdarknet53": Entry("timm", _t("cspdarknet53")),
    "efficientnet_b0": Entry("timm", _t("efficientnet_b0")),
    "tinynet_e": Entry("timm", _t("tinynet_e")),
    "mixnet_s": Entry("timm", _t("mixnet_s")),
    "lcnet_050": Entry("timm", _t("lcnet_050")),
    "mobilenetv3_small_100": Entry("timm", _t("mobilenetv3_small_100")),
    "mobilenetv4_conv_small": Entry("timm", _t("mobilenetv4_conv_small")),
    "mobilenetv4_hybrid_medium": Entry("timm", _t("mobilenetv4_hybrid_medium")),
    "regnety_002": Entry("timm", _t("regnety_002")),
    "convnext_atto": Entry("timm", _t("convnext_atto")),
    "convnextv2_atto": Entry("timm", _t("convnextv2_atto")),
    "ghostnet_050": Entry("timm", _t("ghostnet_050")),
    "ghostnetv2_100": Entry("timm", _t("ghostnetv2_100")),
    "repvgg_a0": Entry("timm", _t("repvgg_a0")),
    "mobileone_s0": Entry("timm", _t("mobileone_s0")),
    "repvit_m1": Entry("timm", _t("repvit_m1")),
    "hrnet_w18_small": Entry("timm", _t("hrnet_w18_small")),
    "dla34": Entry("timm", _t("dla34")),
    "ese_vovnet19b_dw": Entry("timm", _t("ese_vovnet19b_dw"), note="FP64-PASS checks"),
    "rexnet_100": Entry("timm", _t("rexnet_100"), note="FP64-PASS checks"),
    "densenet121": Entry("timm", _t("densenet121"), note="FP64-PASS checks"),
    "dpn48b": Entry("timm", _t("dpn48b"), note="FP64-PASS checks"),
    "hgnetv2_b0": Entry("timm", _t("hgnetv2_b0"), note="FP64-PASS checks"),
    "vgg11": Entry("timm", _t("vgg11")),
    "xception41": Entry("timm", _t("xception41")),
    "selecsls42b": Entry("timm", _t("selecsls42b")),
    "rdnet_tiny": Entry("timm", _t("rdnet_tiny")),
    "starnet_s1": Entry("timm", _t("starnet_s1")),
    "fastvit_t8": Entry("timm", _t("fastvit_t8")),
    "poolformer_s12": Entry("timm", _t("poolformer_s12")),
    "poolformerv2_s12": Entry("timm", _t("poolformerv2_s12")),
    "inception_next_atto": Entry("timm", _t("inception_next_atto")),
    "mambaout_femto": Entry("timm", lambda: _feat_nhwc("mambaout_femto")),
    "edgenext_xx_small": Entry("timm", _t("edgenext_xx_small")),
    "efficientvit_b0": Entry("timm", _t("efficientvit_b0")),
    "efficientformerv2_s0": Entry("timm", _t("efficientformerv2_s0", img_size=128), note="img_size 128"),
    "lambda_resnet26t": Entry("timm", _t("lambda_resnet26t", img_size=128), note="img_size 128"),
    "coatnet_nano_rw_224": Entry("timm", _t("coatnet_nano_rw_224", img_size=128), note="img_size 128"),
    "maxxvitv2_nano_rw_256": Entry("timm", _t("maxxvitv2_nano_rw_256", img_size=128), note="img_size 128"),
    "maxvit_nano_rw_256": Entry("timm", _t("maxvit_nano_rw_256", img_size=128), shape=(2, 3, 128, 256), align=128,
                                note="img_size 128; tiles of whole 128-px windows"),
    "twins_pcpvt_small": Entry("timm", _t("twins_pcpvt_small")),
    "focalnet_tiny_srf": Entry("timm", _t("focalnet_tiny_srf")),
    "twins_svt_small": Entry("timm", _t("twins_svt_small"), shape=WIN, align=224, note="window-aligned tiles"),
    "davit_tiny": Entry("timm", _t("davit_tiny"), shape=WIN, align=224, note="window-aligned tiles"),
    # timm ViT-likes through forward_intermediates
    "vit_tiny_patch16_224": Entry("timm", lambda: _inter("vit_tiny_patch16_224", dynamic_img_size=True),
                                  note="dynamic_img_size"),
    "deit_tiny_patch16_224": Entry("timm", lambda: _inter("deit_tiny_patch16_224", dynamic_img_size=True),
                                   note="dynamic_img_size"),
    "deit3_small_patch16_224": Entry("timm", lambda: _inter("deit3_small_patch16_224", depth=2,
                                                            dynamic_img_size=True), note="depth 2"),
    "vit_relpos_small_patch16_224": Entry("timm", lambda: _inter("vit_relpos_small_patch16_224", depth=2,
                                                                 img_size=128), note="depth 2, img_size 128"),
    "beit_base_patch16_224": Entry("timm", lambda: _inter("beit_base_patch16_224", depth=2, img_size=128),
                                   note="depth 2, img_size 128"),
    "samvit_base_patch16": Entry("timm", lambda: _inter("samvit_base_patch16", ch=768, depth=2, img_size=128,
                                                        global_attn_indexes=(1,), window_size=4),
                                 note="depth 2, img_size 128, window 4"),
    "xcit_nano_12_p16_224": Entry("timm", lambda: _inter("xcit_nano_12_p16_224")),
    "hiera_tiny_224": Entry("timm", lambda: _inter("hiera_tiny_224", img_size=128), note="img_size 128"),
    "levit_128s": Entry("timm", lambda: _inter("levit_128s", img_size=128), note="img_size 128"),
    "eva02_tiny_patch14_224": Entry("timm", lambda: _inter("eva02_tiny_patch14_224", dynamic_img_size=True),
                                    shape=P14, align=14, note="dynamic_img_size, patch 14"),
    # refused by SPIM in V2's sweep, exact since (index-mapped rel-to-abs logits, Tensor.unfold, __setitem__)
    "botnet26t_256": Entry("timm", _t("botnet26t_256", img_size=128), note="img_size 128"),
    "halonet26t": Entry("timm", _t("halonet26t", img_size=256), shape=(2, 3, 256, 512), align=256,
                        note="img_size 256, halo-block-aligned tiles"),
    "mvitv2_tiny": Entry("timm", _t("mvitv2_tiny", img_size=128), note="img_size 128"),
    # refused by SPIM (expected: a one-line SPIMError naming the op)
    "davit_tiny_at_128": Entry("timm", _t("davit_tiny"), expect="REFUSED",
                               note="too small an input for whole windows per tile"),
    "twins_svt_small_at_128": Entry("timm", _t("twins_svt_small"), expect="REFUSED",
                                    note="too small an input for whole windows per tile"),
    "maxvit_nano_rw_256_at_128": Entry("timm", _t("maxvit_nano_rw_256", img_size=128), expect="REFUSED",
                                       note="img_size 128; tiles not on the 128-px window grid"),
    "halonet26t_at_128": Entry("timm", _t("halonet26t", img_size=128), expect="REFUSED",
                               note="img_size 128; tiles not on the halo-block grid"),
    # torchvision
    "tv_fcn_resnet50": Entry("torchvision", lambda: _tv_seg("fcn_resnet50")),
    "tv_deeplabv3_resnet50": Entry("torchvision", lambda: _tv_seg("deeplabv3_resnet50")),
    "tv_deeplabv3_mobilenet_v3_large": Entry("torchvision", lambda: _tv_seg("deeplabv3_mobilenet_v3_large")),
    "tv_lraspp_mobilenet_v3_large": Entry("torchvision", lambda: _tv_seg("lraspp_mobilenet_v3_large")),
    "tv_regnet_y_400mf": Entry("torchvision", lambda: _tv("regnet_y_400mf",
                                                         lambda m: nn.Sequential(m.stem, m.trunk_output), 440)),
    "tv_efficientnet_v2_s": Entry("torchvision", lambda: _tv("efficientnet_v2_s", lambda m: m.features, 1280)),
    "tv_shufflenet_v2_x0_5": Entry("torchvision", lambda: _tv(
        "shufflenet_v2_x0_5", lambda m: nn.Sequential(m.conv1, m.maxpool, m.stage2, m.stage3, m.stage4, m.conv5),
        1024)),
    "tv_convnext_tiny": Entry("torchvision", lambda: _tv("convnext_tiny", lambda m: m.features, 768)),
    "tv_squeezenet1_1": Entry("torchvision", lambda: _tv("squeezenet1_1", lambda m: m.features, 512)),
    "tv_mnasnet0_5": Entry("torchvision", lambda: _tv("mnasnet0_5", lambda m: m.layers, 1280)),
    "tv_googlenet": Entry("torchvision", _tv_googlenet, note="FP64-PASS checks"),
    "tv_swin_t": Entry("torchvision", lambda: _tv("swin_t", lambda m: m.features, 768, mode="nhwc"), shape=WIN,
                       align=224, note="window-aligned tiles"),
    # transformers (random weights from a small config)
    "hf_sam_vision": Entry("transformers", _hf_sam, note="hidden 64, 2 layers, window 4"),
    "hf_segformer": Entry("transformers", _hf_segformer, note="widths 16-128, depth 1 per stage"),
    "hf_upernet_convnext": Entry("transformers", _hf_upernet, note="ConvNeXt widths 16-128"),
    "hf_dinov2": Entry("transformers", _hf_dinov2, shape=P14, align=14, note="hidden 64, 2 layers, patch 14"),
}

# the same models on other grids: 2x2 puts a tile corner (four-way halos) inside the scene, 2x1 splits rows
for _name in ("resnet26d", "hgnetv2_b0", "mobilenetv4_hybrid_medium", "edgenext_xx_small", "efficientvit_b0",
              "efficientformerv2_s0", "lambda_resnet26t", "coatnet_nano_rw_224", "levit_128s", "xcit_nano_12_p16_224"):
    MODELS[f"{_name}_2x2"] = replace(MODELS[_name], grid="2x2", note=MODELS[_name].note.replace("FP64-PASS checks", ""))
MODELS["maxvit_nano_rw_256_2x2"] = replace(MODELS["maxvit_nano_rw_256"], grid="2x2", shape=(2, 3, 256, 256))
for _name in ("edgenext_xx_small", "efficientvit_b0", "efficientformerv2_s0", "lambda_resnet26t",
              "coatnet_nano_rw_224", "levit_128s", "maxxvitv2_nano_rw_256"):
    MODELS[f"{_name}_2x1"] = replace(MODELS[_name], grid="2x1")

# second sweep (V5): families the first sweep had not tried; input, grid and alignment at the first settings a
# new user would try (window models on whole windows per tile, fixed-size models built for the input)
WIN256 = (2, 3, 256, 512)  # window 8 of 32-px tokens: align 256
MODELS.update({
    "mobilevit_xxs": Entry("timm", _t("mobilevit_xxs"), align=64, note="patch 2 at stride 32: align 64"),
    "mobilevitv2_050": Entry("timm", _t("mobilevitv2_050"), align=64, note="patch 2 at stride 32: align 64"),
    "tiny_vit_5m_224": Entry("timm", _t("tiny_vit_5m_224"), shape=WIN, align=224, note="window-aligned tiles"),
    "pvt_v2_b0": Entry("timm", _t("pvt_v2_b0")),
    "swin_tiny_patch4_window7_224": Entry("timm", lambda: _feat_nhwc("swin_tiny_patch4_window7_224",
                                                                     img_size=(224, 448)),
                                          shape=WIN, align=224, note="img_size 224x448, window-aligned tiles"),
    "swinv2_cr_tiny_ns_224": Entry("timm", _t("swinv2_cr_tiny_ns_224", img_size=(224, 448)), shape=WIN, align=224,
                                   note="img_size 224x448, window-aligned tiles"),
    "swinv2_tiny_window8_256": Entry("timm", lambda: _feat_nhwc("swinv2_tiny_window8_256", img_size=(256, 512)),
                                     shape=WIN256, align=256, note="img_size 256x512, window-aligned tiles"),
    "gcvit_xxtiny": Entry("timm", _t("gcvit_xxtiny", img_size=(224, 448)), shape=WIN, align=224,
                          note="img_size 224x448, window-aligned tiles"),
    "nest_tiny": Entry("timm", _t("nest_tiny", img_size=128), align=64, note="img_size 128, block-aligned tiles"),
    "pit_ti_224": Entry("timm", _t("pit_ti_224", img_size=128), note="img_size 128"),
    "cait_xxs24_224": Entry("timm", lambda: _inter("cait_xxs24_224", img_size=128, depth=2),
                            note="img_size 128, depth 2"),
    "convit_tiny": Entry("timm", lambda: _inter("convit_tiny", img_size=128, depth=2), note="img_size 128, depth 2"),
    "volo_d1_224": Entry("timm", _t("volo_d1_224", img_size=128), note="img_size 128"),
    "mixer_s16_224": Entry("timm", _t("mixer_s16_224", img_size=128), note="img_size 128"),
    "resmlp_12_224": Entry("timm", _t("resmlp_12_224", img_size=128), note="img_size 128"),
    "gmlp_ti16_224": Entry("timm", _t("gmlp_ti16_224", img_size=128), note="img_size 128"),
    "sequencer2d_s": Entry("timm", lambda: _feat_nhwc("sequencer2d_s"), shape=(2, 3, 112, 224), align=14,
                           note="patch 7: input 112x224, align 14"),
    "convmixer_768_32": Entry("timm", _convmixer_narrow, shape=(2, 3, 112, 224), align=7,
                              note="narrowed: dim 64, depth 4; patch 7"),
    "crossvit_tiny_240": Entry("timm", _t("crossvit_tiny_240"), shape=(2, 3, 240, 240), align=48,
                               note="fixed 240 input (second branch resized to 224)"),
    "efficientnetv2_rw_t": Entry("timm", _t("efficientnetv2_rw_t")),
    "fasternet_t0": Entry("timm", _t("fasternet_t0")),
    "nextvit_small": Entry("timm", _t("nextvit_small")),
    "vitamin_small_224": Entry("timm", _t("vitamin_small_224", img_size=128), note="img_size 128"),
    "ghostnetv3_050": Entry("timm", _t("ghostnetv3_050")),
    "shvit_s1": Entry("timm", _t("shvit_s1"), align=64, note="stride 64: align 64"),
    "hf_mobilevit": Entry("transformers", _hf_mobilevit, align=64, note="xx-small-like widths, DeepLabV3 head"),
    "hf_mobilevitv2": Entry("transformers", lambda: _hf_mobilevit(v2=True), align=64,
                            note="width 0.5, DeepLabV3 head"),
    "hf_dpt": Entry("transformers", _hf_dpt, note="ViT hidden 64, 4 layers, segmentation head"),
    "hf_dpt_dinov2": Entry("transformers", lambda: _hf_dpt("dinov2"), shape=P14, align=14,
                           note="DINOv2 hidden 64, 4 layers, depth head"),
    "hf_beit": Entry("transformers", _hf_beit, note="hidden 64, 4 layers, rel. pos. bias, UperNet head"),
    "hf_convnext": Entry("transformers", _hf_convnext, note="widths 16-128"),
    "hf_convnextv2": Entry("transformers", lambda: _hf_convnext(v2=True), note="widths 16-128"),
    "hf_swin": Entry("transformers", _hf_swin, shape=WIN, align=224, note="embed 32, window-aligned tiles"),
    "hf_swinv2": Entry("transformers", lambda: _hf_swin(v2=True), shape=WIN, align=224,
                       note="embed 32, window-aligned tiles"),
    "hf_pvt_v2": Entry("transformers", _hf_pvt_v2, note="b0 widths, depth 1 per stage"),
    "hf_upernet_swin": Entry("transformers", _hf_upernet_swin, shape=WIN, align=224,
                             note="Swin embed 32, window-aligned tiles"),
    "hf_mask2former_swin": Entry("transformers", _hf_mask2former, shape=WIN, align=224,
                                 note="Swin embed 32, 1 encoder / 2 decoder layers, 8 queries"),
    "tv_maxvit_t": Entry("torchvision", _tv_maxvit_narrow, shape=(2, 3, 448, 448), align=224,
                         note="narrowed: channels 16-128, 1 block per stage; input_size 448 (square only)"),
    "tv_swin_v2_t": Entry("torchvision", lambda: _tv("swin_v2_t", lambda m: m.features, 768, mode="nhwc"),
                          shape=WIN256, align=256, note="window 8: window-aligned tiles"),
    "tv_vit_b_16": Entry("torchvision", _tv_vit_b_16, note="image_size 128"),
    "swinv2_cr_tiny_ns_224_window7": Entry("timm", _t("swinv2_cr_tiny_ns_224", img_size=(224, 448), window_size=7),
                                           shape=WIN, align=224,
                                           note="img_size 224x448, window_size 7 (not scaled with the input)"),
})
# third sweep: families neither sweep had tried (input, grid and alignment at the first settings tried)
MODELS.update({
    "hf_dinov3_vit": Entry("transformers", lambda: _hf3("dinov3_vit"), align=16,
                           note="hidden 64, 2 layers, RoPE, 4 registers"),
    "hf_dinov3_convnext": Entry("transformers", lambda: _hf3("dinov3_convnext"), note="widths 16-64"),
    "hf_dinov2_registers": Entry("transformers", lambda: _hf3("dinov2_registers"), align=16,
                                 note="hidden 64, 2 layers, 4 registers"),
    "hf_vitdet": Entry("transformers", lambda: _hf3("vitdet"), align=64,
                       note="hidden 64, window 4 then global, rel. pos."),
    "hf_sam2_hiera": Entry("transformers", lambda: _hf3("sam2"), shape=(2, 3, 256, 512), align=256,
                           note="Hiera widths 16-128, windows 8/4/4/2, one global block, FPN"),
    "hf_pvt": Entry("transformers", lambda: _hf3("pvt"), note="v1, widths 16-64"),
    "hf_swin2sr": Entry("transformers", lambda: _hf3("swin2sr"), shape=(2, 3, 64, 128), align=64,
                        note="embed 16, window 8"),
    "hf_mobilenet_v2_deeplab": Entry("transformers", lambda: _hf3("mobilenet_v2_deeplab"),
                                     note="depth multiplier 0.35"),
    "hf_data2vec_vision_seg": Entry("transformers", lambda: _hf3("data2vec_seg"), note="hidden 64, UperNet head"),
    "hf_glpn": Entry("transformers", lambda: _hf3("glpn"), note="widths 16-64, depth head"),
    "hf_depth_anything": Entry("transformers", lambda: _hf3("depth_anything"), shape=P14, align=14,
                               note="DINOv2 hidden 32, 4 layers"),
    "hf_vitmae": Entry("transformers", lambda: _hf3("vitmae"), align=16, expect="REFUSED",
                       note="mask ratio 0: still a random shuffle of the tokens"),
    "deit_tiny_distilled_patch16_224": Entry("timm", lambda: _inter("deit_tiny_distilled_patch16_224", depth=2,
                                                                    img_size=128), note="img_size 128, depth 2"),
    "vit_small_patch14_reg4_dinov2": Entry("timm", lambda: _inter("vit_small_patch14_reg4_dinov2", depth=2,
                                                                  img_size=128, patch_size=16),
                                           note="img_size 128, patch 16, depth 2"),
    "vit_base_patch16_siglip_224": Entry("timm", lambda: _inter("vit_base_patch16_siglip_224", depth=2,
                                                                embed_dim=64, num_heads=2, img_size=128),
                                         note="attention-pool head; dim 64, depth 2, img_size 128"),
    "tnt_s_patch16_224": Entry("timm", lambda: _inter("tnt_s_patch16_224", depth=2, img_size=128),
                               note="img_size 128, depth 2"),
    "coat_lite_tiny": Entry("timm", _t("coat_lite_tiny"), shape=(2, 3, 224, 224), note="fixed 224 input"),
    "visformer_tiny": Entry("timm", _t("visformer_tiny"), shape=(2, 3, 224, 224), note="fixed 224 input"),
    "efficientformer_l1": Entry("timm", lambda: _inter("efficientformer_l1"), shape=(2, 3, 224, 224),
                                note="fixed 224 input (attention bias of 7 x 7 tokens)"),
    "efficientvit_m0": Entry("timm", _t("efficientvit_m0"), shape=(2, 3, 224, 224), align=112,
                             note="224 input: tiles on the 7 x 7 windows of 16-px tokens"),
    "caformer_s18": Entry("timm", _t("caformer_s18")),
    "tresnet_m": Entry("timm", _t("tresnet_m")),
    "dm_nfnet_f0": Entry("timm", _t("dm_nfnet_f0")),
    "regnetz_b16": Entry("timm", _t("regnetz_b16")),
    "inception_v3": Entry("timm", _t("inception_v3"), shape=(2, 3, 160, 320), note="input 160x320"),
    "gernet_s": Entry("timm", _t("gernet_s")),
    "cs3darknet_s": Entry("timm", _t("cs3darknet_s")),
    "resnetv2_50x1_bit": Entry("timm", _t("resnetv2_50x1_bit")),
    "levit_conv_128s": Entry("timm", _t("levit_conv_128s"), shape=(2, 3, 224, 224),
                             note="fixed 224 input (attention biases)"),
    "fastvit_mci0": Entry("timm", _t("fastvit_mci0")),
})
# refused by SPIM at these settings (verify's one-line reasons in docs/verified_models.md, "Second sweep")
for _name in ("mobilevit_xxs", "swinv2_cr_tiny_ns_224", "gcvit_xxtiny", "nest_tiny", "volo_d1_224", "sequencer2d_s",
              "nextvit_small", "hf_mobilevit", "hf_mask2former_swin", "tv_maxvit_t"):
    MODELS[_name] = replace(MODELS[_name], expect="REFUSED")
for _name in ("mobilevitv2_050", "mixer_s16_224", "gmlp_ti16_224", "crossvit_tiny_240", "shvit_s1", "hf_beit",
              "tv_vit_b_16"):
    MODELS[f"{_name}_2x2"] = replace(MODELS[_name], grid="2x2")



# third sweep, second part (V6): builders and rows of the families left
def _tv_inception_v3() -> nn.Module:
    def feats(m):
        return nn.Sequential(m.Conv2d_1a_3x3, m.Conv2d_2a_3x3, m.Conv2d_2b_3x3, m.maxpool1, m.Conv2d_3b_1x1,
                             m.Conv2d_4a_3x3, m.maxpool2, m.Mixed_5b, m.Mixed_5c, m.Mixed_5d, m.Mixed_6a, m.Mixed_6b,
                             m.Mixed_6c, m.Mixed_6d, m.Mixed_6e, m.Mixed_7a, m.Mixed_7b, m.Mixed_7c)
    return _tv("inception_v3", feats, 2048, aux_logits=False, init_weights=True)


class _Raft(nn.Module):
    """torchvision RAFT-small on (x, 0.5 x + 0.1) -> its last flow -> 1x1 conv to 3 classes."""

    def __init__(self):
        super().__init__()
        import torchvision

        self.m = torchvision.models.optical_flow.raft_small(weights=None)
        self.head = nn.Conv2d(2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.m(x, 0.5 * x + 0.1, num_flow_updates=2)[-1])


class _HieraOut(nn.Module):
    """transformers HieraModel -> its last reshaped (NHWC) hidden state -> 3 classes, plus the pooler's mean."""

    def __init__(self, m: nn.Module, ch: int):
        super().__init__()
        self.m, self.head = m, nn.Conv2d(ch, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.m(pixel_values=x, output_hidden_states=True)
        f = o.reshaped_hidden_states[-1].permute(0, 3, 1, 2)
        return F.interpolate(self.head(f), size=x.shape[-2:], mode="bilinear") + o.pooler_output.mean()


def _hf3b(kind: str) -> nn.Module:
    import transformers as tf

    if kind == "hiera":
        cfg = tf.HieraConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], image_size=[128, 128])
        return _HieraOut(tf.HieraModel(cfg), 128)
    if kind == "textnet":
        cfg = tf.TextNetConfig()
        return _HFOut(tf.TextNetModel(cfg), cfg.hidden_sizes[-1], "last")
    if kind == "eomt":  # ViT + queries appended in the last blocks; masked attention from the predicted masks
        cfg = tf.EomtConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128,
                            image_size=128, patch_size=16, num_queries=8, num_blocks=2, num_labels=3,
                            num_register_tokens=4)
        return _HFOut(tf.EomtForUniversalSegmentation(cfg), 3, "m2f")
    if kind == "samhq":
        cfg = tf.SamHQVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, output_channels=32,
                                   image_size=128, patch_size=16, window_size=4, global_attn_indexes=[1],
                                   mlp_dim=128)
        return _HF(tf.SamHQVisionModel(cfg), 32, "sam")
    raise ValueError(kind)


MODELS.update({
    "tv_mobilenet_v2": Entry("torchvision", lambda: _tv("mobilenet_v2", lambda m: m.features, 1280)),
    "tv_inception_v3": Entry("torchvision", _tv_inception_v3, note="aux_logits off"),
    "tv_wide_resnet50_2": Entry("torchvision", lambda: _tv("wide_resnet50_2", lambda m: nn.Sequential(
        m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4), 2048), note="full width"),
    "tv_raft_small": Entry("torchvision", _Raft, expect="REFUSED",
                           note="2 flow updates; all-pairs correlation volume, grid_sample lookup"),
    "flexivit_small": Entry("timm", lambda: _inter("flexivit_small", depth=2, img_size=128, dynamic_img_size=True),
                            align=16, note="depth 2, img_size 128, dynamic_img_size"),
    "naflexvit_base_patch16_gap": Entry("timm", lambda: _inter("naflexvit_base_patch16_gap", depth=2, embed_dim=64,
                                                               num_heads=2), align=16,
                                        note="dim 64, depth 2; linear patch embedding"),
    "vit_medium_patch16_rope_reg1_gap_256": Entry(
        "timm", lambda: _inter("vit_medium_patch16_rope_reg1_gap_256", depth=2, embed_dim=64, num_heads=2,
                               img_size=128, dynamic_img_size=True), align=16,
        note="RoPE, 1 register, GAP; dim 64, depth 2, img_size 128"),
    "convformer_s18": Entry("timm", _t("convformer_s18")),
    "nextvit_small_256": Entry("timm", _t("nextvit_small"), shape=(2, 3, 256, 512), align=128,
                               note="AvgPool1d groups of 64/16/4 raster tokens inside rows: input 256x512, align 128"),
    "hf_hiera": Entry("transformers", lambda: _hf3b("hiera"), note="embed 16, depth 1 per stage, pooler"),
    "hf_textnet": Entry("transformers", lambda: _hf3b("textnet"), note="default config"),
    "hf_samhq_vision": Entry("transformers", lambda: _hf3b("samhq"), align=64,
                             note="hidden 64, 2 layers, window 4"),
    "hf_eomt": Entry("transformers", lambda: _hf3b("eomt"), align=16, expect="REFUSED",
                     note="hidden 64, 4 layers (2 with 8 queries), 4 registers"),
})


def _factory(name: str, e: Entry) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        m = e.build()
        m.align = e.align  # verify's default --align (and so its default input side)
        return m
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{e.family} {name} ({e.note or 'defaults'}); verify with --grid {e.grid} --align {e.align}."
    return build


# every row is a module-level factory: benchmarks/verify_sweep.py:NAME
for _name, _e in MODELS.items():
    globals()[_name] = _factory(_name, _e)


# ----------------------------------------------------------------- runner

_COUNT_CLASSES = ("PASS", "ROUNDING", "ZERO-REF", "FP64-PASS", "FAIL")


def run_one(name: str, out: Path, timeout_s: int) -> dict:
    """Run ``rest-ds verify --train`` on one row in a subprocess; return its result row."""
    e = MODELS[name]
    js = out / "json" / f"{name}.json"
    log = out / "logs" / f"{name}.log"
    js.unlink(missing_ok=True)
    shape = ",".join(map(str, e.shape))
    cmd = [str(REPO / ".venv" / "bin" / "rest-ds"), "verify", f"{HERE}:{name}", "--train", "--input-shape", shape,
           "--grid", e.grid, "--align", str(e.align), "--json", str(js), "--timeout", str(timeout_s)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s + 60)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as ex:
        rc, text = None, f"{ex.stdout or ''}{ex.stderr or ''}\ntimeout after {timeout_s + 60} s"
    secs = time.monotonic() - t0
    log.write_text(text)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if re.match(r"^(PASS|FAIL|REFUSED)\b|^error\b", ln)),
                lines[-1] if lines else "")
    row = {"name": name, "family": e.family, "shape": shape, "grid": e.grid, "align": e.align, "note": e.note,
           "expect": e.expect, "rc": rc, "seconds": round(secs, 1), "message": last.strip()}
    counts = {c: 0 for c in _COUNT_CLASSES}
    if js.exists():
        data = json.loads(js.read_text())
        checks = data.get("checks", {})
        for c in checks.values():
            counts[c["class"]] = counts.get(c["class"], 0) + 1
        judged = [c["rel_error"] for c in checks.values() if c["class"] in ("PASS", "ROUNDING", "FAIL")
                  and c["rel_error"] is not None]
        row["max_error"] = max(judged) if judged else None
        fp64 = [c["float64_rel_error"] for c in checks.values() if c["class"] == "FP64-PASS"]
        row["max_fp64_error"] = max(fp64) if fp64 else None
        row["verify_seconds"] = data.get("seconds")
    row["checks"] = sum(counts.values())
    row["counts"] = counts
    row["verdict"] = {0: "PASS", 1: "FAIL"}.get(rc, "REFUSED" if last.startswith("REFUSED") or
                                                  "SPIMError" in last else "ERROR")
    return row


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1e}"


def _counts(r: dict) -> str:
    return ", ".join(f"{n} {c}" for c, n in r["counts"].items() if n) or "-"


def line(r: dict) -> str:
    flag = "" if r["verdict"] == r["expect"] else f"  CHANGED (expected {r['expect']})"
    s = f"{r['name']:<32} {r['verdict']:<7} {r['checks']:>5} checks: {_counts(r)}; max {_fmt(r.get('max_error'))}"
    if r.get("max_fp64_error") is not None:
        s += f" (FP64-PASS: float64 max {_fmt(r['max_fp64_error'])})"
    s += f" [{r['seconds']:.0f} s]{flag}"
    if r["verdict"] not in ("PASS", "FAIL"):
        s += f"\n    {r['message'][:300]}"
    return s


def markdown(rows: list[dict], commit: str) -> str:
    """The rows as a markdown table, then the refusals and errors with their one-line messages."""
    out = [f"Measured at commit {commit}: `rest-ds verify benchmarks/verify_sweep.py:NAME --train "
           "--input-shape S --grid G --align A` (float32, CPU gloo ranks), S, G, A per row.", "",
           "| model | family | input; grid; align | settings | verdict | checks by class | max error |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        err = _fmt(r.get("max_error"))
        if r.get("max_fp64_error") is not None:
            err += f" (FP64-PASS: {_fmt(r['max_fp64_error'])} in float64)"
        if r["verdict"] in ("REFUSED", "ERROR"):
            err = "see below"
        out.append(f"| `{r['name']}` | {r['family']} | {r['shape']}; {r['grid']}; {r['align']} | {r['note'] or '-'} "
                   f"| {r['verdict']} | {_counts(r)} | {err} |")
    bad = [r for r in rows if r["verdict"] in ("REFUSED", "ERROR")]
    if bad:
        out += ["", "Refused or errored:", ""]
        out += [f"- `{r['name']}` ({r['note'] or 'defaults'}): {r['message']}" for r in bad]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", metavar="NAME,...", help="run only these rows")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "verify_sweep", metavar="DIR",
                    help="where verify_sweep.md, verify_sweep.json, json/ and logs/ go (default runs/verify_sweep)")
    ap.add_argument("--timeout", type=int, default=300, metavar="SECONDS", help="per model (default 300)")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    a = ap.parse_args()
    names = [n for n in a.only.split(",") if n] or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"--only: unknown model(s) {', '.join(unknown)} (--list shows the rows)")
    if a.list:
        for n in names:
            e = MODELS[n]
            print(f"{n:<32} {e.family:<12} {','.join(map(str, e.shape))} {e.grid} align {e.align} "
                  f"expect {e.expect} {e.note}")
        return 0
    (a.out / "json").mkdir(parents=True, exist_ok=True)
    (a.out / "logs").mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--short", "--untracked-files=no", "rest_ds"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        commit += f" (+{len(dirty.splitlines())} uncommitted rest_ds file(s))"
    print(f"verify sweep at {commit}: {len(names)} model(s), one at a time", flush=True)
    rows = []
    for n in names:
        rows.append(run_one(n, a.out, a.timeout))
        print(line(rows[-1]), flush=True)
        (a.out / "verify_sweep.json").write_text(json.dumps({"commit": commit, "rows": rows}, indent=2) + "\n")
        (a.out / "verify_sweep.md").write_text(markdown(rows, commit))
    changed = [r["name"] for r in rows if r["verdict"] != r["expect"]]
    by = {v: sum(1 for r in rows if r["verdict"] == v) for v in ("PASS", "FAIL", "REFUSED", "ERROR")}
    print(f"{len(rows)} models: " + ", ".join(f"{n} {v}" for v, n in by.items() if n)
          + (f"; CHANGED from the expected verdict: {', '.join(changed)}" if changed else "; all as expected")
          + f"; table in {a.out / 'verify_sweep.md'}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
