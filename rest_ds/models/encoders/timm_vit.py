"""timm Vision Transformers (``vit_*``, MAE / DeiT / augreg ViTs, ``samvit_*``) as feature encoders.

The timm model is built for the *scene* size (``img_size``): its absolute
position embedding covers the global token grid, and a checkpoint trained at
another size is resampled once, at load time (timm's
``resample_abs_pos_embed``, bicubic, for ``VisionTransformer``; for
``VisionTransformerSAM`` the ``(1, h, w, C)`` table is resampled bicubically and
the global blocks' decomposed relative-position tables linearly, as SAM's own
``get_rel_pos`` would at forward time). Under SPIM each rank then adds its tile
of the table.

Any input size works at run time (a rotated scene, another scene, inference on
a larger one): ``VisionTransformer`` is built with ``dynamic_img_size`` and
every forward resamples the table, kept at ``img_size``'s grid, to the input's
*global* token grid (bicubic, antialiased: timm's rule, but in the parameter's
dtype); ``samvit_*`` does the same (its global blocks interpolate their
relative-position tables themselves). Under SPIM the resampling runs once on the
replicated parameter and each rank adds its tile of the result. Features are the outputs of chosen blocks
(``forward_intermediates``), NCHW, all at stride = patch size.
"""
from __future__ import annotations

import types
from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import nn
from timm.models import vision_transformer as _vit
from timm.models import vision_transformer_sam as _samvit

from ..registry import register_encoder
from .bands import Band
from .common import (StateDict, adapt_bands, check_divisible, describe_source, load_report, load_strict,
                     normalize_indices, read_state_dict, resample_pos_nhwc, resize_pos_nhwc, resize_rel_pos, to_hw)

_CHECKPOINT_EXTRAS = ("head.", "fc_norm.", "decoder", "mask_token", "pre_logits.")


