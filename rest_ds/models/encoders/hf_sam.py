"""The ``transformers`` SAM image encoder (``SamVisionEncoder``) at any scene size.

``SamVisionConfig.image_size`` is one int: transformers builds a square model
(``image_size // patch_size`` tokens on both axes for the position table and
the global blocks' relative-position tables, and ``SamPatchEmbeddings`` rejects
any other input size). For a square scene the encoder is built with
``image_size`` = the scene size. For a non-square ``H x W`` scene it is built
square at ``H`` and then resized in place to ``H x W``: ``patch_embed.image_size``,
``pos_embed`` ``(1, H/p, W/p, C)`` and every global block's ``rel_pos_w``
``(2 W/p - 1, head_dim)`` (windowed blocks are size independent). The module
then computes exactly what SAM's code computes for that grid, but its
``config.image_size`` no longer describes it: do not ``save_pretrained`` it
and reload it through the config.

Loading a checkpoint trained at another size (1024 for the released SAM
weights) interpolates ``pos_embed`` bicubically to the scene's token grid and
the global blocks' ``rel_pos_h`` / ``rel_pos_w`` linearly to ``2 n - 1`` rows
(the interpolation SAM's ``get_rel_pos`` itself applies at forward time).

At run time any input size works (a rotated or other scene): the forward skips
``SamPatchEmbeddings``' fixed-size check and resamples ``pos_embed`` to the
input's *global* token grid (bicubic, in the parameter's dtype; under SPIM once
on the replicated table, then each rank adds its tile); the global blocks'
relative-position tables are interpolated by transformers' own ``get_rel_pos``.
A checkpoint is read from a file or a ``save_pretrained`` folder (``SamModel``:
the prompt encoder and mask decoder are dropped). Built from scratch, the
encoder uses ``initializer_range`` 0.02 (transformers' default 1e-10 cannot
learn) and a trunc-normal(0.02) ``pos_embed``.

Features: the hidden states of chosen layers (``B x H/p x W/p x C`` permuted to
NCHW, stride p) and/or the neck output (``output_channels``, stride p).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..registry import register_encoder
from .bands import Band
from .common import (StateDict, adapt_bands, check_divisible, describe_source, load_report, load_strict,
                     normalize_indices, read_state_dict, resample_pos_nhwc, resize_pos_nhwc, resize_rel_pos, to_hw)

# hidden_size, num_hidden_layers, num_attention_heads, global_attn_indexes of the released SAM image encoders
SAM_VARIANTS = {
    "vit_b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


class HFSamEncoder(nn.Module):
    """``SamVisionEncoder`` (unmodified transformers module, in ``.sam``) returning
    the hidden states of layers ``indices`` (NCHW) followed by the neck output
    when ``neck=True``. Defaults: the neck output only, like SAM.

    ``align`` = patch x window (tile borders on the window grid keep each window
    on one rank). Scenes that are not a window multiple (in tokens) are padded at
    the bottom/right by SAM's own window partition."""

    def __init__(self, img_size: int | Sequence[int] = 1024, variant: str | None = "vit_b",
                 indices: int | Sequence[int] | None = (), neck: bool = True, in_chans: int | None = None,
                 checkpoint: str | Path | StateDict | None = None, bands: Sequence[Band] | None = None,
                 pretrained_bands: Sequence[Band] | None = None, band_rule: str = "auto",
                 attn_implementation: str = "sdpa", grad_checkpointing: bool = False, **config_kwargs):
        super().__init__()
        from transformers import SamVisionConfig  # imported here: transformers is slow to import
        from transformers.models.sam.modeling_sam import SamVisionEncoder

        H, W = to_hw(img_size)
        if in_chans is None:
            in_chans = len(bands) if bands is not None else 3
        if variant and variant not in SAM_VARIANTS:
            raise ValueError(f"hf_sam: unknown variant {variant!r}; known: {sorted(SAM_VARIANTS)}")
        cfg_kwargs = dict(SAM_VARIANTS[variant]) if variant else {}
        cfg_kwargs.update(config_kwargs)
        if "image_size" in cfg_kwargs:
            raise ValueError("hf_sam: give the scene size as img_size, not image_size")
        # transformers' default initializer_range (1e-10) gives a from-scratch encoder that cannot learn;
        # 0.02 is the ViT/SAM convention (a checkpoint overwrites it anyway)
        cfg_kwargs.setdefault("initializer_range", 0.02)
        cfg = SamVisionConfig(image_size=H, num_channels=in_chans, **cfg_kwargs)
        cfg._attn_implementation = attn_implementation
        p = cfg.patch_size
        if not isinstance(p, int):
            raise ValueError(f"hf_sam: patch_size must be an int, not {p!r}")
        check_divisible((H, W), p, "hf_sam")
        self.sam = SamVisionEncoder(cfg)
        if W != H:
            self._resize_width(W)
        if self.sam.pos_embed is not None:  # transformers zero-initialises it; trunc-normal 0.02 as timm's ViT
            nn.init.trunc_normal_(self.sam.pos_embed, std=0.02)
        self.img_size = (H, W)
        self.in_chans = in_chans
        if checkpoint is not None:
            self.load_checkpoint(checkpoint, pretrained_bands=pretrained_bands, bands=bands, band_rule=band_rule)
        depth = cfg.num_hidden_layers
        self.indices = [] if indices in ((), []) else normalize_indices(indices, depth, "hf_sam")
        self.neck = bool(neck)
        if not self.indices and not self.neck:
            raise ValueError("hf_sam: no features chosen (indices empty and neck=False)")
        if not self.neck:  # layers after the last chosen one and the neck would get no gradient
            self.sam.layers = self.sam.layers[:self.indices[-1] + 1]
            self.sam.neck = nn.Identity()
        if grad_checkpointing:  # non-reentrant, like timm (the variant checked under SPIM)
            enable = getattr(self.sam, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # transformers < 5
                self.sam.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.out_channels = [cfg.hidden_size] * len(self.indices) + ([cfg.output_channels] if self.neck else [])
        self.strides = [p] * len(self.out_channels)
        windows = [cfg.window_size for i in range(depth) if i not in cfg.global_attn_indexes]
        self.align = p * cfg.window_size if windows and cfg.window_size else p

    def _resize_width(self, W: int) -> None:
        sam, cfg = self.sam, self.sam.config
        p = cfg.patch_size
        gh, gw = cfg.image_size // p, W // p
        sam.patch_embed.image_size = (cfg.image_size, W)
        sam.patch_embed.num_patches = gh * gw
        with torch.no_grad():
            if sam.pos_embed is not None:
                sam.pos_embed = nn.Parameter(sam.pos_embed.new_zeros(1, gh, gw, cfg.hidden_size))
            for layer in sam.layers:
                attn = layer.attn
                if layer.window_size == 0 and getattr(attn, "use_rel_pos", False):
                    attn.rel_pos_w = nn.Parameter(attn.rel_pos_w.new_zeros(2 * gw - 1, attn.rel_pos_w.shape[1]))

    def load_checkpoint(self, checkpoint: str | Path | StateDict, pretrained_bands: Sequence[Band] | None = None,
                        bands: Sequence[Band] | None = None, band_rule: str = "auto") -> None:
        """Load a transformers SAM checkpoint (``SamModel`` / ``SamVisionModel`` keys
        under ``vision_encoder.``, or bare ``SamVisionEncoder`` keys) strictly,
        resizing position tables to this scene (module docstring)."""
        sd = raw = read_state_dict(checkpoint)
        dropped: list[str] = []
        if any(k.startswith("image_encoder.") for k in sd):
            raise ValueError("hf_sam: this is an original segment-anything checkpoint ('image_encoder.*' keys); "
                             "load it with the 'timm_vit' encoder and a samvit_* model, or convert it with "
                             "transformers' convert_sam_to_hf.py")
        if any(k.startswith("vision_encoder.") for k in sd):
            # a SamModel (save_pretrained of the whole model): its prompt encoder and mask decoder are dropped
            dropped = [k for k in sd if not k.startswith("vision_encoder.")]
            sd = {k[len("vision_encoder."):]: v for k, v in sd.items() if k.startswith("vision_encoder.")}
        own = self.sam.state_dict()
        resized = [k for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)
                   and (k == "pos_embed" or k.endswith(("rel_pos_h", "rel_pos_w")))]
        if "pos_embed" in sd and "pos_embed" in own:
            sd["pos_embed"] = resize_pos_nhwc(sd["pos_embed"], tuple(own["pos_embed"].shape[1:3]))
        for k in list(sd):
            if k.endswith(("rel_pos_h", "rel_pos_w")) and k in own:
                sd[k] = resize_rel_pos(sd[k], own[k].shape[0])
        sd, bands_note = adapt_bands(sd, "patch_embed.projection.weight", pretrained_bands, bands, self.in_chans,
                                     band_rule)
        load_strict(self.sam, sd, "hf_sam SamVisionEncoder")
        self.load_report = load_report("hf_sam SamVisionEncoder", describe_source(checkpoint), sd, self.sam,
                                       dropped=dropped, resized=resized, bands=bands_note)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        sam = self.sam
        if x.shape[1] != self.in_chans:
            raise ValueError(f"hf_sam: input has {x.shape[1]} bands, the encoder takes {self.in_chans}")
        p = sam.config.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"hf_sam: scene size {tuple(x.shape[-2:])} must be a multiple of the patch size {p}")
        # SamPatchEmbeddings' projection without its fixed-size check: any scene size, rotated included
        h = sam.patch_embed.projection(x).permute(0, 2, 3, 1)
        if sam.pos_embed is not None:
            # the table (at img_size's grid) resampled once to this input's GLOBAL token grid; under
            # SPIM each rank then adds its tile of it (pointwise add of a full-extent replicated operand)
            h = h + resample_pos_nhwc(sam.pos_embed, tuple(h.shape[1:3]))
        feats = []
        for i, layer in enumerate(sam.layers):
            h = layer(h)
            if i in self.indices:
                feats.append(h.permute(0, 3, 1, 2))
        if self.neck:
            feats.append(sam.neck(h))
        return feats


@register_encoder("hf_sam")
def hf_sam(img_size: int | Sequence[int] = 1024, variant: str | None = "vit_b", **kwargs) -> HFSamEncoder:
    """transformers' SAM image encoder at scene size ``img_size``; see :class:`HFSamEncoder`."""
    return HFSamEncoder(img_size, variant, **kwargs)


__all__ = ["HFSamEncoder", "hf_sam", "SAM_VARIANTS"]
