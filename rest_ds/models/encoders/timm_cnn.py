"""timm CNN backbones (``features_only=True``) as registered encoders."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import nn

from ..registry import register_encoder
from .bands import Band
from .common import StateDict, adapt_bands, describe_source, load_report, read_state_dict


class TimmCNNEncoder(nn.Module):
    """timm ``create_model(model_name, features_only=True)``: a list of NCHW maps,
    finest first, at ``strides`` (``feature_info.reduction()``).

    ``checkpoint`` (path or state dict of the *full* model, e.g. an ImageNet
    ``.pth`` / ``.safetensors``) is loaded strictly by timm (classifier dropped);
    its first conv is adapted to ``bands`` / ``in_chans`` first (bands.py).
    ``align`` = lcm of the strides (tile borders on the deepest stride grid)."""

    def __init__(self, model_name: str, out_indices: Sequence[int] | None = None, in_chans: int | None = None,
                 checkpoint: str | Path | StateDict | None = None, bands: Sequence[Band] | None = None,
                 pretrained_bands: Sequence[Band] | None = None, band_rule: str = "auto",
                 grad_checkpointing: bool = False, **timm_kwargs):
        super().__init__()
        if in_chans is None:
            in_chans = len(bands) if bands is not None else 3
        kwargs = dict(features_only=True, in_chans=in_chans, **timm_kwargs)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        bands_note, sd = "bands unchanged", None
        if checkpoint is not None:
            sd = read_state_dict(checkpoint)
            cfg = timm.models.get_pretrained_cfg(model_name)
            first = getattr(cfg, "first_conv", None)
            if isinstance(first, str):
                sd, bands_note = adapt_bands(sd, first + ".weight", pretrained_bands, bands, in_chans, band_rule)
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd))
        else:
            kwargs["pretrained"] = False
        self.model = timm.create_model(model_name, **kwargs)
        if sd is not None:  # timm loaded it (strictly, its classifier dropped)
            own = self.model.state_dict()
            self.load_report = load_report(f"timm_cnn {model_name}", describe_source(checkpoint),
                                           {k: v for k, v in sd.items() if k in own}, self.model,
                                           dropped=[k for k in sd if k not in own], bands=bands_note)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        info = self.model.feature_info
        self.out_channels = list(info.channels())
        self.strides = list(info.reduction())
        self.align = math.lcm(*self.strides)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))


@register_encoder("timm_cnn")
def timm_cnn(model_name: str = "resnet50", **kwargs) -> TimmCNNEncoder:
    """Any timm CNN with ``features_only`` support, by name; see :class:`TimmCNNEncoder`."""
    return TimmCNNEncoder(model_name, **kwargs)


__all__ = ["TimmCNNEncoder", "timm_cnn"]
