"""SegFormer / PVT-v2 encoders and SegFormer's all-MLP head (single process).

Their exactness under SPIM is tested in test_spim_sr_attention.py."""
from __future__ import annotations

import pytest
import torch

from rest_ds.models import build_decoder, build_encoder, build_segmentor
from rest_ds.models.config import import_encoders
from rest_ds.models.encoders.hf_segformer import sr_align

import_encoders()
TINY = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2])
PVT_TINY = dict(embed_dims=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], mlp_ratios=[2, 2, 2, 2])


def test_segformer_mlp_head_is_transformers_decode_head():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    cfg = SegformerConfig(decoder_hidden_size=16, num_labels=5, classifier_dropout_prob=0.0, **TINY)
    torch.manual_seed(0)
    hf = SegformerForSemanticSegmentation(cfg).double().eval()
    head = build_decoder("segformer_mlp", [8, 16, 24, 32], [4, 8, 16, 32], 5, channels=16, dropout=0.0).double()
    sd = {k[len("decode_head."):]: v for k, v in hf.state_dict().items() if k.startswith("decode_head.")}
    head.load_state_dict(sd, strict=True)  # the same parameter names
    with torch.no_grad():
        head.batch_norm.running_mean.normal_()  # eval mode: the running statistics matter
        hf.decode_head.batch_norm.running_mean.copy_(head.batch_norm.running_mean)
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        feats = hf.segformer(x, output_hidden_states=True).hidden_states
        assert torch.equal(head.eval()(list(feats)), hf.decode_head(feats))


@pytest.mark.parametrize("name,kwargs,sr", [
    ("hf_segformer", dict(variant=None, **TINY), [8, 4, 2, 1]),
    ("timm_pvt_v2", dict(model_name="pvt_v2_b0", **PVT_TINY), [8, 4, 2, 1]),
    ("timm_pvt_v2", dict(model_name="pvt_v2_b2_li", **PVT_TINY), [1, 1, 1, 1]),  # 7x7 adaptive pool
])
def test_encoder_contract_six_bands(name, kwargs, sr):
    enc = build_encoder(name, in_chans=6, **kwargs)
    feats = enc(torch.randn(1, 6, 64, 96))
    assert enc.strides == [4, 8, 16, 32] and enc.out_channels == [8, 16, 24, 32] and enc.align == 32
    assert [tuple(f.shape) for f in feats] == [(1, c, 64 // s, 96 // s) for c, s in zip(enc.out_channels, enc.strides)]
    if name == "timm_pvt_v2":
        assert enc.sr_ratios == sr


def test_sr_alignment_counts_the_reduction_convs():
    assert sr_align([4, 8, 16, 32], [8, 4, 2, 1]) == 32
    assert sr_align([4, 8, 16, 32], [16, 4, 2, 1]) == 64  # stage 1: 4 x 16
    enc = build_encoder("hf_segformer", variant=None, in_chans=3, sr_ratios=[8, 8, 2, 1], **TINY)
    assert enc.align == 64  # stage 2: 8 x 8


def test_segformer_checkpoint_bands_adapted():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(1)
    hf = SegformerForSemanticSegmentation(SegformerConfig(**TINY))
    sd = hf.state_dict()  # 'segformer.' prefix and a decode head, RGB first conv
    enc = build_encoder("hf_segformer", variant=None, in_chans=6, checkpoint=sd, **TINY)
    w = enc.model.stages[0].patch_embeddings.proj.weight
    w3 = sd["segformer.stages.0.patch_embeddings.proj.weight"]
    assert w.shape[1] == 6 and torch.allclose(w, torch.cat([w3, w3], 1) / 2)  # timm's 'tile' rule, k/c = 1/2
    assert torch.equal(enc.model.stages[3].layer_norm.weight, sd["segformer.stages.3.layer_norm.weight"])


def test_segformer_b0_config():
    model = build_segmentor("configs/models/segformer.yaml")
    enc = model.encoder
    assert enc.out_channels == [32, 64, 160, 256] and list(enc.model.config.sr_ratios) == [8, 4, 2, 1]
    assert model.align == 32
    assert 3.5e6 < sum(p.numel() for p in model.parameters()) < 3.9e6  # SegFormer-B0: 3.7 M
    assert tuple(model.eval()(torch.randn(1, 3, 64, 96)).shape) == (1, 7, 64, 96)
