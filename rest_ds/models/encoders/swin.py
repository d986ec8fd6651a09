"""Swin Transformers as feature encoders: timm ``swin_*`` / ``swinv2_*`` and transformers' Swin.

Shifted-window attention runs exactly under SPIM: the cyclic ``torch.roll``
over the whole scene is a sharded op (rest_ds/spim/ops/roll.py), the shift mask
is built by the model for the *global* (padded) feature size and each rank
attends with its own windows' slice of it, windows are padded to whole windows
at the scene's bottom/right only, and patch merging (timm v1's reshape,
swinv2 / transformers' ``x[:, 0::2, 1::2]`` slicing) keeps each 2 x 2 block
on one rank. Relative-position bias (a table, or swinv2's continuous MLP) is
per window and replicated.

Alignment: stage ``i`` has total stride ``patch * 2**i`` and windows of
``w_i`` tokens, so the window grid of stage ``i`` lies on multiples of
``patch * 2**i * w_i`` input pixels; ``align`` is the lcm over the stages, i.e.
``patch * window * 2**(stages-1)`` for a constant window (224 for Swin-T:
4 x 7 x 8). A scene of any multiple of the patch size runs (the last tile
takes the remainder; each stage is padded to whole windows at the scene's
bottom/right; timm drops a partial last patch, transformers pads it).

Features: the output of each chosen stage, NCHW, finest first.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import nn

from ..registry import register_encoder
from .bands import Band, adapt_state_dict
from .common import StateDict, load_strict, read_state_dict, to_hw

_TIMM_FAMILIES = ("timm.models.swin_transformer", "timm.models.swin_transformer_v2")


def swin_align(patch: int, windows: Sequence[tuple[int, int]]) -> int:
    """Tile alignment of a Swin with patch size ``patch`` and window
    ``windows[i]`` (rows, cols) at stage ``i`` (stride ``patch * 2**i``): the lcm
    of every stage's window-grid pitch in input pixels."""
    return math.lcm(*(patch * 2 ** i * w for i, win in enumerate(windows) for w in win))


class TimmSwinEncoder(nn.Module):
    """timm ``swin_*`` (v1) or ``swinv2_*`` with ``features_only=True``, for
    scenes of any multiple of the patch size: built with ``strict_img_size=False``
    (shift masks computed per forward for the feature size) and
    ``always_partition=True``: every stage keeps the architecture's window and
    shift whatever the scene size, as mmseg's and transformers' Swin backbones
    do (timm's default shrinks the window of a stage whose map at ``img_size``
    is not larger than it and drops that stage's shift, e.g. Swin-T's last
    stage at 224). Returns the stages ``out_indices`` as NCHW maps.

    ``checkpoint``: a state dict (or file) of the full timm model, loaded by
    timm's own filter (relative-position index and masks dropped); its patch
    embedding is adapted to ``bands`` / ``in_chans`` first (bands.py)."""

    def __init__(self, model_name: str, out_indices: Sequence[int] | None = None, in_chans: int | None = None,
                 img_size: int | Sequence[int] | None = None, checkpoint: str | Path | StateDict | None = None,
                 bands: Sequence[Band] | None = None, pretrained_bands: Sequence[Band] | None = None,
                 band_rule: str = "auto", grad_checkpointing: bool = False, **timm_kwargs):
        super().__init__()
        family = timm.models.model_entrypoint(model_name).__module__
        if family not in _TIMM_FAMILIES:
            raise ValueError(f"timm_swin: '{model_name}' (from {family}) is not a timm swin_* / swinv2_* model")
        if in_chans is None:
            in_chans = len(bands) if bands is not None else 3
        timm_kwargs.setdefault("always_partition", True)
        kwargs = dict(features_only=True, in_chans=in_chans, strict_img_size=False, **timm_kwargs)
        if img_size is not None:
            kwargs["img_size"] = to_hw(img_size)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if checkpoint is not None:
            sd = adapt_state_dict(read_state_dict(checkpoint), "patch_embed.proj.weight", pretrained_bands, bands,
                                  in_chans, band_rule, missing_ok=True)
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd))
        else:
            kwargs["pretrained"] = False
        self.model = timm.create_model(model_name, **kwargs)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        info = self.model.feature_info
        self.out_channels = list(info.channels())
        self.strides = list(info.reduction())
        patch = self.model.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ValueError(f"timm_swin: non-square patches {patch} are not supported")
        windows = []
        for name, stage in self.model.named_children():
            if name.startswith("layers_"):
                windows.append(tuple(stage.blocks[0].window_size))
        self.align = swin_align(patch[0], windows)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [f.permute(0, 3, 1, 2) for f in self.model(x)]  # timm's Swin features are NHWC


