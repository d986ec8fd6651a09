"""SegFormer-B0 in ``spim_core.py``: the model, bytes per layer kind, and their analytic volumes.

Layer kinds (forward, attributed by module hooks: the bytes ``comm_stats``
counted while the module ran): ``patch_embed`` (the overlapping patch
embeddings: k7 s4 p3, then k3 s2 p1 halo convs), ``dwconv`` (Mix-FFN's
depthwise 3x3 convs), ``attention`` (queries on the tile; keys/values of
stages 1-3 on the grid reduced by the sr conv, gathered: one all-to-all of
K and V together; stage 4 (sr 1): Ulysses when heads % sp == 0, else K and V
gathered one by one), ``decode_head`` (the all-MLP head: bilinear resizes of
levels 2-4 to 1/4, BatchNorm statistics), ``other`` (the rest: the final x4
upsampling of the logits). Backward bytes are compared per collective kind.

Analytic volumes from the tile geometry alone (bytes all ranks send, fp32):

* a conv (k, s, p) on a map split at multiples of s: a tile needs ``p`` lines
  before it and ``max(0, k - 1 - p - (s - 1))`` after it (its last output
  starts s lines before its end), corners included; the backward sends the
  same regions' gradients back (none for the scene input, which needs no grad);
* bilinear x f upsampling (``align_corners=False``, integer f): 1 line each
  side of the source map, corners included, both ways;
* K/V gather of a block: every rank sends its ``n_r`` reduced tokens of K and V
  (``2 C`` values each) to the ``P - 1`` others: ``(P - 1) N_red 2 C`` values;
  the backward sends every rank the gradients of its tokens: the same;
* Ulysses (stage 4): q, k, v out and the output back, ``4 (P-1)/P n_r C`` per
  rank, forward and backward alike.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict

import torch
from torch import nn

from rest_ds.spim import comm_stats
from rest_ds.train.bench import border_needs, halo_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = 4


def build_segformer_b0(in_chans: int) -> nn.Module:
    """configs/models/segformer.yaml (SegFormer-B0: MiT-b0 + all-MLP head, 256 wide), with
    DropPath and dropout off (deterministic timing), ``in_chans`` bands, training mode."""
    from rest_ds.models import build_segmentor
    from rest_ds.models.config import ModelConfig

    cfg = ModelConfig.from_yaml(os.path.join(ROOT, "configs", "models", "segformer.yaml"))
    cfg.encoder.in_chans = in_chans
    cfg.encoder.kwargs = dict(cfg.encoder.kwargs, drop_path_rate=0.0)
    cfg.decoder.dropout = 0.0
    return build_segmentor(cfg).train()


def whole_scene_kv(model: nn.Module, sp: int) -> nn.Module:
    """Make the plain (not parallelized) SegFormer ``model`` attend, on a tile, to
    as many keys/values as a sharded rank does: every attention's K and V,
    computed from the tile as usual, are repeated ``sp`` times along the tokens
    before SDPA. Stages 1-3 then have the sharded run's attention shapes (the
    tile's queries over the whole scene's reduced keys); stage 4 (sr 1, Ulysses
    when heads % sp == 0) has its work (n/sp queries x n keys x all heads equals
    n queries x n keys x heads/sp). The work-equivalent comparator of issue 11:
    SPIM's cost without the attention work it cannot avoid. Returns ``model``."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attend(module, query, key, value, attention_mask, **kwargs):
        rep = int(getattr(module, "whole_kv_repeat", 1))
        return sdpa_attention_forward(module, query, key.repeat(1, 1, rep, 1), value.repeat(1, 1, rep, 1),
                                      attention_mask, **kwargs)

    AttentionInterface.register("rest_ds_whole_kv", attend)  # global, idempotent: the same function name
    cfg = model.encoder.model.config
    if cfg._attn_implementation != "sdpa":
        raise ValueError(f"whole_scene_kv needs the sdpa attention, not {cfg._attn_implementation!r}")
    cfg._attn_implementation = "rest_ds_whole_kv"
    for m in model.modules():
        if type(m).__name__ == "SegformerAttention":
            m.whole_kv_repeat = sp
    return model


def _label(name: str) -> str | None:
    if name.endswith("patch_embeddings.proj"):
        return "patch_embed"
    if name.endswith("mlp.dwconv.dwconv"):
        return "dwconv"
    if name.endswith(".attention"):
        return "attention"
    if name == "decoder":
        return "decode_head"
    return None


def layer_kind_hooks(model: nn.Module):
    """Forward hooks that add the bytes counted while each labelled module ran to
    ``table[label][kind]``; returns ``(table, handles)``."""
    table: dict = defaultdict(lambda: defaultdict(int))
    stack: list = []

    def snapshot():
        return dict(comm_stats().bytes)

    handles = []
    for name, mod in model.named_modules():
        lab = _label(name)
        if lab is None:
            continue

        def pre(m, args, lab=lab):
            stack.append(snapshot())

        def post(m, args, out, lab=lab):
            before, now = stack.pop(), snapshot()
            for k, v in now.items():
                if v - before.get(k, 0):
                    table[lab][k] += v - before.get(k, 0)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return table, handles


