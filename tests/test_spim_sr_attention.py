"""Spatial-reduction attention (SegFormer, PVT-v2) under SPIM vs one process.

Unmodified transformers ``SegformerForSemanticSegmentation`` / ``SegformerModel``
and timm ``pvt_v2_b0`` / ``pvt_v2_b2_li`` (tiny widths, random weights), in
training mode with one SGD step: outputs, input grad, every parameter grad and
every parameter after the step against one process, on uneven tiles aligned to
32 of a 1x2 grid (152 px wide: the last tile takes a remainder that is no
multiple of 32) and a 3x1 grid. SDPA with attention dropout or a mask over
reduced keys is refused by name. Queries live on the tile's tokens, keys/values on
the grid reduced by the ``sr_ratio`` strided conv (stage i: stride ``s_i`` x
``sr_i`` = 4x8, 8x4, 16x2, 32x1 = 32 px, hence tiles on multiples of 32), on a
7x7 adaptive-pool grid that is replicated (``linear=True``), or on the tile's
own grid (the last stage, sr 1: Ulysses when heads % sp == 0, else all-gather;
the 3x1 grid has 2 heads on 3 ranks). Both attention forms run: SDPA and the
explicit ``q @ k^T -> softmax -> @ v`` (HF ``eager``, timm ``fused_attn=False``).

Precision: float64 at 1e-10 isolates SPIM's arithmetic. HF's eager attention
computes its softmax in float32 whatever the model's dtype, so it runs in
float32 at 1e-5 (in float64 its float32 rounding of the scores, not SPIM, sets
the error), as the bare encoder with weights drawn at std 0.3: at HF's default
0.02 every softmax is nearly uniform and its backward cancels, so the
one-process float32 run is itself ~3e-5 away from float64 (and so is the
decode head's training-mode BatchNorm backward).

Some gradients are exactly zero in exact arithmetic: key biases (softmax is
invariant to a per-query shift of the scores) and, in the
segmentation model, every bias whose only way to the loss is through the
linear decode head into its training-mode BatchNorm (the decode projections'
biases, the last stage's final LayerNorm bias). Their relative error is
rounding noise over zero, so they are listed below and checked through the
parameter after the SGD step instead (all biases start non-zero, so a wrong
gradient of any size would show there).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rest_ds.spim import TileLayout

from .harness import TOL, grid_params, run_grid, selected, train_step_reports

ALIGN = 32
TINY = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
            sr_ratios=[8, 4, 2, 1], decoder_hidden_size=16)


class Outputs(nn.Module):
    """Calls the model and returns its tensors: SegFormer's logits, or every
    stage's feature map (``hidden_states``) of the bare encoder."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x, output_hidden_states=True)
        return out.logits if hasattr(out, "logits") else tuple(out.hidden_states)


def _randomize_biases(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _segformer(attn: str, head: bool = True, dtype=torch.float32, **over) -> nn.Module:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerModel

    kw = dict(TINY, **over)
    cfg = SegformerConfig(num_channels=3, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          classifier_dropout_prob=0.0, drop_path_rate=0.0, attn_implementation=attn, **kw)
    model = (SegformerForSemanticSegmentation if head else SegformerModel)(cfg)
    return Outputs(_randomize_biases(model)).to(dtype)


def _pvt(name: str, fused: bool, dtype=torch.float32) -> nn.Module:
    import timm

    model = timm.create_model(name, pretrained=False, features_only=True, embed_dims=[8, 16, 24, 32],
                              num_heads=[1, 1, 2, 2], depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2], drop_path_rate=0.0)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return _randomize_biases(model).to(dtype)


def _segmentor(dtype=torch.float32) -> nn.Module:
    """The registry path: ``hf_segformer`` (tiny, 6 bands, DropPath 0.1, activation
    checkpointing) + ``segformer_mlp``."""
    from rest_ds.models import Segmentor, build_decoder, build_encoder
    from rest_ds.models.encoders import hf_segformer  # noqa: F401  (registers the encoders)

    enc = build_encoder("hf_segformer", variant=None, in_chans=6, drop_path_rate=0.1, grad_checkpointing=True,
                        **TINY)
    dec = build_decoder("segformer_mlp", enc.out_channels, enc.strides, 5, channels=16, dropout=0.0)
    return _randomize_biases(Segmentor(enc, dec)).to(dtype)


F64 = torch.float64
# case -> (factory, dtype, batch)
CASES = {
    "segformer-sdpa-fp64": (functools.partial(_segformer, "sdpa", dtype=F64), F64, 2),
    "segformer_model-eager-fp32": (functools.partial(_segformer, "eager", head=False, initializer_range=0.3),
                                   torch.float32, 2),
    "segformer_model-heads1234-sdpa-fp64": (
        functools.partial(_segformer, "sdpa", head=False, dtype=F64, num_attention_heads=[1, 2, 3, 4]), F64, 2),
    "segmentor-hf_segformer-segformer_mlp-droppath-ckpt-fp64": (functools.partial(_segmentor, dtype=F64), F64, 2),
    "pvt_v2_b0-sdpa-fp64": (functools.partial(_pvt, "pvt_v2_b0", True, dtype=F64), F64, 2),
    "pvt_v2_b0-manual-fp64": (functools.partial(_pvt, "pvt_v2_b0", False, dtype=F64), F64, 2),
    "pvt_v2_b2_li-manual-fp64": (functools.partial(_pvt, "pvt_v2_b2_li", False, dtype=F64), F64, 2),
    "pvt_v2_b2_li-sdpa-fp64": (functools.partial(_pvt, "pvt_v2_b2_li", True, dtype=F64), F64, 2),
}