class TimmViTEncoder(nn.Module):
    """A timm ``VisionTransformer`` or ``VisionTransformerSAM`` returning the
    outputs of blocks ``indices`` as NCHW maps (``B x C x H/p x W/p``).

    ``norm=True`` applies the final norm to every feature (for ``samvit_*``: the
    conv neck, which changes the width to ``neck_chans``). Blocks after the last
    chosen one, and the classifier head, are dropped (no unused parameters).
    ``align`` = patch size, or patch x window for windowed ``samvit_*`` blocks
    (tile borders on the window grid keep every window on one rank)."""

    def __init__(self, model_name: str, img_size: int | Sequence[int], indices: int | Sequence[int] | None = None,
                 in_chans: int | None = None, checkpoint: str | Path | StateDict | None = None,
                 bands: Sequence[Band] | None = None, pretrained_bands: Sequence[Band] | None = None,
                 band_rule: str = "auto", norm: bool = False, grad_checkpointing: bool = False, **timm_kwargs):
        super().__init__()
        img_size = to_hw(img_size)
        if in_chans is None:
            in_chans = len(bands) if bands is not None else 3
        family = timm.models.model_entrypoint(model_name).__module__
        if family not in (_vit.__name__, _samvit.__name__):
            raise ValueError(f"timm_vit: '{model_name}' (from {family}) is not a timm VisionTransformer or "
                             "VisionTransformerSAM (use the 'timm_cnn' encoder for CNNs)")
        if family == _vit.__name__:
            # the scene's size at run time: any input size (NHWC patch embedding, no size check)
            timm_kwargs.setdefault("dynamic_img_size", True)
        self.model = timm.create_model(model_name, pretrained=False, img_size=img_size, in_chans=in_chans,
                                       num_classes=0, global_pool="", **timm_kwargs)
        m = self.model
        if getattr(m, "dynamic_img_size", False):
            # pos_embed stays at img_size's grid; each forward resamples it to the input's global token grid
            # (_dynamic_pos_embed: timm's rule, in the parameter's own dtype)
            m._pos_embed = types.MethodType(_dynamic_pos_embed, m)
        ph, pw = m.patch_embed.patch_size
        if ph != pw:
            raise ValueError(f"timm_vit: non-square patches {ph}x{pw} are not supported")
        check_divisible(img_size, ph, f"timm_vit '{model_name}'")
        self.is_sam = isinstance(m, _samvit.VisionTransformerSAM)
        self.in_chans = in_chans
        if checkpoint is not None:
            self.load_checkpoint(checkpoint, pretrained_bands=pretrained_bands, bands=bands, band_rule=band_rule)
        depth = len(m.blocks)
        self.indices = normalize_indices(indices, depth, f"timm_vit '{model_name}'")
        self.norm = bool(norm)
        m.prune_intermediate_layers(self.indices, prune_norm=not self.norm, prune_head=True)
        m.set_grad_checkpointing(grad_checkpointing)
        width = m.embed_dim
        if self.is_sam and self.norm and not isinstance(m.neck, nn.Identity):
            width = m.num_features
        self.out_channels = [width] * len(self.indices)
        self.strides = [ph] * len(self.indices)
        windows = [getattr(b, "window_size", 0) for b in m.blocks] if self.is_sam else []
        window = max(windows, default=0)
        self.align = ph * window if window else ph

    def load_checkpoint(self, checkpoint: str | Path | StateDict, pretrained_bands: Sequence[Band] | None = None,
                        bands: Sequence[Band] | None = None, band_rule: str = "auto") -> None:
        """Load a timm / original-format checkpoint strictly (classifier, MAE decoder
        and mask token are dropped), resampling position tables to this scene and
        adapting the patch embedding's bands (bands.py)."""
        m = self.model
        raw = read_state_dict(checkpoint)
        sd = raw
        if any(k.startswith("decoder") for k in sd):
            # an MAE pretraining checkpoint: drop its decoder (and mask token, which timm's filter would
            # otherwise take for a DINOv2 checkpoint)
            sd = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
        if self.is_sam:
            sd = _samvit.checkpoint_filter_fn(sd, m)  # original SAM 'image_encoder.' layout -> timm
            own = m.state_dict()
            if "pos_embed" in sd and m.pos_embed is not None:
                sd["pos_embed"] = resize_pos_nhwc(sd["pos_embed"], tuple(m.pos_embed.shape[1:3]))
            for k in list(sd):
                if k.endswith(("rel_pos_h", "rel_pos_w")) and k in own:
                    sd[k] = resize_rel_pos(sd[k], own[k].shape[0])
        else:
            sd = _vit.checkpoint_filter_fn(sd, m)  # resamples pos_embed to the scene's token grid
        own = m.state_dict()
        kept = {k: v for k, v in sd.items() if k in own or not k.startswith(_CHECKPOINT_EXTRAS)}
        dropped = [k for k in raw if k not in kept and not k.startswith("image_encoder.")]
        dropped += [k for k in sd if k not in kept and k not in raw]
        before = {k: tuple(v.shape) for k, v in kept.items()}
        sd, bands_note = adapt_bands(kept, "patch_embed.proj.weight", pretrained_bands, bands, self.in_chans,
                                     band_rule)
        load_strict(m, sd, f"timm_vit {type(m).__name__}", ignore_missing=("head.",))
        # resized: tables whose checkpoint shape differs from the model's (position tables resampled)
        src_shapes = {k: tuple(v.shape) for k, v in raw.items()}
        resized = [k for k in before if k in src_shapes and src_shapes[k] != before[k]]
        self.load_report = load_report(f"timm_vit {type(m).__name__}", describe_source(checkpoint), sd, m,
                                       dropped=dropped, resized=resized, bands=bands_note)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.is_sam:
            return self._forward_sam(x)
        return self.model.forward_intermediates(x, indices=self.indices, norm=self.norm, intermediates_only=True)

    def _forward_sam(self, x: torch.Tensor) -> list[torch.Tensor]:
        # timm's VisionTransformerSAM.forward_intermediates, with the position table resampled to the input's
        # global token grid in its own dtype (timm casts to fp32: float64 runs would not be float64)
        m = self.model
        x = m.patch_embed(x)
        if m.pos_embed is not None:
            x = x + resample_pos_nhwc(m.pos_embed, tuple(x.shape[1:3]), antialias=True)
        x = m.norm_pre(m.patch_drop(m.pos_drop(x)))
        feats = []
        for i, blk in enumerate(m.blocks):
            x = _samvit.checkpoint(blk, x) if m.grad_checkpointing else blk(x)
            if i in self.indices:
                y = x.permute(0, 3, 1, 2)
                feats.append(m.neck(y) if self.norm else y)
        return feats


def _dynamic_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
    """``VisionTransformer._pos_embed`` for ``dynamic_img_size`` (x: ``B, H, W, C``):
    the table resampled to ``(H, W)`` (bicubic, antialiased, prefix tokens kept: timm's
    ``resample_abs_pos_embed``) in the parameter's dtype. H, W are the global grid under SPIM."""
    B, H, W, C = x.shape
    to_cat = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
    x = x.view(B, -1, C)
    if self.pos_embed is None:
        return torch.cat(to_cat + [x], dim=1) if to_cat else x
    k = 0 if self.no_embed_class else self.num_prefix_tokens
    gh, gw = self.patch_embed.grid_size
    pos = self.pos_embed
    table = resample_pos_nhwc(pos[:, k:].reshape(1, gh, gw, -1), (H, W), antialias=True).reshape(1, H * W, -1)
    pos = torch.cat([pos[:, :k], table], dim=1) if k else table
    if self.no_embed_class:
        x = x + pos
        x = torch.cat(to_cat + [x], dim=1) if to_cat else x
    else:
        x = torch.cat(to_cat + [x], dim=1) if to_cat else x
        x = x + pos
    return self.pos_drop(x)


@register_encoder("timm_vit")
def timm_vit(model_name: str = "vit_base_patch16_224", img_size: int | Sequence[int] = 224,
             indices: int | Sequence[int] | None = None, **kwargs) -> TimmViTEncoder:
    """Any timm ``vit_*`` / ``samvit_*`` by name at scene size ``img_size``
    (random weights, or ``checkpoint=<path or state dict>``); see :class:`TimmViTEncoder`."""
    return TimmViTEncoder(model_name, img_size, indices, **kwargs)


__all__ = ["TimmViTEncoder", "timm_vit"]
