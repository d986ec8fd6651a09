"""The ``transformers`` SegFormer encoder (Mix Transformer, ``SegformerModel``).

Four stages, each an overlapping patch embedding (a strided conv: k7 s4 p3,
then k3 s2 p1) followed by blocks of spatial-reduction attention (queries on
every token, keys/values on the tokens reduced by a ``sr_i`` x ``sr_i`` conv
of stride ``sr_i``) and a Mix-FFN (a depthwise 3x3 conv on the token grid).
Features: every stage's output, NCHW at strides 4, 8, 16, 32.

Alignment under SPIM: stage i's reduction conv has stride ``sr_i`` on a map of
stride ``s_i``, so tile borders must lie on multiples of ``s_i * sr_i`` input
pixels (MiT: 4x8 = 8x4 = 16x2 = 32x1 = 32), and on the deepest stride 32:
``align`` = lcm of both.

Checkpoints: a ``SegformerModel`` or ``SegformerForSemanticSegmentation``
state dict of this transformers version (a ``segformer.`` prefix is stripped,
``decode_head.*`` dropped), loaded strictly; the first patch embedding is
adapted to ``bands`` / ``in_chans`` (bands.py, RGB checkpoints by default).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..registry import register_encoder
from .bands import RGB, Band, adapt_state_dict
from .common import StateDict, load_strict, read_state_dict

# hidden_sizes, depths, num_attention_heads of the released MiT encoders (SegFormer B0-B5);
# sr_ratios [8, 4, 2, 1], mlp_ratios 4, patch sizes [7, 3, 3, 3], strides [4, 2, 2, 2] for all.
MIT_VARIANTS = {
    "mit_b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], num_attention_heads=[1, 2, 5, 8]),
    "mit_b1": dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 2, 2], num_attention_heads=[1, 2, 5, 8]),
    "mit_b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], num_attention_heads=[1, 2, 5, 8]),
    "mit_b3": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 18, 3], num_attention_heads=[1, 2, 5, 8]),
    "mit_b4": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 8, 27, 3], num_attention_heads=[1, 2, 5, 8]),
    "mit_b5": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 6, 40, 3], num_attention_heads=[1, 2, 5, 8]),
}
FIRST_CONV = "stages.0.patch_embeddings.proj.weight"


def sr_align(strides: Sequence[int], sr_ratios: Sequence[int]) -> int:
    """Tile alignment in input pixels of a spatial-reduction transformer: lcm of
    the stage strides ``s_i`` and of ``s_i * sr_i`` (stage i's reduction conv
    has stride ``sr_i`` on a stride-``s_i`` map)."""
    return math.lcm(*strides, *(s * r for s, r in zip(strides, sr_ratios) if r > 1))


class HFSegformerEncoder(nn.Module):
    """``SegformerModel`` (unmodified transformers module, in ``.model``)
    returning every stage's output (NCHW, finest first).

    ``variant``: a key of :data:`MIT_VARIANTS` (or None: transformers' defaults,
    = MiT-b0); ``config_kwargs`` override any ``SegformerConfig`` field.
    ``drop_path_rate`` 0.1 as SegFormer's training recipe; dropout 0.
    ``attn_implementation``: ``"sdpa"`` or ``"eager"`` (both exact under SPIM)."""

    def __init__(self, variant: str | None = "mit_b0", in_chans: int | None = None,
                 checkpoint: str | Path | StateDict | None = None, bands: Sequence[Band] | None = None,
                 pretrained_bands: Sequence[Band] | None = RGB, band_rule: str = "auto",
                 drop_path_rate: float = 0.1, attn_implementation: str = "sdpa", grad_checkpointing: bool = False,
                 **config_kwargs):
        super().__init__()
        from transformers import SegformerConfig, SegformerModel  # imported here: transformers is slow to import

        if variant is not None and variant not in MIT_VARIANTS:
            raise ValueError(f"unknown SegFormer variant {variant!r}; known: {', '.join(MIT_VARIANTS)}")
        if in_chans is None:
            in_chans = len(bands) if bands is not None else 3
        kw = dict(MIT_VARIANTS[variant]) if variant else {}
        kw.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
        kw.update(config_kwargs)
        cfg = SegformerConfig(num_channels=int(in_chans), drop_path_rate=drop_path_rate,
                              attn_implementation=attn_implementation, **kw)
        if not cfg.reshape_last_stage:
            raise ValueError("HFSegformerEncoder needs reshape_last_stage=True (NCHW maps from every stage)")
        self.model = SegformerModel(cfg)
        if checkpoint is not None:
            sd = read_state_dict(checkpoint)
            sd = {k[len("segformer."):] if k.startswith("segformer.") else k: v for k, v in sd.items()
                  if not k.startswith("decode_head.")}
            if pretrained_bands is not None and FIRST_CONV in sd and len(pretrained_bands) != sd[FIRST_CONV].shape[1]:
                pretrained_bands = None  # a checkpoint on other bands than RGB: adapt by count only
            sd = adapt_state_dict(sd, FIRST_CONV, pretrained_bands, bands, int(in_chans), band_rule)
            load_strict(self.model, sd, "SegFormer encoder")
        if grad_checkpointing:
            self.set_grad_checkpointing(True)
        self.out_channels = list(cfg.hidden_sizes)
        self.strides = list(_total_strides(cfg.strides))
        self.align = sr_align(self.strides, cfg.sr_ratios)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in backward (non-reentrant checkpointing: the
        variant SPIM replays exactly)."""
        if enable:
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.model.activation_checkpointing_disable()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x, output_hidden_states=True).hidden_states)


def _total_strides(strides: Sequence[int]) -> list[int]:
    """Total stride of each stage from the per-stage strides ([4, 2, 2, 2] -> [4, 8, 16, 32])."""
    out, s = [], 1
    for k in strides:
        s *= int(k)
        out.append(s)
    return out


@register_encoder("hf_segformer")
def hf_segformer(variant: str | None = "mit_b0", **kwargs) -> HFSegformerEncoder:
    """transformers' SegFormer (MiT) encoder; see :class:`HFSegformerEncoder`."""
    return HFSegformerEncoder(variant, **kwargs)


__all__ = ["MIT_VARIANTS", "HFSegformerEncoder", "hf_segformer", "sr_align"]
