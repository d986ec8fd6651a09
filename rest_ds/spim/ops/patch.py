"""Patch embeddings over more than two dims: ``F.conv3d`` with kernel == stride
on the sharded dims (a video/multi-temporal ViT's tubelet embedding, e.g.
Prithvi-EO's ``Conv3d(C, D, (t, p, p), stride=(t, p, p))``).

With every tile border on the patch grid, each patch lies in one tile: the
conv is local and the partition divides by the patch size. (2-D convs of any
shape go through the halo rules in window.py.)

``F.unfold`` / ``F.fold`` with kernel == stride (no padding, no dilation):
non-overlapping patches, MobileViTv2's (transformers) patch unfolding
``(B, C, H, W) -> (B, C*kh*kw, H/kh * W/kw)`` and back. With tile borders on the
patch grid each patch lies in one tile, and the tile's patches in tile raster
order are its part of a token layout on the patch grid: both are local.
Overlapping or padded ``F.unfold`` windows fetch a conv's halo (the window plan of
window.py) and unfold the extended tile: a token layout on the output grid.
Overlapping ``F.fold`` (VOLO's outlook attention adds the windows back onto the
neighbours' pixels) is refused. ``nn.Unfold`` / ``nn.Fold`` call these.

``F.pixel_shuffle`` / ``F.pixel_unshuffle`` (sub-pixel upsampling: Swin2SR, ESPCN
heads; space-to-depth stems): every output pixel comes from one input pixel's
channels (shuffle) or one r x r block (unshuffle, tile borders on the block grid),
so both are local and scale the partition by r."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import context
from ..tensor import SpatialTensor, Spec, funcs_named, register, wrap


def _triple(v):
    return (v,) * 3 if isinstance(v, int) else tuple(int(a) for a in v)


@register(F.conv3d)
def _conv3d(func, args, kwargs):
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    a = dict(zip(names, args))
    a.update(kwargs)
    x, w = a["input"], a["weight"]
    if not isinstance(x, SpatialTensor) or isinstance(w, SpatialTensor) or isinstance(a.get("bias"), SpatialTensor):
        raise context.unsupported("conv3d", "a sharded weight or bias")
    spec = x._spec
    if spec.is_tokens or x.dim() != 5 or not set(spec.dims) <= {2, 3, 4}:
        raise context.unsupported("conv3d", f"sharded dims {spec.dims} are not two of the spatial dims of "
                                  "(N, C, D1, D2, D3)")
    k = tuple(w.shape[-3:])
    s = _triple(a.get("stride", 1))
    p = a.get("padding", 0)
    if isinstance(p, str):
        raise context.unsupported("conv3d", f"padding='{p}'")
    p, d = _triple(p), _triple(a.get("dilation", 1))
    patch = spec.dims == (3, 4) and k[1:] == s[1:] and p[1:] == (0, 0) and d[1:] == (1, 1)
    u = ({2, 3, 4} - set(spec.dims)).pop()  # the spatial dim that is not sharded
    if not patch and (k[u - 2], s[u - 2], p[u - 2]) == (1, 1, 0):
        return _per_slice_conv2d(x, w, a.get("bias"), u, s, p, d, a.get("groups", 1))
    if spec.dims != (3, 4):
        raise context.unsupported("conv3d", f"sharded dims {spec.dims} with kernel {k}, stride {s}, padding {p} "
                                  f"along the unsharded dim {u} (only 1, 1, 0 there, or a patch embedding)")
    if k[1:] != s[1:] or p[1:] != (0, 0) or d[1:] != (1, 1):
        raise context.unsupported(
            "conv3d", f"only patch embeddings are supported: kernel == stride, no padding or dilation on the "
            f"sharded dims (got kernel {k}, stride {s}, padding {p}, dilation {d})")
    for part, step, axis in ((spec.rows, s[1], "row"), (spec.cols, s[2], "column")):
        if any(b % step for b in part[1:-1]):
            raise context.unsupported(
                "conv3d", f"{axis} tile borders {list(part)} are not on the {step}-px patch grid; align tiles to the patch size")
    H, W = spec.global_hw
    rows = tuple(b // s[1] for b in spec.rows[:-1]) + (H // s[1],)
    cols = tuple(b // s[2] for b in spec.cols[:-1]) + (W // s[2],)
    if any(b1 <= b0 for b0, b1 in zip(rows, rows[1:])) or any(b1 <= b0 for b0, b1 in zip(cols, cols[1:])):
        raise context.unsupported("conv3d", "a tile smaller than one patch")
    out = F.conv3d(x._local, w, a.get("bias"), s, p, d, a.get("groups", 1))
    return wrap(out, Spec(spec.mesh, spec.dims, rows, cols))


def _per_slice_conv2d(x: SpatialTensor, w, bias, u: int, s, p, d, groups: int):
    """A conv3d whose kernel along the unsharded spatial dim ``u`` is 1 (stride 1,
    no padding there) is a 2-D conv of every slice along ``u`` (LambdaNet's
    position lambdas: ``Conv3d(1, K, (r, r, 1))`` on (B, 1, H, W, V)): ``u`` is
    moved next to the batch and merged into it, the 2-D conv runs under the halo
    rules of window.py, and the result is put back in (N, C, D1, D2, D3) order."""
    g0, g1 = x._spec.dims
    order = (0, u, 1, g0, g1)
    N, Du = x.shape[0], x.shape[u]
    xt = x.permute(order)
    xt = xt.reshape(N * Du, *xt.shape[2:])
    sel = lambda t: (t[g0 - 2], t[g1 - 2])  # noqa: E731
    y = F.conv2d(xt, w.squeeze(u), bias, sel(s), sel(p), sel(d), groups)
    y = y.reshape(N, Du, *y.shape[1:])
    return y.permute([order.index(i) for i in range(5)])


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(int(a) for a in v)


def _patch_args(op: str, a: dict) -> tuple[int, int]:
    """The patch size of an unfold/fold call, refused unless kernel == stride, no padding, no dilation."""
    k, s = _pair(a["kernel_size"]), _pair(a.get("stride", 1))
    p, d = _pair(a.get("padding", 0)), _pair(a.get("dilation", 1))
    if k != s or p != (0, 0) or d != (1, 1):
        raise context.unsupported(op, f"overlapping or padded windows (kernel {k}, stride {s}, padding {p}, "
                                      f"dilation {d}) mix the sharded dims into channels; only non-overlapping "
                                      "patches (kernel == stride, no padding or dilation) are exact")
    return k


def _patch_grid(op: str, rows, cols, k) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The partitions of the patch grid; refused unless every tile border is on it."""
    for part, step, axis in ((rows, k[0], "row"), (cols, k[1], "column")):
        if any(b % step for b in part):
            raise context.unsupported(op, f"{axis} tile borders {list(part)} are not on the {step}-px patch grid; "
                                          "align tiles to the patch size")
    r, c = tuple(b // k[0] for b in rows), tuple(b // k[1] for b in cols)
    if any(b1 <= b0 for b0, b1 in zip(r, r[1:])) or any(b1 <= b0 for b0, b1 in zip(c, c[1:])):
        raise context.unsupported(op, "a tile smaller than one patch")
    return r, c


@register(F.unfold)
def _unfold_patches(func, args, kwargs):
    """``F.unfold`` of an (N, C, H, W) grid layout into non-overlapping patches:
    local; the result (N, C*kh*kw, L) is token-sharded on dim 2 over the patch grid."""
    a = dict(zip(("input", "kernel_size", "dilation", "padding", "stride"), args))
    a.update(kwargs)
    x = a["input"]
    op = "unfold"
    if not isinstance(x, SpatialTensor) or x.dim() != 4 or x._spec.dims != (2, 3):
        raise context.unsupported(op, "only a batched (N, C, H, W) map sharded on H and W")
    k, st = _pair(a["kernel_size"]), _pair(a.get("stride", 1))
    pd, dl = _pair(a.get("padding", 0)), _pair(a.get("dilation", 1))
    if k != st or pd != (0, 0) or dl != (1, 1):
        if dl != (1, 1):
            raise context.unsupported(op, f"dilation {dl}: only undilated windows are exact")
        # overlapping or padded windows: a conv's window plan (halo exchange, zero pads at the
        # scene border), then a local unfold of the extended tile; its columns are this rank's
        # output positions in tile raster order, a token layout over the output grid
        from .window import windowed
        H, W = x._spec.global_hw
        n_out = tuple((n + 2 * pp - kk) // ss + 1 for n, pp, kk, ss in zip((H, W), pd, k, st))
        ext, out_spec, _ = windowed(x, op, k, st, pd, n_out)
        return wrap(F.unfold(ext, k, stride=st), Spec(x._spec.mesh, (2,), out_spec.rows, out_spec.cols))
    # whole patches only (torch drops a remainder: on a tile that would drop pixels inside the scene)
    rows, cols = _patch_grid(op, x._spec.rows, x._spec.cols, k)
    return wrap(F.unfold(x._local, k, stride=k), Spec(x._spec.mesh, (2,), rows, cols))


@register(F.fold)
def _fold_patches(func, args, kwargs):
    """``F.fold`` of non-overlapping patches (N, C*kh*kw, L), token-sharded on dim 2
    over the patch grid (no prefix tokens), back to the (N, C, H, W) map of the
    whole scene's ``output_size``: local, grid-sharded on H and W."""
    a = dict(zip(("input", "output_size", "kernel_size", "dilation", "padding", "stride"), args))
    a.update(kwargs)
    x = a["input"]
    op = "fold"
    if not isinstance(x, SpatialTensor) or x.dim() != 3 or x._spec.dims != (2,):
        raise context.unsupported(op, "only a batched (N, C*kh*kw, L) tensor token-sharded on L")
    s = x._spec
    if s.prefix or s.lead != 1 or s.trail != 1:
        raise context.unsupported(op, "a token dim with prefix tokens or merged dims")
    k = _patch_args(op, a)
    out = _pair(a["output_size"])
    H, W = s.global_hw
    if out != (H * k[0], W * k[1]):
        raise context.unsupported(op, f"output_size {out} is not the patch grid {H} x {W} times the patch {k}")
    (r0, r1), (c0, c1) = s.row_range, s.col_range
    y = F.fold(x._local, ((r1 - r0) * k[0], (c1 - c0) * k[1]), k, stride=k)
    return wrap(y, Spec(s.mesh, (2, 3), tuple(b * k[0] for b in s.rows), tuple(b * k[1] for b in s.cols)))


@register(*funcs_named("pixel_shuffle", "pixel_unshuffle", owners=(torch, F)))
def _pixel_shuffle(func, args, kwargs):
    """``pixel_shuffle`` (N, C r^2, H, W) -> (N, C, H r, W r) and ``pixel_unshuffle``
    back, on a map sharded on its last two dims: local (module docstring)."""
    unshuffle = getattr(func, "__name__", "") == "pixel_unshuffle"
    op = "pixel_unshuffle" if unshuffle else "pixel_shuffle"
    x = args[0] if args else kwargs["input"]
    r = args[1] if len(args) > 1 else kwargs["downscale_factor" if unshuffle else "upscale_factor"]
    if not isinstance(x, SpatialTensor) or x._spec.is_tokens or x._spec.dims != (x.dim() - 2, x.dim() - 1):
        raise context.unsupported(op, "only a (*, C, H, W) map sharded on H and W")
    s = x._spec
    if unshuffle:
        rows, cols = _patch_grid(op, s.rows, s.cols, (r, r))
    else:
        rows, cols = tuple(b * r for b in s.rows), tuple(b * r for b in s.cols)
    return wrap(func(x._local, r), Spec(s.mesh, s.dims, rows, cols))


@register(*funcs_named("avg_pool1d", "max_pool1d", owners=(torch, F)))
def _pool1d_tokens(func, args, kwargs):
    """``avg_pool1d`` / ``max_pool1d`` with kernel == stride (no padding or dilation)
    over an (N, C, L) sequence token-sharded on L (NextViT's ``AvgPool1d`` over the
    flattened tokens before its keys): each group of k consecutive raster tokens
    is a 1 x k strip of one grid row, so with every column tile border on
    multiples of k the pooling is local and the token grid's columns divide by k."""
    op = getattr(func, "__name__", "pool1d")
    names = ("input", "kernel_size", "stride", "padding") + (("ceil_mode", "count_include_pad") if "avg" in op
                                                             else ("dilation", "ceil_mode", "return_indices"))
    a = dict(zip(names, args))
    a.update(kwargs)
    x = a["input"]
    one = lambda v: int(v[0]) if isinstance(v, (tuple, list)) and len(v) == 1 else v  # noqa: E731
    k = one(a["kernel_size"])
    st = one(a.get("stride")) if a.get("stride") not in (None, [], ()) else k
    if not isinstance(x, SpatialTensor) or x.dim() != 3 or x._spec.dims != (2,):
        raise context.unsupported(op, "only an (N, C, L) sequence token-sharded on L")
    s = x._spec
    if (st != k or one(a.get("padding", 0)) != 0 or one(a.get("dilation", 1)) != 1
            or a.get("return_indices", False)):
        raise context.unsupported(op, f"kernel {k}, stride {st}, padding {a.get('padding', 0)} over the tokens: only "
                                      "non-overlapping groups (kernel == stride, no padding, dilation or indices)")
    if s.prefix or s.trail != 1 or s.global_hw[1] % k:
        raise context.unsupported(op, f"groups of {k} tokens over a token grid {s.global_hw} with {s.prefix} prefix "
                                      f"and trail {s.trail}: only groups inside the grid's rows (W % {k} == 0)")
    if any(b % k for b in s.cols):
        raise context.unsupported(op, f"groups of {k} raster tokens cross the column tile borders {list(s.cols)} "
                                      f"(token grid {s.global_hw}); align tiles so that column borders fall on "
                                      f"multiples of {k} tokens (a larger input or --align)")
    _, cols = _patch_grid(op, s.rows, s.cols, (1, k))
    kw = {kk: v for kk, v in a.items() if kk not in ("input", "kernel_size", "stride")}
    return wrap(func(x._local, k, k, **kw), Spec(s.mesh, s.dims, s.rows, cols, 0, s.lead, 1))