def _split(part, stride: int) -> list[int]:
    """Partition of a stride-``stride`` map from the input partition (borders on multiples of it)."""
    n = -(-part[-1] // stride)
    return [b // stride for b in part[:-1]] + [n]


def _halo(rows, cols, before: int, after: int, per_pixel: int) -> int:
    """Bytes all ranks send for a halo of ``before`` / ``after`` lines per axis (corners included)."""
    return halo_bytes(rows, cols, border_needs(rows, before, after), border_needs(cols, before, after), per_pixel)


def _conv(rows, cols, stride_in: int, k: int, s: int, p: int, channels: int, batch: int) -> int:
    r, c = _split(rows, stride_in), _split(cols, stride_in)
    return _halo(r, c, p, max(0, k - 1 - p - (s - 1)), channels * batch * F32)


def analytic_bytes(model: nn.Module, rows, cols, batch: int = 1) -> dict:
    """``{label: {kind: {"forward": bytes, "backward": bytes}}}`` for the Segmentor of
    :func:`build_segformer_b0` on the tile partition ``rows`` x ``cols`` (input pixels)."""
    cfg = model.encoder.model.config
    P = (len(rows) - 1) * (len(cols) - 1)
    out: dict = defaultdict(lambda: defaultdict(lambda: {"forward": 0, "backward": 0}))

    def add(label, kind, fwd, bwd):
        out[label][kind]["forward"] += fwd
        out[label][kind]["backward"] += bwd

    stride, c_in = 1, cfg.num_channels
    for i, (C, depth, heads, sr, k, s, mlp) in enumerate(zip(
            cfg.hidden_sizes, cfg.depths, cfg.num_attention_heads, cfg.sr_ratios, cfg.patch_sizes, cfg.strides,
            cfg.mlp_ratios)):
        v = _conv(rows, cols, stride, k, s, k // 2, c_in, batch)
        add("patch_embed", "halo", v, 0 if i == 0 else v)
        stride *= s
        add("dwconv", "halo", depth * _conv(rows, cols, stride, 3, 1, 1, C * mlp, batch),
            depth * _conv(rows, cols, stride, 3, 1, 1, C * mlp, batch))
        r, c = _split(rows, stride), _split(cols, stride)
        n = [(r[a + 1] - r[a]) * (c[b + 1] - c[b]) for a in range(len(r) - 1) for b in range(len(c) - 1)]
        if sr > 1:
            rr, cc = _split(rows, stride * sr), _split(cols, stride * sr)
            N = (rr[-1]) * (cc[-1])
            v = depth * (P - 1) * N * 2 * C * batch * F32
        elif heads % P == 0:
            v = depth * round(sum(4 * (P - 1) / P * m * C for m in n)) * batch * F32
        else:
            v = depth * (P - 1) * sum(n) * 2 * C * batch * F32
        add("attention", "all_to_all", v, v)
        c_in = C
    dec = model.decoder
    ch = dec.linear_fuse.out_channels
    for i, st in enumerate(model.encoder.strides[1:], start=1):
        add("decode_head", "halo", _halo(_split(rows, st), _split(cols, st), 1, 1, ch * batch * F32),
            _halo(_split(rows, st), _split(cols, st), 1, 1, ch * batch * F32))
    st0, ncls = model.encoder.strides[0], dec.classifier.out_channels
    v = _halo(_split(rows, st0), _split(cols, st0), 1, 1, ncls * batch * F32)
    add("other", "halo", v, v)
    return {k: dict(v) for k, v in out.items()}





def layer_bytes_report(runs: list[dict], rows, cols, in_chans: int) -> dict:
    """Measured (summed over the ranks of one run of ``spim_core._rank_job``) vs
    analytic bytes: forward per layer kind and collective kind, backward per
    collective kind. Kinds without an analytic volume (BatchNorm statistics:
    ``all_gather`` / ``all_reduce``) have ``analytic`` None."""
    ana = analytic_bytes(build_segformer_b0(in_chans), rows, cols)
    fwd: dict = defaultdict(int)
    bwd: dict = defaultdict(int)
    for r in runs:
        for lab, kinds in r["comm_forward_by_layer"].items():
            for k, v in kinds.items():
                fwd[(lab, k)] += v
        for key, v in r["comm"].items():
            kind, phase = key.split("/")
            if phase == "backward":
                bwd[kind] += v
    labelled = {k: sum(v for (lab, kk), v in fwd.items() if kk == k) for k in {k for _, k in fwd}}
    for r in runs:  # forward bytes outside the labelled modules: "other"
        for key, v in r["comm"].items():
            kind, phase = key.split("/")
            if phase == "forward":
                fwd[("other", kind)] += v
    for k, v in labelled.items():
        fwd[("other", k)] -= v
    out = {}
    for (lab, k), v in sorted(fwd.items()):
        a = ana.get(lab, {}).get(k, {}).get("forward")
        if v or a:
            out[f"forward {lab} {k}"] = {"measured": v, "analytic": a}
    for k, v in sorted(bwd.items()):
        a = sum(d[k]["backward"] for d in ana.values() if k in d) if any(k in d for d in ana.values()) else None
        out[f"backward {k}"] = {"measured": v, "analytic": a}
    return out


__all__ = ["build_segformer_b0", "whole_scene_kv", "layer_kind_hooks", "analytic_bytes", "layer_bytes_report"]