def _zero_grad_params(case: str, model: nn.Module) -> set[str]:
    """Parameters whose gradient is exactly zero in exact arithmetic (module docstring)."""
    names = set()
    for n, _ in model.named_parameters():
        if n.endswith("attention.k_proj.bias"):
            names.add(n)
        if case.startswith(("segformer-", "segmentor-")) and (
                "linear_projections" in n and n.endswith("bias") or n.endswith("stages.3.layer_norm.bias")):
            names.add(n)
    return names


# Uneven tilings on multiples of 32; 3x1 has 32-px tiles (one reduced row each at stage 1).
LAYOUTS = {
    (1, 2): TileLayout((0, 64), (0, 64, 152)),
    (3, 1): TileLayout((0, 32, 96, 128), (0, 64)),
}
FAST_GRID = (1, 2)
FAST_CASES = ("segformer_model-heads1234-sdpa-fp64",)  # the fast tier's SR attention (all-to-all, heads 1-4)


class ReducedKVAttention(nn.Module):
    """Queries on every token, K = V on the grid of a stride-2 conv, through SDPA with
    attention dropout or a mask (both refused: dropout masks would differ per tile,
    a mask over reduced keys is not sharded like anything SPIM knows)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.sr = nn.Conv2d(3, 3, 2, 2)

    def forward(self, x):
        q = x.flatten(2).transpose(1, 2).unsqueeze(1)
        kv = self.sr(x).flatten(2).transpose(1, 2).unsqueeze(1)
        if self.mode == "dropout":
            return F.scaled_dot_product_attention(q, kv, kv, dropout_p=0.1)
        return F.scaled_dot_product_attention(q, kv, kv, attn_mask=torch.zeros(q.shape[2], kv.shape[2]))


REFUSED = {"dropout": "attention dropout > 0", "mask": "attn_mask with keys/values on another token grid"}


def _run_grid(grid, names):
    """The cases ``names`` (those the run selected) and the refusals on ``grid``, in one spawn."""
    cases = {k: c for k, c in CASES.items() if k in names}
    reports = train_step_reports(grid, {k: c for k, c in cases.items() if not k.startswith("segmentor")}, LAYOUTS,
                                 3, seed=3, align=ALIGN)
    reports.update(train_step_reports(grid, {k: c for k, c in cases.items() if k.startswith("segmentor")}, LAYOUTS,
                                      6, seed=3, align=ALIGN))
    reports.update(train_step_reports(grid, {f"refused-{m}": (functools.partial(ReducedKVAttention, m),
                                                              torch.float32, 1) for m in REFUSED},
                                      LAYOUTS, 3, seed=3, align=ALIGN))
    return reports


@pytest.fixture(scope="module", params=grid_params(LAYOUTS, FAST_GRID))
def grid_reports(request):
    return request.param, run_grid(_run_grid, request.param, selected(request, "case", grid_reports=request.param))


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c in FAST_CASES else pytest.mark.slow) for c in CASES])
def test_sr_attention_model_exact(grid_reports, case):
    grid, reports = grid_reports
    factory, dtype, _ = CASES[case]
    rep = reports[case]
    assert rep.refused is None, rep.refused
    assert rep.grid == grid
    model = factory()
    params = [n for n, _ in model.named_parameters()]
    expected = {"input grad"} | {f"grad {n}" for n in params} | {f"param after step {n}" for n in params}
    missing = expected - set(rep.errors)
    assert not missing, sorted(missing)[:10]
    assert any(k.startswith("output") for k in rep.errors)
    zero = _zero_grad_params(case, model)
    assert all(n in params for n in zero)
    checked = {k: v for k, v in rep.errors.items() if not (k.startswith("grad ") and k[5:] in zero)}
    bad = {k: v for k, v in checked.items() if not v <= TOL[dtype]}
    worst = max(checked, key=checked.get)
    print(f"{grid[0]}x{grid[1]} {case}: max rel error {checked[worst]:.2e} ({worst}) over {len(checked)} tensors; "
          f"bytes {rep.comm_bytes}")
    assert not bad, f"{len(bad)} of {len(checked)} above {TOL[dtype]}: " + ", ".join(
        f"{k}={v:.2e}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:8])
    if "_li" in case:
        # K/V come from the replicated 7x7 pool: attention needs no token exchange
        assert "all_to_all" not in rep.comm_bytes, rep.comm_bytes
    else:
        assert rep.comm_bytes.get("all_to_all", 0) > 0, rep.comm_bytes


@pytest.mark.parametrize("mode", list(REFUSED))
def test_reduced_kv_attention_refusals(grid_reports, mode):
    _, reports = grid_reports
    msg = reports[f"refused-{mode}"].refused
    assert msg is not None and REFUSED[mode] in msg and "scaled_dot_product_attention" in msg, msg
