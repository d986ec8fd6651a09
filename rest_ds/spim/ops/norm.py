"""Normalisation layers: batch, group, instance, layer and RMS norm.

Statistics that span the scene (batch norm in training, group and instance
norm) are computed over the *whole* scene: each rank sums its tile, an
all-reduce over the sp group gives the global sum, and the variance is a second
pass over the squared deviations from the global mean (two passes, not
E[x^2] - E[x]^2, so fp32 keeps its accuracy). The statistics are then
replicated, every rank normalises its own tile, and running statistics are
updated identically on every rank. Normalisation and affine transform are one
autograd op that saves only its input and the statistics, as torch's native
kernels do; its backward all-reduces the two sums of the fused normalisation
backward (see :class:`_NormAffine`); batch norm of fp32/fp64 maps runs on
torch's native kernels (:class:`_BatchNormScene`), and so do group and instance
norm (:class:`_GroupNormScene`: the tile's moments from the group norm kernel,
then one batch norm with the group statistics per channel, in the tile's own
layout for one sample). Norms over non-sharded dims
(LayerNorm over channels after a permute, as in ConvNeXt) and batch norm in
eval mode are local.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import context
from ..comm import all_gather_equal, all_reduce_, start_all_reduce_
from ..errors import SPIMError
from ..halo import dense_grad
from ..tensor import SpatialTensor, register, wrap


def bind_args(func_name: str, names: tuple[str, ...], defaults: dict, args, kwargs) -> dict:
    """Map a functional's positional and keyword arguments to names (defaults filled in)."""
    if len(args) > len(names):
        raise TypeError(f"{func_name}() takes at most {len(names)} positional arguments ({len(args)} given)")
    out = dict(defaults)
    out.update(zip(names, args))
    for k, v in kwargs.items():
        if k not in names:
            raise TypeError(f"{func_name}() got an unexpected keyword argument '{k}'")
        out[k] = v
    missing = [n for n in names if n not in out]
    if missing:
        raise TypeError(f"{func_name}() missing required argument(s) {missing}")
    return out


