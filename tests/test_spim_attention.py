"""Sequence-parallel attention and windowed attention under SPIM.

Sharded vs one process (output, input grad, parameter grads) for global
attention with Ulysses and all-gather K/V (heads divisible and not divisible by
sp, prefix tokens, explicit q @ k^T attention, a replicated attention bias over
the scene or over MaxViT's grid-partition windows), and windowed attention; in
float64 HaloNet-style blocks with a halo (``Tensor.unfold`` along the grid dims:
a halo exchange), unfold with other sizes/steps, and MViTv2-style relative
positions assigned in place (``attn[:, :, 0:, 0:] = ...``), BoTNet-style
relative-to-absolute logits (through layouts that mix the grid: index-mapped),
``nn.MultiheadAttention`` with and without its weights, Linears over the token
dim (MLP-Mixer / gMLP token mixing), SHViT's ``v @ attn^T``, CrossViT's
class-token attention (softmax and contraction over [cls, patches]),
``F.unfold`` / ``F.fold`` into non-overlapping patches and back, sdpa on 5-D
and 3-D inputs;
the bytes moved per layer against the analytic volumes."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionLayer

from rest_ds.spim import SpatialMesh, TileLayout, comm_stats, parallelize, shard
from rest_ds.spim.attention import choose_algorithm
from rest_ds.spim.errors import SPIMError
from rest_ds.spim.verify import compare_sharded

from .harness import TOL, check_report, grid_params, run_grid, run_ranks
from .nets import TOKENS_HW, TokenBlock

H, W = TOKENS_HW       # token grid
LAYOUTS = {(1, 2): TileLayout((0, 12), (0, 5, 14)), (2, 2): TileLayout((0, 7, 12), (0, 9, 14)),
           (1, 3): TileLayout((0, 12), (0, 4, 9, 14))}
FAST_GRID = (1, 2)  # the fast tier's grid: Ulysses (4 heads) and all-gather (3 heads) both run on it


def _sam_layer(window, attn="eager"):
    cfg = SamVisionConfig(hidden_size=24, num_attention_heads=2, mlp_dim=48, image_size=H * 8, patch_size=8,
                          window_size=window, use_rel_pos=True)
    cfg._attn_implementation = attn
    torch.manual_seed(3)
    layer = SamVisionLayer(cfg, window_size=window)
    with torch.no_grad():  # small non-zero relative positions, well conditioned in fp32
        layer.attn.rel_pos_h.normal_(0, 0.02)
        layer.attn.rel_pos_w.normal_(0, 0.02)
    return layer


class SamLayerNCHW(nn.Module):
    def __init__(self, window, attn="eager"):
        super().__init__()
        self.layer = _sam_layer(window, attn)

    def forward(self, x):
        return self.layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class BiasedAttention(nn.Module):
    """Attention with a learned relative-position-like bias given to sdpa as a
    replicated ``attn_mask`` over (queries, keys): ``grid=False`` over all the
    scene's tokens (CoAtNet's Attention2d on NCHW); ``grid=True`` MaxViT's grid
    partition, each window the pixels ``gh x gw`` strided across the scene (here
    ``(H, 1, W/2, 2)``: a window side of 1), so a window's tokens span the tiles."""

    def __init__(self, grid: bool, heads: int = 2, c: int = 24):
        super().__init__()
        self.grid, self.heads = grid, heads
        n = H * (W // 2) if grid else H * W
        torch.manual_seed(4)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.bias = nn.Parameter(0.5 * torch.randn(heads, n, n))

    def forward(self, x):
        B, C, h, w = x.shape
        if not self.grid:
            q, k, v = self.qkv(x).view(B, 3 * self.heads, C // self.heads, h * w).transpose(-1, -2).chunk(3, 1)
            o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
            return o.transpose(-1, -2).reshape(B, C, h, w) + x
        t = self.qkv(x).permute(0, 2, 3, 1).view(B, h, 1, w // 2, 2, 3 * C).permute(0, 2, 4, 1, 3, 5)
        t = t.reshape(B * 2, h * (w // 2), 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = nn.functional.scaled_dot_product_attention(t[0], t[1], t[2], attn_mask=self.bias)  # (2B, heads, n, d)
        o = o.transpose(1, 2).reshape(B, 1, 2, h, w // 2, C).permute(0, 3, 1, 4, 2, 5).reshape(B, h, w, C)
        return o.permute(0, 3, 1, 2) + x


class HaloBlocks(nn.Module):
    """HaloNet-style blocked attention (timm HaloAttn's layout, tiny): queries in
    ``b x b`` blocks, keys/values from each block with a halo of ``h`` around it
    (``F.pad`` then ``Tensor.unfold`` along both grid dims: a halo exchange),
    a relative term per (query row, key) tiled over the block's columns with
    ``expand``, the output folded back to NCHW."""

    def __init__(self, c: int = 24, heads: int = 2, b: int = 2, h: int = 1):
        super().__init__()
        self.heads, self.b, self.h, self.win = heads, b, h, b + 2 * h
        torch.manual_seed(6)
        self.q = nn.Conv2d(c, c, 1)
        self.kv = nn.Conv2d(c, 2 * c, 1)
        self.rel = nn.Parameter(0.3 * torch.randn(self.win, c // heads))

    def forward(self, x):
        B, C, H, W = x.shape
        b, win, d = self.b, self.win, C // self.heads
        nh, nw = H // b, W // b
        q = self.q(x).reshape(-1, d, nh, b, nw, b).permute(0, 1, 3, 5, 2, 4)
        q = q.reshape(B * self.heads, d, b * b, nh * nw).transpose(1, 3)  # (B heads, blocks, b b, d)
        kv = nn.functional.pad(self.kv(x), [self.h] * 4)
        kv = kv.unfold(2, win, b).unfold(3, win, b).reshape(B * self.heads, 2 * d, nh * nw, -1).permute(0, 2, 3, 1)
        k, v = torch.split(kv, [d, d], dim=-1)
        rel = (q @ self.rel.transpose(0, 1)).reshape(-1, b, 1, b, win).expand(-1, -1, win, -1, -1)
        rel = rel.permute(0, 1, 3, 2, 4).reshape(B * self.heads, nh * nw, b * b, win * win)
        attn = ((q @ k.transpose(-1, -2)) * d ** -0.5 + rel).softmax(dim=-1)
        out = (attn @ v).transpose(1, 3).reshape(-1, b, b, nh, nw)
        return out.permute(0, 3, 1, 4, 2).reshape(B, C, H, W) + x


class UnfoldWindows(nn.Module):
    """``Tensor.unfold`` along both grid dims with other sizes and steps: rows
    overlapping (size 3, step 2), cols with gaps (size 2, step 3), and along a
    channel dim (local); a weighted sum over each window."""

    def __init__(self, c: int = 24):
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv2d(c, 6, 3, padding=1)
        self.w = nn.Parameter(torch.randn(3, 3, 2))

    def forward(self, x):
        y = self.conv(x).unfold(1, 3, 3).unfold(2, 3, 2).unfold(3, 2, 3)  # (B, 2, H', W', 3, 3, 2)
        return (y * self.w).sum((-3, -2, -1))


class RelPosSetitem(nn.Module):
    """MViTv2's decomposed relative positions written into the attention logits
    in place (timm mvitv2.cal_rel_pos_type without a class token):
    ``attn[:, :, 0:, 0:] = (attn.view(B, heads, H, W, H, W) + rel_h + rel_w).view(...)``
    with the query tokens sharded; then a plain full-scene tensor assigned
    into a channel slice of the output (sliced to the tile)."""

    def __init__(self, c: int = 24, heads: int = 2):
        super().__init__()
        self.heads = heads
        torch.manual_seed(8)
        self.qkv = nn.Linear(c, 3 * c)
        self.rel_h = nn.Parameter(0.3 * torch.randn(H, H, c // heads))
        self.rel_w = nn.Parameter(0.3 * torch.randn(W, W, c // heads))
        self.pos = nn.Parameter(torch.randn(1, 2, H, W))

    def forward(self, x):
        B, C, h, w = x.shape
        qkv = self.qkv(x.flatten(2).transpose(1, 2)).reshape(B, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        r_q = q[:, :, 0:].reshape(B, self.heads, h, w, -1)
        rel_h = torch.einsum("byhwc,hkc->byhwk", r_q, self.rel_h)
        rel_w = torch.einsum("byhwc,wkc->byhwk", r_q, self.rel_w)
        attn[:, :, 0:, 0:] = (attn[:, :, 0:, 0:].view(B, -1, h, w, h, w) + rel_h.unsqueeze(-1)
                              + rel_w.unsqueeze(-2)).view(B, -1, h * w, h * w)
        o = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, h, w, C).permute(0, 3, 1, 2) + x
        o[:, 1:3] = self.pos * 2.0
        return o


def _rel_to_abs(q, rel_k):
    """BoTNet's relative logits along the last grid dim (timm bottleneck_attn.rel_logits_1d):
    (B, H, W, d) -> (B, H, H, W, W), through layouts that mix the grid with the batch."""
    B, H, W, _ = q.shape
    x = (q @ rel_k.transpose(-1, -2)).reshape(-1, W, 2 * W - 1)
    x = nn.functional.pad(nn.functional.pad(x, [0, 1]).flatten(1), [0, W - 1]).reshape(-1, W + 1, 2 * W - 1)
    return x[:, :W, W - 1:].reshape(B, H, 1, W, W).expand(-1, -1, H, -1, -1)


class RelToAbsAttention(nn.Module):
    """BoTNet-style global attention with relative logits (timm PosEmbedRel): each
    axis' relative-to-absolute skew (a reshape merging the grid rows into the
    batch, pad, flatten, pad, reshape, slice) leaves every layout SPIM can
    shard and comes back to the grid (an index-mapped rearrangement)."""

    def __init__(self, c: int = 24, heads: int = 2):
        super().__init__()
        self.heads, d = heads, c // heads
        torch.manual_seed(9)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.rel_h = nn.Parameter(0.3 * torch.randn(2 * H - 1, d))
        self.rel_w = nn.Parameter(0.3 * torch.randn(2 * W - 1, d))

    def forward(self, x):
        B, C, h, w = x.shape
        d = C // self.heads
        q, k, v = torch.split(self.qkv(x), [C, C, C], dim=1)
        q = q.reshape(B * self.heads, d, -1).transpose(-1, -2)
        k = k.reshape(B * self.heads, d, -1)
        v = v.reshape(B * self.heads, d, -1).transpose(-1, -2)
        qg = q.reshape(B * self.heads, h, w, d)
        rel = (_rel_to_abs(qg, self.rel_w).permute(0, 1, 3, 2, 4)
               + _rel_to_abs(qg.transpose(1, 2), self.rel_h).permute(0, 3, 1, 4, 2))
        attn = ((q @ k) * d ** -0.5 + rel.reshape(B * self.heads, h * w, h * w)).softmax(dim=-1)
        return (attn @ v).transpose(-1, -2).reshape(B, C, h, w) + x


class MHABlock(nn.Module):
    """torchvision ViT's attention: a class token, ``nn.MultiheadAttention``
    (batch-first, so ``(L, N, E)`` inside) once without weights (sdpa) and once
    with its head-averaged weights, which are used too (``weights @ tokens``)."""

    def __init__(self, c: int = 24, heads: int = 2):
        super().__init__()
        torch.manual_seed(10)
        self.cls = nn.Parameter(torch.randn(1, 1, c))
        self.attn = nn.MultiheadAttention(c, heads, batch_first=True)
        self.attn2 = nn.MultiheadAttention(c, heads, batch_first=True)

    def forward(self, x):
        B, C, h, w = x.shape
        t = torch.cat([self.cls.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        o, wts = self.attn2(t, t, t)
        t = t + o + wts @ t
        return t[:, 1:].transpose(1, 2).reshape(B, C, h, w) + t[:, :1].transpose(1, 2).unsqueeze(-1)


class TokenMixing(nn.Module):
    """MLP-Mixer / gMLP token mixing: Linears over the token dim (``(B, C, N)``,
    tokens sharded last) N -> 16 -> N and a gMLP-style spatial gate N -> N, with a
    class token (its weight columns are added once, not per rank)."""

    def __init__(self, c: int = 24):
        super().__init__()
        n = H * W + 1
        torch.manual_seed(11)
        self.cls = nn.Parameter(torch.randn(1, 1, c))
        self.fc1, self.fc2, self.gate = nn.Linear(n, 16), nn.Linear(16, n), nn.Linear(n, n)

    def forward(self, x):
        B, C, h, w = x.shape
        t = torch.cat([self.cls.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        t = t + self.fc2(nn.functional.gelu(self.fc1(t.transpose(1, 2)))).transpose(1, 2)
        u, v = t.chunk(2, dim=-1)
        t = torch.cat([u, u * self.gate(v.transpose(-1, -2)).transpose(-1, -2)], dim=-1)
        return t[:, 1:].transpose(1, 2).reshape(B, C, h, w) + t[:, :1].transpose(1, 2).unsqueeze(-1)


class ChannelFirstAttention(nn.Module):
    """SHViT's single-head attention on (B, C, N): ``attn = q^T @ k``, then
    ``v @ attn^T`` (the values' tokens contracted against the keys of attn^T)."""

    def __init__(self, c: int = 24, d: int = 8):
        super().__init__()
        torch.manual_seed(12)
        self.d = d
        self.qkv = nn.Conv2d(c, 2 * d + c, 1)

    def forward(self, x):
        B, C, h, w = x.shape
        q, k, v = self.qkv(x).flatten(2).split([self.d, self.d, C], dim=1)
        attn = ((q.transpose(-2, -1) @ k) * self.d ** -0.5).softmax(dim=-1)
        return (v @ attn.transpose(-2, -1)).reshape(B, C, h, w) + x


class ClassTokenCrossAttention(nn.Module):
    """CrossViT's cross-attention: the class token (replicated) queries [cls, patches]
    with an explicit ``softmax(q @ k^T) @ v``: a softmax and a contraction along a
    token dim that holds a replicated prefix token."""

    def __init__(self, c: int = 24, heads: int = 2):
        super().__init__()
        torch.manual_seed(13)
        self.heads = heads
        self.cls = nn.Parameter(torch.randn(1, 1, c))
        self.q, self.kv, self.proj = nn.Linear(c, c), nn.Linear(c, 2 * c), nn.Linear(c, c)

    def forward(self, x):
        B, C, h, w = x.shape
        t = torch.cat([self.cls.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        d = C // self.heads
        q = self.q(t[:, :1]).reshape(B, 1, self.heads, d).transpose(1, 2)
        k, v = self.kv(t).reshape(B, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * d ** -0.5).softmax(dim=-1)
        cls = self.proj((attn @ v).transpose(1, 2).reshape(B, 1, C))
        return x * cls.transpose(1, 2).unsqueeze(-1)


class PatchUnfoldFold(nn.Module):
    """MobileViTv2's (transformers) patch unfolding: ``F.unfold`` into 2 x 2
    non-overlapping patches (a token layout on the patch grid), GroupNorm(1, C)
    and a channel mix over (B, C, P, N), ``F.fold`` back to the map."""

    def __init__(self, c: int = 24):
        super().__init__()
        torch.manual_seed(14)
        self.norm, self.mix = nn.GroupNorm(1, c), nn.Linear(c, c)

    def forward(self, x):
        B, C, h, w = x.shape
        t = nn.functional.unfold(x, kernel_size=2, stride=2).reshape(B, C, 4, -1)
        t = self.mix(self.norm(t).transpose(1, 3)).transpose(1, 3)
        return nn.functional.fold(t.reshape(B, C * 4, -1), (h, w), kernel_size=2, stride=2) + x


class BlockBatchedAttention(nn.Module):
    """Global attention through ``F.scaled_dot_product_attention`` on 5-D
    ``(B, heads, T, N, d)`` (NesT's blocks, T = 1) and 3-D ``(B, N, d)`` inputs."""

    def __init__(self, c: int = 24, heads: int = 2):
        super().__init__()
        torch.manual_seed(15)
        self.heads = heads
        self.qkv, self.qkv1 = nn.Linear(c, 3 * c), nn.Linear(c, 3 * c)

    def forward(self, x):
        B, C, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).reshape(B, -1, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unsqueeze(3)
        t = t + nn.functional.scaled_dot_product_attention(q, k, v).squeeze(2).transpose(1, 2).reshape(B, -1, C)
        q, k, v = self.qkv1(t).chunk(3, dim=-1)
        t = t + nn.functional.scaled_dot_product_attention(q, k, v)
        return t.transpose(1, 2).reshape(B, C, h, w)


class PrefixSplitRope(nn.Module):
    """DINOv3's attention (transformers): class + register tokens in front, a rotary
    embedding applied to the patch tokens only through ``q.split((prefix, N - prefix),
    dim=-2)`` then ``torch.cat`` back, and sdpa over [prefix, patches]. Also a three-way
    split (each prefix token on its own, then the patches)."""

    def __init__(self, c: int = 24, heads: int = 2, regs: int = 2):
        super().__init__()
        torch.manual_seed(16)
        self.heads, self.regs = heads, regs
        self.prefix = nn.Parameter(torch.randn(1, 1 + regs, c))
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x):
        B, C, h, w = x.shape
        k0 = 1 + self.regs
        t = torch.cat([self.prefix.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        d = C // self.heads
        q, k, v = self.qkv(t).reshape(B, -1, 3, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        # a replicated (h w, d) rotary table of the whole scene's patch positions
        pos = torch.arange(h * w, dtype=x.dtype, device=x.device)[:, None] * torch.linspace(0.1, 1.0, d // 2,
                                                                                          dtype=x.dtype)
        cos, sin = pos.cos().repeat(1, 2), pos.sin().repeat(1, 2)

        def rope(z):
            z1, z2 = z[..., : d // 2], z[..., d // 2:]
            return z * cos + torch.cat((-z2, z1), dim=-1) * sin

        n = q.shape[-2]
        qp, qt = q.split((k0, n - k0), dim=-2)
        *kp, kt = k.split([1] * k0 + [n - k0], dim=-2)
        q, k = torch.cat((qp, rope(qt)), dim=-2), torch.cat((*kp, rope(kt)), dim=-2)
        o = self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, C))
        return (o[:, k0:] + o[:, :1]).transpose(1, 2).reshape(B, C, h, w) + x


class WindowBatchConv(nn.Module):
    """2 x 2 windows moved into the batch dim (EfficientViT-M's local attention, TNT's inner
    pixels; SAM 2's pooled queries): a padded 3x3 conv, a train-mode BatchNorm, max and
    average pooling per window sample, then CoaT's
    zero row padded in front of a token sequence (a replicated prefix token) under
    attention, and a kernel-1 ``Conv1d`` over the token-sharded sequence."""

    def __init__(self, c: int = 24):
        super().__init__()
        torch.manual_seed(17)
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)  # a bias before BN: grad 0
        self.mix = nn.Conv1d(c, c, 1)

    def forward(self, x):
        B, C, h, w = x.shape
        win = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, 2, 2)
        win = self.bn(self.conv(win))
        win = win + nn.functional.max_pool2d(win, 3, 1, 1) - nn.functional.avg_pool2d(win, 2, 1, 1)[..., 1:, 1:]
        y = win.view(B, h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)
        t = nn.functional.pad(y.flatten(2).transpose(1, 2), (0, 0, 1, 0))  # (B, 1 + N, C), row 0 zeros
        q = t.reshape(B, -1, 2, C // 2).transpose(1, 2)
        t = nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(B, -1, C)[:, 1:]
        return self.mix(t.transpose(1, 2)).reshape(B, C, h, w) + x


class TokenPool1d(nn.Module):
    """NextViT's keys: ``AvgPool1d`` (and a ``MaxPool1d``) over groups of 2 consecutive
    raster tokens (1 x 2 strips of a row; column borders on even tokens), then global
    attention of every token's query over the pooled keys / values; ``adaptive_avg_pool1d``
    to 1 token, ``max`` / ``sort`` over the channels (structseq results); overlapping
    ``F.unfold`` / ``nn.Unfold`` (padded 3x3, stride 1 and 2)."""

    def __init__(self, c: int = 24):
        super().__init__()
        torch.manual_seed(19)
        self.kv, self.avg, self.max = nn.Linear(c, 2 * c), nn.AvgPool1d(2, 2), nn.MaxPool1d(2)
        self.im2col = nn.Conv1d(9 * c, c, 1)

    def forward(self, x):
        B, C, h, w = x.shape
        t = x.flatten(2)  # (B, C, N)
        p = (self.avg(t) + self.max(t)).transpose(1, 2)  # (B, N / 2, C)
        k, v = self.kv(p).reshape(B, -1, 2, 2, C // 2).permute(2, 0, 3, 1, 4)
        q = t.transpose(1, 2).reshape(B, -1, 2, C // 2).transpose(1, 2)
        o = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, C)
        # a pooler's mean over the tokens; max (values, indices) and sort over the channels (Hiera)
        g = nn.functional.adaptive_avg_pool1d(t, 1).unsqueeze(-1)
        # overlapping nn.Unfold: a 3x3 conv as unfold + kernel-1 Conv1d; a strided padded one pooled
        u = self.im2col(nn.functional.unfold(x, 3, padding=1)).reshape(B, C, h, w)
        g = g + nn.functional.adaptive_avg_pool1d(nn.Unfold(3, padding=1, stride=2)(x), 1)[:, ::9].unsqueeze(-1)
        m = x.max(dim=1, keepdim=True).values + x.sort(dim=1).values
        return o.transpose(1, 2).reshape(B, C, h, w) + x + g * m + u


# MaxViT's grid partition needs the column borders on multiples of its inner size 2
EVEN_LAYOUTS = {(1, 2): TileLayout((0, 12), (0, 8, 14)), (2, 2): TileLayout((0, 6, 12), (0, 8, 14)),
                (1, 3): TileLayout((0, 12), (0, 4, 8, 14))}

CASES = {
    "biased_global": lambda: BiasedAttention(False),
    "biased_grid_partition": lambda: BiasedAttention(True),
    "heads4": lambda: TokenBlock(heads=4),                     # Ulysses on 1x2 and 2x2, all-gather on 1x3
    "heads3": lambda: TokenBlock(heads=3),                     # all-gather on 1x2, 2x2; Ulysses on 1x3
    "cls_token": lambda: TokenBlock(heads=4, cls=True, depth=2),
    "explicit_attention": lambda: TokenBlock(heads=2, fused=False),
    "sam_global": lambda: SamLayerNCHW(0),
}
# float64 (the algorithm itself, to ~1e-14), on EVEN_LAYOUTS (borders on the 2 x 2 halo blocks)
CASES_FP64 = {
    "halo_blocks_fp64": HaloBlocks,
    "unfold_windows_fp64": UnfoldWindows,
    "relpos_setitem_fp64": RelPosSetitem,
    "rel_to_abs_fp64": RelToAbsAttention,
    "multihead_attention_fp64": MHABlock,
    "token_mixing_fp64": TokenMixing,
    "values_at_attention_t_fp64": ChannelFirstAttention,
    "class_token_cross_attention_fp64": ClassTokenCrossAttention,
    "patch_unfold_fold_fp64": PatchUnfoldFold,
    "sdpa_5d_3d_fp64": BlockBatchedAttention,
    "prefix_split_rope_fp64": PrefixSplitRope,
    "window_batch_conv_pad_prefix_fp64": WindowBatchConv,
    "token_pool1d_fp64": TokenPool1d,
}


def _rank(grid):
    mesh = SpatialMesh.build(grid=grid)
    out = {}
    for name, factory in CASES.items():
        x = torch.randn(2, 24, H, W, generator=torch.Generator().manual_seed(5))
        layout = EVEN_LAYOUTS[grid] if name == "biased_grid_partition" else LAYOUTS[grid]
        rep = compare_sharded(factory, x, mesh, layout, train=True, step=True)
        out[name] = (rep.errors, rep.refused)
    # float64: the algorithm itself, free of fp32 rounding (SAM's eager attention
    # runs its softmax in fp32 whatever the input dtype, so the sdpa variant here)
    x = torch.randn(2, 24, H, W, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rep = compare_sharded(lambda: SamLayerNCHW(0, "sdpa").double(), x, mesh, LAYOUTS[grid], train=True, step=True)
    out["sam_global_fp64"] = (rep.errors, rep.refused)
    for name, factory in CASES_FP64.items():
        rep = compare_sharded(lambda: factory().double(), x, mesh, EVEN_LAYOUTS[grid], train=True, step=True)
        out[name] = (rep.errors, rep.refused)
    return out


def _results(grid):
    return run_grid(_rank, grid)


@pytest.mark.parametrize("grid", grid_params(LAYOUTS, FAST_GRID))
@pytest.mark.parametrize("case", list(CASES) + ["sam_global_fp64"] + list(CASES_FP64))
def test_attention_exact(grid, case):
    errors, refused = _results(grid)[case]
    check_report(errors, refused, TOL[torch.float64 if case.endswith("fp64") else torch.float32], f"{case} on {grid}")
    assert any(k.startswith("grad ") for k in errors)


def _bytes_rank(grid, algorithm, heads, window):
    mesh = SpatialMesh.build(grid=grid)
    torch.manual_seed(0)
    if window is None:
        model = TokenBlock(heads=heads)
        dim, n_h, n_w = 24, H, W
        layout = LAYOUTS[grid]
        x = torch.randn(1, dim, n_h, n_w, requires_grad=True)
    else:
        model = SamLayerNCHW(window)
        layout = TileLayout((0, 8, 12), (0, 4, 14)) if grid == (2, 2) else TileLayout((0, 12), (0, 8, 14))
        x = torch.randn(1, 24, H, W, requires_grad=True)
    parallelize(model, mesh, attention=algorithm)
    comm_stats().reset()
    y = model(shard(x, mesh, layout))
    (y[0] if isinstance(y, tuple) else y).to_local().sum().backward()
    return dict(comm_stats().by_phase)


@pytest.mark.parametrize("algorithm,heads", [("ulysses", 4), ("allgather", 3)])
def test_global_attention_bytes_match_analytic(algorithm, heads):
    """Per global-attention layer, over all ranks (B = 1, d = width, N tokens, fp32):
    Ulysses moves 4 (P-1)/P N d elements forward (q, k, v out, o back) and the
    same backward; all-gather K/V moves 2 (P-1) N d forward and backward."""
    grid = (2, 2)
    P, N, d = 4, H * W, 24
    per_rank = run_ranks(_bytes_rank, P, grid, algorithm, heads, None)
    fwd = sum(r.get(("all_to_all", "forward"), 0) for r in per_rank)
    bwd = sum(r.get(("all_to_all", "backward"), 0) for r in per_rank)
    analytic = 4 * (4 * (P - 1) / P * N * d if algorithm == "ulysses" else 2 * (P - 1) * N * d)
    assert fwd == analytic and bwd == analytic
    assert all(r.get(("halo", "forward"), 0) == 0 for r in per_rank)


def test_windowed_attention_moves_zero_bytes():
    """Tiles on the window grid (4 x 4 tokens; the scene's 12 x 14 pads to 12 x 16
    at the bottom/right only): each window lives on one rank, nothing is sent."""
    per_rank = run_ranks(_bytes_rank, 4, (2, 2), "auto", 2, 4)
    assert all(sum(r.values()) == 0 for r in per_rank), per_rank


def _misaligned_rank():
    mesh = SpatialMesh.build(grid=(1, 2))
    model = parallelize(SamLayerNCHW(4), mesh)
    x = torch.randn(1, 24, H, W)
    try:
        model(shard(x, mesh, TileLayout((0, 12), (0, 6, 14))))
    except SPIMError as e:
        return str(e)
    return None


def test_windows_across_tile_borders_are_refused_by_name():
    msgs = run_ranks(_misaligned_rank, 2)
    assert all(m and "window" in m and "layer" in m for m in msgs), msgs


def test_algorithm_choice():
    mesh = SpatialMesh(1, 4, (2, 2), 0, None, None, (0, 1, 2, 3))
    assert choose_algorithm(8, mesh) == "ulysses"
    assert choose_algorithm(6, mesh) == "allgather"
    assert choose_algorithm(8, mesh, "allgather") == "allgather"
    with pytest.raises(SPIMError, match="divisible"):
        choose_algorithm(6, mesh, "ulysses")
    with pytest.raises(SPIMError, match="must be"):
        choose_algorithm(6, mesh, "ring")