@register_encoder("timm_swin")
def timm_swin(model_name: str = "swin_tiny_patch4_window7_224", **kwargs) -> TimmSwinEncoder:
    """Any timm ``swin_*`` / ``swinv2_*`` by name; see :class:`TimmSwinEncoder`."""
    return TimmSwinEncoder(model_name, **kwargs)


class HFSwinEncoder(nn.Module):
    """transformers' ``SwinBackbone`` (an unmodified ``SwinModel`` plus a
    LayerNorm per output stage, the backbone of transformers' UperNet) built
    from a ``SwinConfig``: ``img_size`` only sets the config's reference size,
    the model runs on any scene (it pads to whole patches and windows itself
    and builds the shift mask per forward). Windows are never shrunk
    (``always_partition``), so ``align = patch * window * 2**(stages-1)``.
    ``out_indices``: stages 0..3 to return (NCHW, finest first).
    ``checkpoint``: a ``SwinBackbone`` state dict, loaded strictly after its
    patch embedding is adapted to the bands (the unused final LayerNorm of
    ``SwinModel`` is dropped)."""

    def __init__(self, img_size: int | Sequence[int] = 224, out_indices: Sequence[int] | None = None,
                 in_chans: int | None = None, checkpoint: str | Path | StateDict | None = None,
                 bands: Sequence[Band] | None = None, pretrained_bands: Sequence[Band] | None = None,
                 band_rule: str = "auto", attn_implementation: str = "sdpa", grad_checkpointing: bool = False,
                 **config_kwargs):
        super().__init__()
        from transformers import SwinConfig  # imported here: transformers is slow to import
        from transformers.models.swin.modeling_swin import SwinBackbone

        if in_chans is None:
            in_chans = len(bands) if bands is not None else 3
        if "image_size" in config_kwargs or "out_features" in config_kwargs:
            raise ValueError("hf_swin: give img_size and out_indices, not image_size / out_features")
        config_kwargs.setdefault("initializer_range", 0.02)
        depths = config_kwargs.get("depths", SwinConfig().depths)
        out_indices = list(range(len(depths))) if out_indices is None else [int(i) for i in out_indices]
        if not out_indices or any(not 0 <= i < len(depths) for i in out_indices):
            raise ValueError(f"hf_swin: out_indices {out_indices} must name stages 0..{len(depths) - 1}")
        cfg = SwinConfig(image_size=to_hw(img_size)[0], num_channels=in_chans,
                         out_features=[f"stage{i + 1}" for i in sorted(set(out_indices))], **config_kwargs)
        cfg._attn_implementation = attn_implementation
        self.swin = SwinBackbone(cfg)
        # SwinModel's final LayerNorm feeds only its pooled output, which the backbone ignores (its
        # per-stage norms make the features): drop it, so that no parameter is left without a gradient
        self.swin.swin.layernorm = nn.Identity()
        if grad_checkpointing:
            self.set_grad_checkpointing(True)
        if checkpoint is not None:
            sd = adapt_state_dict(read_state_dict(checkpoint), "swin.embeddings.patch_embeddings.projection.weight",
                                  pretrained_bands, bands, in_chans, band_rule, missing_ok=True)
            sd = {k: v for k, v in sd.items() if not k.startswith("swin.layernorm.")}
            load_strict(self.swin, sd, "hf_swin SwinBackbone")
        p = cfg.patch_size
        self.out_channels = list(self.swin.channels)
        self.strides = [p * 2 ** i for i in sorted(set(out_indices))]
        self.align = swin_align(p, [(cfg.window_size, cfg.window_size)] * len(depths))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in backward (non-reentrant checkpointing: the
        variant SPIM replays exactly; ``train.activation_checkpointing`` calls this)."""
        if enable:
            self.swin.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.swin.activation_checkpointing_disable()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.swin(x).feature_maps)


@register_encoder("hf_swin")
def hf_swin(**kwargs) -> HFSwinEncoder:
    """transformers' Swin (``SwinBackbone``) from ``SwinConfig`` fields; see :class:`HFSwinEncoder`."""
    return HFSwinEncoder(**kwargs)


__all__ = ["TimmSwinEncoder", "timm_swin", "HFSwinEncoder", "hf_swin", "swin_align"]