def _plain(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if isinstance(t, SpatialTensor):
            raise context.unsupported(op, f"a spatially sharded {name}")


def _stat_dtype(t: torch.Tensor) -> torch.dtype:
    # reduced-precision inputs get fp32 statistics, as torch's kernels do
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _chunked(t: torch.Tensor, dims: tuple[int, ...]):
    """Split ``t`` along its largest kept (non-reduced) dim into about 8 pieces:
    per-piece temporaries then stay a fraction of the activation. Yields
    (dim, start, length), or (None, 0, 0) once when there is nothing to split."""
    kept = [i for i in range(t.dim()) if i not in dims and t.shape[i] > 1]
    if not kept:
        yield None, 0, 0
        return
    k = max(kept, key=lambda i: t.shape[i])
    step = -(-t.shape[k] // 8)
    for s in range(0, t.shape[k], step):
        yield k, s, min(step, t.shape[k] - s)


def _piece(t: torch.Tensor, k, s: int, n: int) -> torch.Tensor:
    return t if k is None or t.shape[k] == 1 else t.narrow(k, s, n)


def _sum_of(fn, t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``fn(piece).sum(dims, keepdim=True)`` in fp64 over ``t``'s pieces (see
    :func:`_chunked`), concatenated: the sum of an elementwise expression
    without an activation-size temporary."""
    parts, cat_dim = [], None
    for k, s, n in _chunked(t, dims):
        cat_dim = k
        parts.append(fn(k, s, n).sum(dims, keepdim=True, dtype=torch.float64))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=cat_dim)


def _tile_weights(spec, device) -> torch.Tensor:
    """(sp,) fp64: each sp rank's share of the scene's pixels, in sp order (its tile
    area over the scene's; the tiles' other dims are the same on every rank): what
    a tile's statistics weigh in the scene's. From the layout alone (a constant of it)."""
    return _layout_weights(spec.rows, spec.cols, spec.mesh.grid, device)


@functools.lru_cache(maxsize=1024)
def _layout_weights(rows, cols, grid, device) -> torch.Tensor:
    pw = grid[1]
    areas = [(rows[r + 1] - rows[r]) * (cols[c + 1] - cols[c])
             for r, c in (divmod(i, pw) for i in range(grid[0] * grid[1]))]
    return torch.tensor(areas, dtype=torch.float64, device=device) / (rows[-1] * cols[-1])


def _scene_moments(parts: torch.Tensor, weights: torch.Tensor, eps: float, mesh) -> torch.Tensor:
    """(3, K) fp64 [mean, biased var, 1 / sqrt(var + eps)] of K groups over the
    whole scene, replicated, from this tile's (2, K) [mean, biased var] of each
    group (any float dtype) and ``weights`` (:func:`_tile_weights`). One
    all-gather; the tiles' moments combined in fp64 by Chan's parallel formula
    (the weighted mean, then ``sum_i w_i (v_i + (m_i - mean)^2)``: no E[x^2] -
    E[x]^2 cancellation), identically on every rank."""
    # few ops on these (sp, 2, K) vectors: each small op costs a few us of fixed CPU, and this
    # runs in every group/instance norm forward (~30 us -> ~15 us per call)
    m, v = all_gather_equal(parts, mesh).double().unbind(1)  # (sp, K) each, fresh
    mean = weights @ m
    var = weights @ (m - mean).square_().add_(v)
    var.clamp_min_(0)
    return torch.stack([mean, var, (var + eps).rsqrt_()])


class _NormAffine(torch.autograd.Function):
    """``y = (t - mean) * invstd * weight + bias``, mean and biased var over
    ``dims`` of the whole scene (``count`` elements over all sp tiles), as one
    op. ``x`` is this rank's tile in the statistics layout; ``t`` is ``x`` in
    the statistics dtype ``sdt``; ``weight``/``bias`` (or None) broadcast
    against ``x``. Also returns the replicated mean (``sdt``) and sum of squared
    deviations (fp64), with kept dims, not differentiable (running stats).

    Memory: like torch's native kernels it saves its input plus per-group
    statistics; no normalised copy is kept and no activation-size temporary
    is made beyond the output (sums over elementwise expressions run over
    slices). The backward recomputes ``x_hat`` and applies the fused formula
    ``invstd * (gh - mean(gh) - x_hat * mean(gh * x_hat))`` with ``gh = g * weight``
    and whole-scene means (one all-reduce of both sums, like SyncBatchNorm)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dims, count, eps, mesh, sdt):
        t = x.to(sdt)
        # sums accumulate in fp64 (as torch's CPU batch norm does): the statistics
        # of a whole scene are sums of millions of values; two passes (global
        # mean, then squared deviations from it) keep fp32 accurate
        mean = (all_reduce_(t.sum(dims, keepdim=True, dtype=torch.float64), mesh) / count).to(sdt)
        ssd = all_reduce_(_sum_of(lambda k, s, n: (_piece(t, k, s, n) - _piece(mean, k, s, n)).square_(), t, dims),
                          mesh)
        invstd = (1.0 / torch.sqrt(ssd / count + eps)).to(sdt)
        y = (t - mean).mul_(invstd)
        del t
        if weight is not None:
            y.mul_(weight.to(sdt))
        if bias is not None:
            y.add_(bias.to(sdt))
        ctx.save_for_backward(x, mean, invstd, weight)
        pshape = weight.shape if weight is not None else (bias.shape if bias is not None else x.shape)
        ctx.cfg = (dims, count, mesh, sdt, bias is not None, pshape, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(mean, ssd)
        return y.to(x.dtype), mean, ssd

    @staticmethod
    def backward(ctx, g, _g_mean, _g_ssd):
        x, mean, invstd, weight = ctx.saved_tensors
        dims, n, mesh, sdt, has_bias, pshape, bias_dtype = ctx.cfg
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g = g.to(sdt)
        x_hat = (x.to(sdt) - mean).mul_(invstd)
        # weight/bias gradients sum over the dims where they broadcast (this
        # tile's part: convention P, the sum over sp ranks is the gradient)
        wdims = tuple(i for i in range(x.dim()) if pshape[i] == 1)
        w_flat = weight is None or all(weight.shape[i] == 1 for i in dims)  # one weight per statistics group
        gw = gb = gx = None

        def dot(a, k, s, m):
            return _piece(a, k, s, m) * _piece(x_hat, k, s, m)

        if need_w and weight is not None:
            gw = _sum_of(lambda k, s, m: dot(g, k, s, m), g, wdims)
        if need_b and has_bias:
            gb = g.sum(wdims, keepdim=True, dtype=torch.float64)
        if need_x:
            gh = g if w_flat else g * weight.to(sdt)
            s1 = gb if (gb is not None and wdims == dims and gh is g) else gh.sum(dims, keepdim=True,
                                                                                   dtype=torch.float64)
            s2 = gw if (gw is not None and wdims == dims and gh is g) else _sum_of(
                lambda k, s, m: dot(gh, k, s, m), gh, dims)
            sums = all_reduce_(torch.stack([s1, s2]), mesh)  # gh is this tile's part of the scene's gradient
            scale = invstd if (weight is None or not w_flat) else invstd * weight.to(sdt)
            gx = x_hat.mul_(-(sums[1] / n).to(sdt)).add_(gh).sub_((sums[0] / n).to(sdt)).mul_(scale)
            gx = gx.to(x.dtype)
        if gw is not None:
            gw = gw.to(weight.dtype)
        if gb is not None:
            gb = gb.to(bias_dtype)
        return gx, gw, gb, None, None, None, None, None


class _BatchNormScene(torch.autograd.Function):
    """Training-mode batch norm of an (N, C, ...) tile with whole-scene
    statistics, on torch's native kernels (the fast path of ``F.batch_norm``
    for fp32/fp64 inputs; same contract as :func:`norm_affine` with
    per-channel ``weight``/``bias`` of shape (C,) or None).

    Forward: per-tile mean and biased variance (``torch.batch_norm_update_stats``,
    one pass), gathered from the sp group in one collective and combined in fp64
    by Chan's parallel formula (global mean, then ``sum_i n_i (v_i + (m_i -
    mean)^2)``: no E[x^2] - E[x]^2 cancellation), and the native eval-mode
    kernel with those statistics, which is the training-mode formula.

    Backward: the native backward gives this tile's sums of ``g`` and
    ``g * x_hat`` in one pass; their all-reduce is posted and overlaps the pass
    ``g * weight * invstd``; then the whole-scene correction
    ``- weight * invstd * (S_g + x_hat S_gx) / N`` in two more passes."""

    @staticmethod
    def forward(ctx, x, weight, bias, count, eps, mesh):
        n_local = x.numel() // x.shape[1]
        mean_l, var_l = torch.batch_norm_update_stats(x, None, None, 0.0)
        # one collective: every tile's (count, mean, M2), combined identically on every rank
        n_i, m_i, v_i = all_gather_equal(
            torch.stack([torch.full_like(mean_l, n_local), mean_l, var_l]).double(), mesh).unbind(1)
        mean = (n_i * m_i).sum(0) / count
        ssd = (n_i * (v_i + (m_i - mean).square())).sum(0)
        mean_x, var_x = mean.to(x.dtype), (ssd / count).to(x.dtype)
        y = F.batch_norm(x, mean_x, var_x, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean_x, var_x)
        ctx.cfg = (count, eps, mesh, bias is not None)
        ctx.mark_non_differentiable(mean, ssd)
        return y, mean, ssd

    @staticmethod
    def backward(ctx, g, _g_mean, _g_ssd):
        x, weight, mean_x, var_x = ctx.saved_tensors
        count, eps, mesh, has_bias = ctx.cfg
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        invstd = torch.rsqrt(var_x.double() + eps)
        # this tile's sums of g * x_hat and g (convention P), one pass. The training-mode
        # form with the whole-scene statistics as the saved ones: CUDA's eval-mode
        # backward asserts when grad_input is not asked for
        _, gw, gb = torch.ops.aten.native_batch_norm_backward(
            dense_grad(g, x), x, weight, None, None, mean_x, invstd.to(x.dtype), True, eps, [False, True, True])
        if need_x:
            shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
            # the sums travel while this tile's g * weight * invstd is computed
            wait = start_all_reduce_(torch.stack([gb, gw]).double(), mesh)
            scale = invstd if weight is None else invstd * weight.double()
            gx = g * scale.to(x.dtype).view(shape)
            sums = wait()
            c_g = scale * sums[0] / count
            c_x = scale * invstd * sums[1] / count
            # - c_x (x - mean) - c_g as x * alpha + beta, the form of torch's own batch
            # norm kernels: two passes over gx, no temporary
            gx.addcmul_(x, (-c_x).to(x.dtype).view(shape)).sub_((c_g - c_x * mean_x.double()).to(x.dtype).view(shape))
        return (gx if need_x else None, gw if (need_w and weight is not None) else None,
                gb if (need_b and has_bias) else None, None, None, None)


class _GroupNormScene(torch.autograd.Function):
    """Group norm of an (N, C, ...) tile ``x`` (any memory format) over each
    (sample, group)'s channels and the whole scene, with the per-channel affine,
    on torch's native kernels (fp32/fp64; ``weight``/``bias`` of shape (C,) or
    None; ``weights``: :func:`_tile_weights` of the layout for C // groups);
    returns (y, shaped like ``x``, in its memory format; st: the (3, N*G) fp64
    [mean, biased var, invstd] of the groups, replicated, not differentiable).

    Forward: the tile's moments in one pass (NCHW: per group, torch's group
    norm kernel; channels-last: per (sample, channel), batch norm's statistics
    kernel, the faster one in each layout), combined per group and over the sp
    group by :func:`_scene_moments` (one all-gather), then ONE pass ``x * alpha
    + beta`` with per-(sample, channel) ``alpha = invstd * w``, ``beta = b -
    mean * alpha`` (the form of torch's own group norm kernel) in ``x``'s layout
    (NCHW: the eval batch norm kernel of ``x`` or its (1, N*C, -1) view).
    Saves its input and the statistics only.

    Backward: the native batch-norm backward of ``x`` (one sample) or its
    (1, N*C, -1) view gives this tile's
    per-(sample, channel) sums of ``g`` and ``g * x_hat`` in one pass (the bias
    and weight gradients, convention P); their weight-scaled per-group sums are
    all-reduced while ``g * w * invstd`` is computed, then the whole-scene
    correction in two more passes (as :class:`_BatchNormScene`).

    No view crosses the Function's boundary: ``y`` is returned in ``x``'s shape
    (a view made outside would turn the in-place ReLU that follows a norm into
    CopySlices / AsStridedBackward nodes: a full-size copy and clone per norm in
    backward, which torch's own group norm does not make)."""

    @staticmethod
    def forward(ctx, x, weight, bias, N, groups, count, eps, mesh, weights):
        C = x.shape[1]
        rep = C // groups
        # torch's CPU kernels differ by layout: channels-last, batch norm's statistics and a
        # broadcast addcmul run ~10x / 2x faster than the group norm and eval batch norm kernels;
        # NCHW, the reverse (~6x / 2.5x)
        cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        # The layout picks the kernel only: every rank gathers the same (2, N*G) fp64 group [mean,
        # biased var] of its tile. Tiles' layouts can differ between ranks (a 1 x 1 tile is NCHW and
        # channels-last at once; an op before may have taken another path there), and one
        # all-gather of per-group moments from some ranks and per-channel ones from others mixed
        # them silently (float64 errors of order 1)
        if not cl:  # the tile's group moments from torch's group norm kernel, one pass
            _, mean_l, rstd_l = torch.ops.aten.native_group_norm(x, None, None, N, C, x.numel() // (N * C),
                                                                 groups, eps)
            parts = torch.stack([mean_l.view(-1), rstd_l.view(-1)]).double()
            parts[1].pow_(-2).sub_(eps)  # var back from rstd (the error is relative to var + eps)
        else:  # the tile's per-(sample, channel) moments, one pass per sample in its own layout
            if N == 1:
                parts = torch.stack(torch.batch_norm_update_stats(x, None, None, 0.0))
            else:
                per = [torch.batch_norm_update_stats(x[i:i + 1], None, None, 0.0) for i in range(N)]
                parts = torch.stack([torch.cat([m for m, _ in per]), torch.cat([v for _, v in per])])
            # per group: the mean of its channels' means and variances plus their spread (every
            # channel of a tile has as many elements)
            m, v = parts.double().view(2, N * groups, rep).unbind(0)
            mean_g = m.mean(1)
            parts = torch.stack([mean_g, (m - mean_g[:, None]).square_().add_(v).mean(1)])
        st = _scene_moments(parts, weights, eps, mesh)
        # (3, N*C) per-(sample, channel) [mean, var, invstd] in x's dtype: one cast, one repeat
        stg = st.to(x.dtype)
        stc = stg.repeat_interleave(rep, 1) if rep > 1 else stg
        # y = x * alpha + beta per (sample, channel), alpha = invstd * w, beta = b - mean * alpha:
        # the form of torch's own group norm kernel, one pass in x's layout
        if cl:
            alpha = stc[2] if weight is None else stc[2] * _per_sample(weight, N)
            beta = torch.mul(stc[0], alpha).neg_() if bias is None else \
                torch.addcmul(_per_sample(bias, N), stc[0], alpha, value=-1)
            cshape = (N, C) + (1,) * (x.dim() - 2)
            y = torch.addcmul(beta.view(cshape), x, alpha.view(cshape))
        else:  # the eval batch norm kernel of x (one sample) or its (1, N*C, -1) view
            y = F.batch_norm(_bn_view(x, N), stc[0], stc[1], _per_sample(weight, N), _per_sample(bias, N),
                             False, 0.0, eps)
            if N > 1:  # the (1, N*C, -1) result is contiguous: x's shape without making y a view
                y = torch.ops.aten._unsafe_view(y, x.shape)
        ctx.save_for_backward(x, weight, stc, stg)
        ctx.cfg = (N, groups, count, eps, mesh, bias is not None)
        ctx.mark_non_differentiable(st)
        return y, st

    @staticmethod
    def backward(ctx, g, _g_st):
        x, weight, stc, stg = ctx.saved_tensors
        N, groups, count, eps, mesh, has_bias = ctx.cfg
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        C = x.shape[1]
        rep = C // groups
        xc = _bn_view(x, N)
        gc = _bn_view(dense_grad(g, x), N)
        shape = [1, N * C] + [1] * (xc.dim() - 2)  # per-channel vectors against xc
        # this tile's per-(sample, channel) sums of g * x_hat and g, one pass
        _, s_gx, s_g = torch.ops.aten.native_batch_norm_backward(
            gc, xc, None, None, None, stc[0], stc[2], True, eps, [False, True, True])
        gx = gw = gb = None
        if need_x:
            # the gradient the normalisation sees is g * w: its per-group sums over the scene (fp64)
            w = None if weight is None else _per_sample(weight, N)
            sg = torch.stack([s_g, s_gx])
            sg = sg if w is None else sg.mul_(w)
            wait = start_all_reduce_(sg.view(2, N * groups, rep).sum(2, dtype=torch.float64), mesh)
            gx = gc * (stc[2] if w is None else stc[2] * w).view(shape)
            # in fp64 from the statistics in x's dtype, the ones x_hat of the forward and of the
            # native backward's sums used (a mean rounded differently shifts x_hat by a constant:
            # an error that grows with |mean| / std)
            co = wait().mul_(stg[2]).div_(count)  # [c_g, c_x / invstd] = invstd [S_g, S_gx] / n
            co[1].mul_(stg[2])
            # invstd (g w - S_g / n - x_hat S_gx / n) = g w invstd + x alpha + beta, alpha = -c_x,
            # beta = c_x mean - c_g: two passes, no temporary
            co[0].neg_().addcmul_(co[1], stg[0])
            co[1].neg_()
            co = co.to(xc.dtype)
            co = co.repeat_interleave(rep, 1) if rep > 1 else co
            gx.addcmul_(xc, co[1].view(shape)).add_(co[0].view(shape))
            gx = gx.view(x.shape) if N > 1 else gx
        if need_w and weight is not None:
            gw = s_gx if N == 1 else s_gx.view(N, C).sum(0)
        if need_b and has_bias:
            gb = s_g if N == 1 else s_g.view(N, C).sum(0)
        return gx, gw, gb, None, None, None, None, None, None


def _bn_view(t: torch.Tensor, n: int) -> torch.Tensor:
    """The tensor whose batch-norm channels are the (sample, channel) pairs of an
    (n, C, ...) tile: the tile itself for one sample, else its (1, n*C, -1)
    view (a copy when the layout does not allow a view, e.g. channels-last)."""
    return t if n == 1 else t.reshape(1, n * t.shape[1], -1)


def _per_sample(p: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A per-channel parameter repeated for ``n`` samples (the (N*C,) channels of a
    (1, N*C, -1) view); itself for one sample (no copy)."""
    return p if p is None or n == 1 else p.repeat(n)


def norm_affine(x: torch.Tensor, weight, bias, dims: tuple[int, ...], count: int, eps: float, mesh):
    """(y, mean, ssd): ``x`` normalised over ``dims`` of the whole scene
    (``count`` elements over all sp tiles), times ``weight`` plus ``bias`` (None
    or tensors broadcasting against ``x``), in ``x.dtype``; the mean and the
    fp64 sum of squared deviations, both with kept dims, are replicated.
    Statistics and arithmetic run in fp32 for reduced-precision inputs.
    Differentiable in ``x``, ``weight`` and ``bias``."""
    return _NormAffine.apply(x, weight, bias, tuple(dims), int(count), float(eps), mesh, _stat_dtype(x))


def _check_channel_layout(x: SpatialTensor, op: str) -> None:
    if len(x._spec.dims) != 2:
        raise context.unsupported(op, "statistics over a token-layout tensor (sharded dims "
                                      f"{x._spec.dims}); normalise the (N, C, H, W) feature map")
    if x.dim() < 3 or min(x._spec.dims) < 2:
        raise context.unsupported(
            op, f"the sharded dims {x._spec.dims} must come after the batch and channel dims (N, C, ...) "
            f"of the global shape {tuple(x.shape)}")


def _param_view(p, shape):
    return None if p is None else p.reshape(shape)


@register(F.batch_norm)
def _batch_norm(func, args, kwargs):
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    a = bind_args("batch_norm", names, {"weight": None, "bias": None, "training": False, "momentum": 0.1,
                                         "eps": 1e-5}, args, kwargs)
    x = a["input"]
    rm, rv, w, b = a["running_mean"], a["running_var"], a["weight"], a["bias"]
    _plain("batch_norm", running_mean=rm, running_var=rv, weight=w, bias=b)
    if not isinstance(x, SpatialTensor):
        raise context.unsupported("batch_norm", "a sharded tensor as a secondary argument")
    if not (x._spec.is_tokens and x._spec.dims[0] != 1 and not x._spec.prefix and x.dim() >= 2):
        # a token-layout tensor sharded on a dim other than channels, every token a sample of
        # the statistics (LeViT's BatchNorm1d over (B * N, C)): the same whole-scene rule
        _check_channel_layout(x, "batch_norm")
    spec, loc = x._spec, x._local
    if not a["training"] and rm is not None and rv is not None:
        # eval mode with running statistics: per pixel, no communication
        return wrap(F.batch_norm(loc, rm, rv, w, b, False, a["momentum"], a["eps"]), spec)
    F._verify_batch_size(x.shape)  # same ValueError as on one device, from the global shape
    dims = (0,) + tuple(range(2, x.dim()))
    count = x.numel() // x.shape[1]
    shape = [1, loc.shape[1]] + [1] * (loc.dim() - 2)
    if loc.dtype in (torch.float32, torch.float64) and all(p is None or p.dtype == loc.dtype for p in (w, b)):
        y, mean, ssd = _BatchNormScene.apply(loc, w, b, count, float(a["eps"]), spec.mesh)
    else:  # reduced precision (fp32 statistics) or mixed dtypes: the generic fused op
        y, mean, ssd = norm_affine(loc, _param_view(w, shape), _param_view(b, shape), dims, count, a["eps"],
                                   spec.mesh)
    momentum = a["momentum"] if a["momentum"] is not None else 0.0
    with torch.no_grad():
        if rm is not None:
            rm.mul_(1 - momentum).add_(mean.reshape(-1).to(rm.dtype), alpha=momentum)
        if rv is not None:
            rv.mul_(1 - momentum).add_((ssd.reshape(-1) / (count - 1)).to(rv.dtype), alpha=momentum)
    return wrap(y, spec)


def _group_stats_norm(x: SpatialTensor, groups: int, weight, bias, eps: float, op: str, stats: bool = True):
    """Normalise per (sample, group) over the group's channels and the whole
    scene, then apply the per-channel ``weight``/``bias`` (or None).
    Returns (local result, group mean (B, G), unbiased group var (B, G)); the
    statistics may be None when ``stats`` is False (not asked for). A token-layout
    ``x`` sharded after its batch and channel dims (MobileViTv2's GroupNorm(1, C)
    over unfolded patches ``(B, C, P, N)``) is normalised by the same whole-scene
    sums (the generic fused op: every element but the prefix tokens, which a
    token layout with them would count on every rank, is on one rank only)."""
    s = x._spec
    tokens = s.is_tokens and min(s.dims) >= 2 and not s.prefix
    if not tokens:
        _check_channel_layout(x, op)
    loc = x._local
    B, C = loc.shape[0], loc.shape[1]
    if C % groups:
        raise SPIMError(f"{context.where()}: {op}: {C} channels are not divisible by num_groups={groups}")
    count = (C // groups) * (x.numel() // (x.shape[0] * C))
    if not tokens and loc.dtype in (torch.float32, torch.float64) and all(
            p is None or p.dtype == loc.dtype for p in (weight, bias)):
        # torch's native batch-norm kernels with whole-scene group statistics and the affine
        # folded in (_GroupNormScene: two passes forward, four backward)
        y, st = _GroupNormScene.apply(loc, weight, bias, B, groups, count, float(eps), x._spec.mesh,
                                      _tile_weights(x._spec, loc.device))
        if not stats:
            return y, None, None
        unbiased = st[1] * (count / (count - 1)) if count > 1 else torch.full_like(st[1], float("nan"))
        return y, st[0].reshape(B, groups).to(loc.dtype), unbiased.reshape(B, groups)
    t = loc.reshape(B, groups, C // groups, -1)
    shape = (1, groups, C // groups, 1)
    y, mean, ssd = norm_affine(t, _param_view(weight, shape), _param_view(bias, shape), (2, 3), count, eps,
                               x._spec.mesh)
    y = y.reshape(loc.shape)
    unbiased = ssd / (count - 1) if count > 1 else torch.full_like(ssd, float("nan"))
    return y, mean.reshape(B, groups), unbiased.reshape(B, groups)


@register(F.group_norm)
def _group_norm(func, args, kwargs):
    names = ("input", "num_groups", "weight", "bias", "eps")
    a = bind_args("group_norm", names, {"weight": None, "bias": None, "eps": 1e-5}, args, kwargs)
    x, w, b = a["input"], a["weight"], a["bias"]
    _plain("group_norm", weight=w, bias=b)
    if not isinstance(x, SpatialTensor):
        raise context.unsupported("group_norm", "a sharded tensor as a secondary argument")
    G = int(a["num_groups"])
    if x.dim() >= 2 and G > 0 and x.shape[1] % G == 0:
        F._verify_batch_size([x.shape[0] * x.shape[1] // G, G] + list(x.shape[2:]))
    y, _, _ = _group_stats_norm(x, G, w, b, a["eps"], "group_norm", stats=False)
    return wrap(y, x._spec)


@register(F.instance_norm)
def _instance_norm(func, args, kwargs):
    names = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
    a = bind_args("instance_norm", names, {"running_mean": None, "running_var": None, "weight": None,
                                            "bias": None, "use_input_stats": True, "momentum": 0.1,
                                            "eps": 1e-5}, args, kwargs)
    x = a["input"]
    rm, rv, w, b = a["running_mean"], a["running_var"], a["weight"], a["bias"]
    _plain("instance_norm", running_mean=rm, running_var=rv, weight=w, bias=b)
    if not isinstance(x, SpatialTensor):
        raise context.unsupported("instance_norm", "a sharded tensor as a secondary argument")
    _check_channel_layout(x, "instance_norm")
    if not a["use_input_stats"]:
        return wrap(F.instance_norm(x._local, rm, rv, w, b, False, a["momentum"], a["eps"]), x._spec)
    F._verify_spatial_size(x.shape)
    y, mean, var = _group_stats_norm(x, x.shape[1], w, b, a["eps"], "instance_norm")
    m = a["momentum"] if a["momentum"] is not None else 0.0
    with torch.no_grad():
        # torch runs batch norm on (1, B*C, ...) with the running stats repeated B
        # times, then stores the mean over B of the updated copies
        if rm is not None:
            rm.copy_(((1 - m) * rm.unsqueeze(0) + m * mean.to(rm.dtype)).mean(0))
        if rv is not None:
            rv.copy_(((1 - m) * rv.unsqueeze(0) + m * var.to(rv.dtype)).mean(0))
    return wrap(y, x._spec)


def _last_dims_norm(func, args, kwargs, op, names, defaults):
    a = bind_args(op, names, defaults, args, kwargs)
    x = a["input"]
    _plain(op, weight=a.get("weight"), bias=a.get("bias"))
    if not isinstance(x, SpatialTensor):
        raise context.unsupported(op, "a sharded tensor as a secondary argument")
    shape = a["normalized_shape"]
    k = 1 if isinstance(shape, int) else len(shape)
    covered = set(range(x.dim() - k, x.dim()))
    if covered & set(x._spec.dims):
        raise context.unsupported(
            op, f"normalized_shape {tuple([shape] if isinstance(shape, int) else shape)} covers the sharded "
            f"dims {x._spec.dims} of the global shape {tuple(x.shape)}; normalise over channels "
            f"(channels-last after a permute) instead")
    local_args = {n: a[n] for n in names if n != "input"}
    return wrap(func(x._local, **local_args), x._spec)


@register(F.layer_norm)
def _layer_norm(func, args, kwargs):
    return _last_dims_norm(F.layer_norm, args, kwargs, "layer_norm",
                           ("input", "normalized_shape", "weight", "bias", "eps"),
                           {"weight": None, "bias": None, "eps": 1e-5})


@register(getattr(F, "rms_norm", None))
def _rms_norm(func, args, kwargs):
    return _last_dims_norm(F.rms_norm, args, kwargs, "rms_norm",
                           ("input", "normalized_shape", "weight", "eps"), {"weight": None, "eps": None})
