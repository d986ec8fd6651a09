"""A Prithvi-EO-2.0-compatible ViT encoder in plain PyTorch.

Architecture and parameter layout follow IBM/NASA's Prithvi-EO-2.0 encoder
(``PrithviViT`` in TerraTorch's ``terratorch/models/backbones/prithvi_mae.py``,
the code the released ``Prithvi_EO_V2_*.pt`` checkpoints were written with):

* ``patch_embed.proj``: ``Conv3d(in_chans, D, (t, p, p), stride=(t, p, p))`` over
  ``(B, C, T, H, W)`` (defaults: 6 HLS bands, t = 1, p = 16);
* a fixed 3-D sin-cos position embedding: channels ``[0, 6D/16)`` encode the
  token column, ``[6D/16, 12D/16)`` the row, ``[12D/16, D)`` the frame, each as
  ``[sin(pos * w), cos(pos * w)]`` with ``w_i = 10000^(-i / (d/2))``. TerraTorch
  stores it as a buffer for the pretraining grid; here it is computed at forward
  time for the *global* grid ``(T/t, H/p, W/p)`` read from the input's shape, so
  any scene size works and, under SPIM, each rank adds its tile of it;
* optional temporal encoding (``(year, day-of-year)`` per frame, sin-cos, D/2
  channels each) and location encoding (``(lat, lon)`` per sample, sin-cos, D/2
  each), multiplied by ``scale`` (a learned parameter initialised to 0.1 with
  ``coords_scale_learn``, else a buffer of 1) and added to every token of the
  frame / sample;
* a class token (``cls_token``; its position embedding is zero), timm
  ``Block`` s (``blocks.N.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2``),
  a final ``norm`` applied to the last block's output (as TerraTorch's
  ``forward_features`` does).

Checkpoint keys (MAE layout of ``Prithvi_EO_V2_300M.pt``): ``encoder.patch_embed.proj.{weight,bias}``,
``encoder.cls_token``, ``encoder.pos_embed`` (the fixed table; checked and not
loaded), ``encoder.temporal_embed_enc.scale`` / ``encoder.location_embed_enc.scale``
(TL models), ``encoder.blocks.N.*``, ``encoder.norm.*``, and ``decoder.*`` (the
MAE decoder: ignored). The v1 layout without the ``encoder.`` prefix
(``decoder_*`` and ``mask_token`` ignored) loads too.

Features: the outputs of blocks ``indices`` without the class token, NCHW at
stride p. With several frames (T/t > 1) ``temporal_fusion='concat'`` stacks the
frames along channels (channel ``f * D + e`` for frame f, TerraTorch's
``(t e) h w`` order; ``T/t * D`` channels) and ``'mean'`` averages them (``D``
channels).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint
from timm.models.vision_transformer import Block

from ..registry import register_encoder
from .bands import HLS, Band
from .common import (StateDict, adapt_bands, describe_source, load_report, load_strict, normalize_indices,
                     read_state_dict)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``(M,) -> (M, dim)``: ``[sin(pos * w), cos(pos * w)]``, ``w_i = 10000^(-i / (dim/2))``,
    computed in ``pos``'s dtype."""
    if dim % 2:
        raise ValueError(f"a sin-cos embedding needs an even width, not {dim}")
    omega = torch.arange(dim // 2, dtype=pos.dtype, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_3d_parts(dim: int, grid: tuple[int, int, int], dtype=torch.float64, device=None):
    """The column, row and frame parts of Prithvi's 3-D sin-cos table for a
    ``(T, H, W)`` token grid: ``(W, 6D/16)``, ``(H, 6D/16)``, ``(T, 4D/16)``
    (computed in float64, like the reference's numpy code, then cast)."""
    if dim % 16:
        raise ValueError(f"Prithvi's 3-D sin-cos position embedding needs embed_dim % 16 == 0, not {dim}")
    T, H, W = grid
    parts = []
    for d, n in ((dim // 16 * 6, W), (dim // 16 * 6, H), (dim // 16 * 4, T)):
        parts.append(sincos_1d(d, torch.arange(n, dtype=torch.float64, device=device)).to(dtype))
    return parts


def sincos_3d(dim: int, grid: tuple[int, int, int], cls_token: bool = False) -> torch.Tensor:
    """The whole table ``(T*H*W [+1], D)`` in TerraTorch's token order (frame, row, column)."""
    T, H, W = grid
    pw, ph, pt = sincos_3d_parts(dim, grid)
    table = torch.cat([pw.repeat(T * H, 1), ph.repeat_interleave(W, 0).repeat(T, 1), pt.repeat_interleave(H * W, 0)], 1)
    return torch.cat([table.new_zeros(1, dim), table]) if cls_token else table


class PrithviPatchEmbed(nn.Module):
    """``Conv3d`` tubelet embedding ``(B, C, T, H, W) -> (B, D, T/t, H/p, W/p)``."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, tubelet_size: int = 1):
        super().__init__()
        k = (tubelet_size, patch_size, patch_size)
        self.patch_size = k
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=k, stride=k, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class TemporalEncoder(nn.Module):
    """``(B, T, 2)`` (year, day of year) -> ``(B, T, D)``: ``scale * [sincos(year), sincos(doy)]``."""

    def __init__(self, embed_dim: int, trainable_scale: bool = False):
        super().__init__()
        self.embed_dim = embed_dim
        self.year_dim = embed_dim // 2
        self.day_dim = embed_dim - self.year_dim
        if trainable_scale:
            self.scale = nn.Parameter(torch.full((1,), 0.1))
        else:
            self.register_buffer("scale", torch.ones(1))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        B, T = coords.shape[:2]
        year = sincos_1d(self.year_dim, coords[:, :, 0].flatten()).reshape(B, T, -1)
        day = sincos_1d(self.day_dim, coords[:, :, 1].flatten()).reshape(B, T, -1)
        return self.scale * torch.cat([year, day], dim=-1)


class LocationEncoder(nn.Module):
    """``(B, 2)`` (lat, lon) -> ``(B, D)``: ``scale * [sincos(lat), sincos(lon)]``."""

    def __init__(self, embed_dim: int, trainable_scale: bool = False):
        super().__init__()
        self.lat_dim = embed_dim // 2
        self.lon_dim = embed_dim - self.lat_dim
        if trainable_scale:
            self.scale = nn.Parameter(torch.full((1,), 0.1))
        else:
            self.register_buffer("scale", torch.ones(1))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        lat = sincos_1d(self.lat_dim, coords[:, 0].flatten())
        lon = sincos_1d(self.lon_dim, coords[:, 1].flatten())
        return self.scale * torch.cat([lat, lon], dim=-1)


class PrithviViT(nn.Module):
    """Prithvi-EO-2.0 encoder (module docstring) returning a list of NCHW features.

    ``forward(x, temporal_coords=None, location_coords=None)``: ``x`` is
    ``(B, C, H, W)`` (one frame), ``(B, C, T, H, W)``, or, with ``num_frames`` T > 1,
    ``(B, T*C, H, W)`` date-major (channel ``t * C + c``: a scene with ``dates: T``),
    which is read as ``(B, C, T, H, W)`` (``input_channels`` = T*C); ``temporal_coords``
    ``(B, T, 2)`` and ``location_coords`` ``(B, 2)`` are used when the encoder was
    built with ``coords_encoding`` containing ``'time'`` / ``'location'`` (and
    skipped when None, as in TerraTorch). ``H, W`` must be multiples of
    ``patch_size`` and ``T`` of ``tubelet_size``.

    ``indices``: blocks whose outputs are returned (None: the last); blocks
    after the last chosen one are dropped. ``num_frames``: the frames the input
    will have (sets ``out_channels`` for ``temporal_fusion='concat'``).
    ``drop_path``: the same rate in every block (TerraTorch's choice).
    ``align`` = patch size. The coordinates are plain (replicated) tensors: pass
    them as keyword arguments; a ``Segmentor`` calls ``encoder(x)`` only, so a
    model that needs them wraps the encoder call itself."""

    def __init__(self, in_chans: int = 6, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 mlp_ratio: float = 4.0, patch_size: int = 16, tubelet_size: int = 1,
                 coords_encoding: Sequence[str] = (), coords_scale_learn: bool = False, drop_path: float = 0.0,
                 indices: int | Sequence[int] | None = None, temporal_fusion: str = "concat",
                 num_frames: int = 1, grad_checkpointing: bool = False,
                 checkpoint: str | Path | StateDict | None = None, bands: Sequence[Band] | None = None,
                 pretrained_bands: Sequence[Band] | None = HLS, band_rule: str = "auto"):
        super().__init__()
        unknown = set(coords_encoding) - {"time", "location"}
        if unknown:
            raise ValueError(f"prithvi: unknown coords_encoding {sorted(unknown)} (use 'time', 'location')")
        if temporal_fusion not in ("concat", "mean"):
            raise ValueError(f"prithvi: temporal_fusion must be 'concat' or 'mean', not {temporal_fusion!r}")
        if embed_dim % 16:
            raise ValueError(f"prithvi: embed_dim must be a multiple of 16, not {embed_dim}")
        if bands is not None:
            in_chans = len(bands)
        self.in_chans, self.embed_dim, self.num_frames = in_chans, embed_dim, num_frames
        # a 4-D input with this many channels is T = num_frames dates, date-major (_embed)
        self.input_channels = in_chans * num_frames
        self.patch_embed = PrithviPatchEmbed(in_chans, embed_dim, patch_size, tubelet_size)
        self.temporal_encoding = "time" in coords_encoding
        self.location_encoding = "location" in coords_encoding
        if self.temporal_encoding:
            if tubelet_size != 1:
                raise ValueError("prithvi: the temporal encoding needs tubelet_size 1")
            self.temporal_embed_enc = TemporalEncoder(embed_dim, coords_scale_learn)
        if self.location_encoding:
            self.location_embed_enc = LocationEncoder(embed_dim, coords_scale_learn)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm, drop_path=drop_path)
            for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self._init_weights()
        if checkpoint is not None:
            self.load_checkpoint(checkpoint, pretrained_bands=pretrained_bands, bands=bands, band_rule=band_rule)
        self.indices = normalize_indices(indices, depth, "prithvi")
        self.blocks = self.blocks[:self.indices[-1] + 1]
        if self.indices[-1] != depth - 1:  # the final norm only follows the last block
            self.norm = nn.Identity()
        self.temporal_fusion = temporal_fusion
        self.grad_checkpointing = bool(grad_checkpointing)
        frames = max(1, num_frames // tubelet_size)
        width = embed_dim * frames if temporal_fusion == "concat" else embed_dim
        self.out_channels = [width] * len(self.indices)
        self.strides = [patch_size] * len(self.indices)
        self.align = patch_size

    def _init_weights(self) -> None:
        # as the reference: xavier-uniform linears and patch conv (as a linear), N(0, 0.02) class token
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def load_checkpoint(self, checkpoint: str | Path | StateDict, pretrained_bands: Sequence[Band] | None = HLS,
                        bands: Sequence[Band] | None = None, band_rule: str = "auto") -> None:
        """Load a Prithvi checkpoint strictly (module docstring for the key layout);
        the patch embedding is adapted to ``bands`` (bands.py) when they differ."""
        sd = read_state_dict(checkpoint)
        mae = any(k.startswith("encoder.") for k in sd)
        out: StateDict = {}
        for k, v in sd.items():
            if mae:
                if k.startswith("decoder."):
                    continue  # the MAE decoder
                if k.startswith("encoder."):
                    k = k[len("encoder."):]
            elif k.startswith("decoder") or k == "mask_token":
                continue  # v1 layout: decoder_embed, decoder_blocks, decoder_pos_embed, ...
            if k == "pos_embed":
                if v.dim() != 3 or v.shape[0] != 1 or v.shape[2] != self.embed_dim:
                    raise ValueError(f"prithvi: checkpoint pos_embed {tuple(v.shape)} is not (1, 1 + N, "
                                     f"{self.embed_dim})")
                continue  # the fixed sin-cos table, recomputed for the scene's grid
            if k.startswith("temporal_embed_enc.") and not self.temporal_encoding:
                continue  # as TerraTorch: a TL checkpoint loads into a model without coordinate encodings
            if k.startswith("location_embed_enc.") and not self.location_encoding:
                continue
            out[k] = v
        out, bands_note = adapt_bands(out, "patch_embed.proj.weight", pretrained_bands if bands is not None else None,
                                      bands, self.in_chans, band_rule)
        load_strict(self, out, "prithvi")
        dropped = [k for k in sd if (k[len("encoder."):] if mae and k.startswith("encoder.") else k) not in out]
        self.load_report = load_report("prithvi", describe_source(checkpoint), out, self, dropped=dropped,
                                       bands=bands_note + " (pos_embed: fixed sin-cos, recomputed for the scene)")

    def _embed(self, x, temporal_coords, location_coords):
        if x.dim() == 4 and self.num_frames > 1 and x.shape[1] == self.input_channels:
            # a time-series scene's tile (B, T*C, H, W), date-major (scene key `dates`) -> (B, C, T, H, W);
            # only channels move, so under SPIM every rank does the same to its tile
            B, _, H, W = x.shape
            x = x.reshape(B, self.num_frames, self.in_chans, H, W).transpose(1, 2)
        elif x.dim() == 4:
            x = x.unsqueeze(2)
        if x.dim() != 5:
            raise ValueError(f"prithvi: input must be (B, C, H, W) or (B, C, T, H, W), not {tuple(x.shape)}")
        x = self.patch_embed(x)                      # B, D, T, h, w
        B, D, T, h, w = x.shape
        x = x.permute(0, 2, 3, 4, 1)                 # B, T, h, w, D
        # position embedding by its separable parts (column | row | frame channels):
        # elementwise the same sums as adding the whole (T, h, w, D) table, without building it
        pw, ph, pt = sincos_3d_parts(D, (T, h, w), dtype=x.dtype, device=x.device)
        a, b = pw.shape[1], pw.shape[1] + ph.shape[1]
        x = torch.cat([x[..., :a] + pw.reshape(1, 1, 1, w, a), x[..., a:b] + ph.reshape(1, 1, h, 1, b - a),
                       x[..., b:] + pt.reshape(1, T, 1, 1, D - b)], dim=-1)
        if self.temporal_encoding and temporal_coords is not None:
            if temporal_coords.shape[:2] != (B, T) or temporal_coords.shape[-1] != 2:
                raise ValueError(f"prithvi: temporal_coords must be (B, T, 2) = ({B}, {T}, 2), "
                                 f"not {tuple(temporal_coords.shape)}")
            x = x + self.temporal_embed_enc(temporal_coords.to(x.dtype)).reshape(B, T, 1, 1, D)
        if self.location_encoding and location_coords is not None:
            if tuple(location_coords.shape) != (B, 2):
                raise ValueError(f"prithvi: location_coords must be (B, 2), not {tuple(location_coords.shape)}")
            x = x + self.location_embed_enc(location_coords.to(x.dtype)).reshape(B, 1, 1, 1, D)
        x = x.reshape(B, T * h * w, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        return x, (T, h, w)

    def forward(self, x: torch.Tensor, temporal_coords: torch.Tensor | None = None,
                location_coords: torch.Tensor | None = None) -> list[torch.Tensor]:
        x, (T, h, w) = self._embed(x, temporal_coords, location_coords)
        B, D = x.shape[0], x.shape[-1]
        feats = []
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = _checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in self.indices:
                y = self.norm(x) if i == last else x
                y = y[:, 1:].reshape(B, T, h, w, D)
                if T > 1 and self.temporal_fusion == "mean":
                    feats.append(y.mean(1).permute(0, 3, 1, 2))
                else:
                    feats.append(y.permute(0, 1, 4, 2, 3).reshape(B, T * D, h, w))
        return feats


# name -> (embed_dim, depth, num_heads, patch_size, coords_encoding): TerraTorch's prithvi_cfgs
PRITHVI_VARIANTS = {
    "prithvi_eo_tiny": (256, 4, 4, 16, ()),
    "prithvi_eo_v1_100": (768, 12, 12, 16, ()),
    "prithvi_eo_v2_100": (768, 12, 12, 16, ()),
    "prithvi_eo_v2_300": (1024, 24, 16, 16, ()),
    "prithvi_eo_v2_300_tl": (1024, 24, 16, 16, ("time", "location")),
    "prithvi_eo_v2_600": (1280, 32, 16, 14, ()),
    "prithvi_eo_v2_600_tl": (1280, 32, 16, 14, ("time", "location")),
}


@register_encoder("prithvi_vit")
def prithvi_vit(**kwargs) -> PrithviViT:
    """A Prithvi-EO-2.0-style encoder of any size; see :class:`PrithviViT`."""
    return PrithviViT(**kwargs)


def _preset(name: str):
    dim, depth, heads, patch, coords = PRITHVI_VARIANTS[name]

    def factory(indices: int | Sequence[int] | None = None, **kwargs) -> PrithviViT:
        if indices is None:  # four evenly spaced blocks, the last one included (UPerNet-style pyramids),
            n = kwargs.get("depth", depth)  # of the depth asked for (a shrunk preset keeps working)
            indices = [math.ceil(n * (i + 1) / 4) - 1 for i in range(4)]
        args = dict(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, coords_encoding=coords,
                    coords_scale_learn=bool(coords))
        args.update(kwargs)
        return PrithviViT(indices=indices, **args)

    factory.__name__ = name
    factory.__doc__ = f"TerraTorch's '{name}' architecture ({dim} wide, {depth} blocks, {heads} heads, patch {patch})."
    return register_encoder(name)(factory)


for _name in PRITHVI_VARIANTS:
    _preset(_name)

__all__ = ["PrithviViT", "PrithviPatchEmbed", "TemporalEncoder", "LocationEncoder", "sincos_1d", "sincos_3d",
           "sincos_3d_parts", "prithvi_vit", "PRITHVI_VARIANTS"]
