"""Linear maps and attention on sharded tensors.

``F.linear`` and ``x @ W`` act on the channel dim: local whenever the contracted
dim is not sharded. A product of two token-sharded tensors (explicit attention,
``q @ k.transpose(-2, -1)`` then ``attn @ v``) gathers the right-hand operand's
tokens in global order; ``F.scaled_dot_product_attention`` runs as
sequence-parallel attention (rest_ds/spim/attention.py) without ever forming
the whole score matrix.

Spatial-reduction attention (SegFormer, PVT-v2): queries on the tile's tokens,
keys/values on another token grid (the tokens reduced by a strided conv). In
both forms the right operand / K and V are gathered whole in their own global
order, so each rank computes its queries' rows exactly; keys/values that are
replicated (plain tensors, e.g. after an adaptive pool to 7x7) are used as they
are. The gather's backward returns each rank the sum of every rank's gradient
for its tokens.

A product that contracts over the tokens (``x.view(B, C, H*W) @ attn``, GCNet's
attention pooling), both operands sharded alike, is a local product plus one
autograd all-reduce; the result is replicated.

``v @ attn^T`` with ``v`` token-sharded on its last dim (SHViT) gathers ``v``'s
tokens like a right operand. A Linear over the token dim (MLP-Mixer, ResMLP,
gMLP) is a contraction over the tokens with the weight's columns for the tile's
tokens; its result is replicated.

``F.conv1d`` with a kernel of 1 over a token-sharded sequence is a local channel mix.

``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) is composed of
the rules above: projections, sequence-parallel attention, output projection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import context
from ..attention import gather_tokens, sequence_parallel_attention
from ..comm import all_reduce_sum
from ..tensor import SpatialTensor, funcs_named, op_name, register, wrap
from ..tokens import tile_of_full
from .pointwise import align_plain


@register(F.linear, torch._C._nn.linear)
def _linear(func, args, kwargs):
    names = ("input", "weight", "bias")
    a = dict(zip(names, args))
    a.update(kwargs)
    x = a["input"]
    if isinstance(a["weight"], SpatialTensor) or isinstance(a.get("bias"), SpatialTensor):
        raise context.unsupported("linear", "a sharded weight or bias")
    if x.dim() - 1 in x._spec.dims:
        if x._spec.is_tokens and x._spec.dims == (x.dim() - 1,):
            return _linear_over_tokens(x, a["weight"], a.get("bias"))
        raise context.unsupported("linear", f"the contracted last dim {x.dim() - 1} is sharded")
    return wrap(F.linear(x._local, a["weight"], a.get("bias")), x._spec)


@register(*funcs_named("conv1d", owners=(torch, F)))
def _conv1d_pointwise(func, args, kwargs):
    """``F.conv1d`` with a kernel of 1 (stride 1, no padding or dilation) over a sequence
    sharded on its length (N, C, L): a channel mix per token, local. Any wider kernel
    would read the neighbouring tokens of a token order that is not the scene's rows."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    a = dict(zip(names, args))
    a.update(kwargs)
    x, w, b = a["input"], a["weight"], a.get("bias")
    if isinstance(w, SpatialTensor) or isinstance(b, SpatialTensor) or not isinstance(x, SpatialTensor):
        raise context.unsupported("conv1d", "a sharded weight or bias")
    one = lambda v: v in (1, (1,), [1])  # noqa: E731
    if (x.dim() != 3 or x._spec.dims != (2,) or w.shape[-1] != 1 or not one(a.get("stride", 1))
            or a.get("padding", 0) not in (0, (0,), [0], "valid", "same") or not one(a.get("dilation", 1))):
        raise context.unsupported("conv1d", f"kernel {tuple(w.shape[2:])} over sharded dims {x._spec.dims} of a "
                                  f"{x.dim()}-D tensor (only a kernel of 1 over an (N, C, L) sequence sharded on L)")
    return wrap(F.conv1d(x._local, w, b, 1, 0, 1, a.get("groups", 1)), x._spec)


def _linear_over_tokens(x: SpatialTensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A Linear over the token dim (MLP-Mixer / ResMLP token mixing, gMLP's spatial
    gating: ``nn.Linear(N, M)`` on ``(..., C, N)``), ``x`` token-sharded on its last
    dim only: each rank multiplies its tokens by their weight columns (global token
    order), one autograd all-reduce sums the parts, the prefix tokens' columns and
    the bias are added once after it. The result ``(..., M)`` is replicated (a plain
    tensor; where ``M`` is the token count, an op with a sharded operand takes its
    tile's tokens of it)."""
    s = x._spec
    n = s.global_sizes()[0]
    if weight.dim() != 2 or weight.shape[1] != n:
        raise context.unsupported("linear", f"a weight of shape {tuple(weight.shape)} over the token dim of "
                                            f"{n} tokens")
    w = tile_of_full(weight, 1, s)  # the prefix tokens' columns, then this tile's
    k, xl = s.prefix, x._local
    out = all_reduce_sum(F.linear(xl.narrow(-1, k, xl.shape[-1] - k), w.narrow(1, k, w.shape[1] - k)), s.mesh)
    if k:
        out = out + F.linear(xl.narrow(-1, 0, k), w.narrow(1, 0, k))
    return out + bias if bias is not None else out


@register(*funcs_named("matmul", "__matmul__", "__rmatmul__", "bmm", owners=(torch, torch.Tensor)))
def _matmul(func, args, kwargs):
    a, b = args[0], args[1]
    if getattr(func, "__name__", "") == "__rmatmul__":
        a, b = b, a
    op = op_name(func)
    if isinstance(a, SpatialTensor) and not isinstance(b, SpatialTensor):
        if a.dim() - 1 in a._spec.dims:
            raise context.unsupported(op, "contraction over a sharded dim")
        if b.dim() > 2 and not _queries_times_replicated(a, b):
            raise context.unsupported(op, "a batched replicated right operand")
        return wrap(torch.matmul(a._local, b), a._spec)
    if isinstance(b, SpatialTensor) and not isinstance(a, SpatialTensor):
        if b.dim() - 2 in b._spec.dims:
            raise context.unsupported(op, "contraction over a sharded dim of the right operand")
        if a.dim() > 2:
            # a batched replicated left operand meets every column of b: exact per column when
            # b is sharded only on its last (column) dim (EdgeNeXt's / XCiT's attn @ v over the
            # tokens); a sharded batch dim of b would meet a's whole batch
            if b._spec.dims != (b.dim() - 1,):
                raise context.unsupported(op, "a batched replicated left operand and a right operand "
                                          "sharded on a batch dim")
            out = torch.matmul(a, b._local)
            return wrap(out, b._spec.with_dims((out.dim() - 1,)))
        return wrap(torch.matmul(a, b._local), b._spec)
    sa, sb = a._spec, b._spec
    if sa.same_layout(sb) and a.dim() == b.dim() and all(d < a.dim() - 2 for d in sa.dims):
        # sharded on a batch dim of the product (e.g. windows x heads): independent per tile
        return wrap(torch.matmul(a._local, b._local), sa)
    if _contracts_tokens(a, b):
        return _contract_tokens(a, b)
    if _values_times_transposed_attention(a, b):
        # v @ attn^T (SHViT): the values' tokens are gathered whole in global order, the
        # order of attn^T's full key dim; each rank computes its queries' columns
        return wrap(torch.matmul(gather_tokens(a._local, a.dim() - 1, sa), b._local), sb)
    # both sharded on tokens: the left operand keeps its token sharding on dim -2; the
    # right one (keys or values) may live on another token grid (spatial-reduction
    # attention: K/V on a strided-conv-reduced grid), it is gathered whole either way
    if not (sa.is_tokens and sb.is_tokens and sa.mesh == sb.mesh and a.dim() == b.dim()):
        raise context.unsupported(op, "a product of two sharded tensors other than token-layout attention")
    if sa.dims[0] != a.dim() - 2:
        raise context.unsupported(op, "the left operand's token dim must be dim -2 (queries)")
    if sb.dims[0] not in (b.dim() - 1, b.dim() - 2):
        raise context.unsupported(op, "the right operand's token dim must be one of its last two dims")
    b_full = gather_tokens(b._local, sb.dims[0], sb)
    return wrap(torch.matmul(a._local, b_full), sa)


def _contracts_tokens(a: SpatialTensor, b: SpatialTensor) -> bool:
    """``a @ b`` contracting over the token dim: ``a`` sharded on its last dim,
    ``b`` on its dim -2, both the same token layout (prefix tokens included), batch
    dims not sharded (GCNet's attention pooling ``x.view(B, C, H*W) @ attn``)."""
    sa, sb = a._spec, b._spec
    return (sa.is_tokens and sb.is_tokens and a.dim() >= 2 and b.dim() >= 2 and sa.dims[0] == a.dim() - 1
            and sb.dims[0] == b.dim() - 2 and sa.mesh == sb.mesh and sa.same_layout(sb.with_dims(sa.dims)))


def _values_times_transposed_attention(a: SpatialTensor, b: SpatialTensor) -> bool:
    """``v @ attn.transpose(-2, -1)`` (SHViT's single-head attention on (B, C, N)):
    ``a`` token-sharded on its last (contracted) dim only; ``b`` token-sharded on its
    last dim only (the queries), its dim -2 whole (the keys: the global token count,
    in global order, as ``q @ k`` with gathered keys leaves it), same mesh, batch
    dims not sharded."""
    sa, sb = a._spec, b._spec
    return (sa.is_tokens and sb.is_tokens and a.dim() >= 2 and b.dim() >= 2 and sa.dims == (a.dim() - 1,)
            and sb.dims == (b.dim() - 1,) and sa.mesh == sb.mesh and b.shape[-2] == sa.global_sizes()[0])


def _contract_tokens(a: SpatialTensor, b: SpatialTensor) -> torch.Tensor:
    """Exact ``a @ b`` summed over the scene's tokens: each rank's tokens (the
    same tokens in both operands) give a partial product, one autograd
    all-reduce sums them, the replicated prefix tokens' product is added once
    (CrossViT's ``attn @ v`` over [cls, patches]); the result is replicated (a
    plain tensor)."""
    k = a._spec.prefix
    al, bl = a._local, b._local
    if not k:
        return all_reduce_sum(torch.matmul(al, bl), a._spec.mesh)
    tiles = torch.matmul(al.narrow(-1, k, al.shape[-1] - k), bl.narrow(-2, k, bl.shape[-2] - k))
    return all_reduce_sum(tiles, a._spec.mesh) + torch.matmul(al.narrow(-1, 0, k), bl.narrow(-2, 0, k))


def _queries_times_replicated(a: SpatialTensor, b: torch.Tensor) -> bool:
    """``a @ b`` with ``a`` sharded only on its query dim -2 (token layout) and a
    batched replicated ``b`` (keys/values made replicated, e.g. PVT-v2's adaptive
    pool to 7x7): every query row meets the whole ``b``, batch dims are not
    sharded, so the tile's rows are computed locally and exactly."""
    s = a._spec
    return s.is_tokens and s.dims[0] == a.dim() - 2 and b.dim() <= a.dim()


@register(torch.einsum)
def _einsum(func, args, kwargs):
    """einsum where every sharded letter is kept in the output (never contracted):
    local, with plain operands sliced to this tile where they carry a sharded
    letter at its global size (e.g. SAM's relative-position tables, indexed by
    global row)."""
    eq, ops_ = args[0], list(args[1:])
    if len(ops_) == 1 and isinstance(ops_[0], (list, tuple)):
        ops_ = list(ops_[0])
    if "..." in eq or "->" not in eq:
        raise context.unsupported("einsum", "equations with '...' or without '->'")
    ins, out = eq.replace(" ", "").split("->")
    ins = ins.split(",")
    spatial = [(s, t) for s, t in zip(ins, ops_) if isinstance(t, SpatialTensor)]
    sub0, x0 = spatial[0]
    spec = x0._spec
    letters = [sub0[d] for d in spec.dims]
    for s_, t in spatial[1:]:
        if [s_[d] for d in t._spec.dims] != letters or not t._spec.same_layout(t._spec.with_dims(spec.dims)) \
                or t._spec.rows != spec.rows or t._spec.cols != spec.cols:
            raise context.unsupported("einsum", "sharded operands with different layouts")
    if any(l not in out for l in letters):
        raise context.unsupported("einsum", f"contracting the sharded letters {letters}")
    if spec.is_tokens and any(l in s_ for s_, t in zip(ins, ops_) if not isinstance(t, SpatialTensor) for l in letters):
        raise context.unsupported("einsum", "a replicated operand indexed by the sharded token letter")
    locs = []
    for s_, t in zip(ins, ops_):
        if isinstance(t, SpatialTensor):
            locs.append(t._local)
            continue
        for l, (lo, hi), n in zip(letters, (spec.row_range, spec.col_range), spec.global_hw):
            if l in s_:
                d = s_.index(l)
                if t.shape[d] != n:
                    raise context.unsupported("einsum", f"operand dim '{l}' of size {t.shape[d]} against global size {n}")
                t = t.narrow(d, lo, hi - lo)
        locs.append(t)
    res = torch.einsum(eq, *locs)
    return wrap(res, spec.with_dims([out.index(l) for l in letters]))


def _window_mask(mask, ndim: int, spec, op: str):
    """This rank's part of the mask of attention sharded on a batch dim (windows):
    a sharded mask's tile, or a plain one broadcast against the global shape and
    sliced to the tile's windows (e.g. Swin's shifted-window mask built for the
    whole scene's window grid, or a relative-position bias shared by all windows)."""
    if mask is None or isinstance(mask, SpatialTensor):
        return None if mask is None else mask._local
    return align_plain(mask, ndim, spec, op)


@register(F.scaled_dot_product_attention)
def _sdpa(func, args, kwargs):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    a = dict(zip(names, args))
    a.update(kwargs)
    q, k, v = a["query"], a["key"], a["value"]
    op = "scaled_dot_product_attention"
    if isinstance(q, SpatialTensor) and _kv_on_other_grid(q, k, v):
        return _sdpa_gathered_kv(a, q, k, v, op)
    if not all(isinstance(t, SpatialTensor) for t in (q, k, v)):
        raise context.unsupported(op, "query, key and value must all be token-sharded")
    spec = q._spec
    mask = a.get("attn_mask")
    if all(d < q.dim() - 2 for d in spec.dims) and all(
            isinstance(t, SpatialTensor) and t._spec.same_layout(spec) for t in (k, v)) and (
            not isinstance(mask, SpatialTensor) or mask._spec.same_layout(spec)):
        # sharded on a batch dim (windows of a windowed ViT): every window lives on one rank
        if a.get("dropout_p", 0.0):
            raise context.unsupported(op, "attention dropout > 0 (masks would differ from one device)")
        return wrap(F.scaled_dot_product_attention(
            q._local, k._local, v._local, attn_mask=_window_mask(mask, q.dim(), spec, op),
            is_causal=a.get("is_causal", False), scale=a.get("scale"), enable_gqa=a.get("enable_gqa", False)), spec)
    for t in (q, k, v):
        s = t._spec
        if not s.is_tokens or s.dims[0] != t.dim() - 2 or s.rows != spec.rows or s.cols != spec.cols:
            raise context.unsupported(op, "query, key and value must share one token layout with tokens on dim -2")
    if a.get("dropout_p", 0.0):
        raise context.unsupported(op, "attention dropout > 0 (masks would differ from one device)")
    if a.get("is_causal", False):
        raise context.unsupported(op, "is_causal (no causal order over a scene)")
    for t in (k, v):
        if t._spec.prefix != spec.prefix:
            raise context.unsupported(op, "query, key and value with different prefix tokens")
    if mask is not None:
        # a bias/mask over (queries, keys): its query rows are sharded like q, its key
        # columns cover the whole scene in global order, so K and V are gathered in that order
        if isinstance(mask, SpatialTensor):
            if not mask._spec.same_layout(spec.with_dims((mask.dim() - 2,))):
                raise context.unsupported(op, "attn_mask must be sharded along its query dim like the query")
            mask = mask._local
        elif mask.dim() >= 2:
            # a replicated bias over the whole scene's (queries, keys) (MaxViT's / CoAtNet's
            # relative-position bias): this tile's query rows
            mask = align_plain(mask, q.dim(), spec, op)
        kf = gather_tokens(k._local, k.dim() - 2, k._spec)
        vf = gather_tokens(v._local, v.dim() - 2, v._spec)
        return wrap(F.scaled_dot_product_attention(q._local, kf, vf, attn_mask=mask, scale=a.get("scale"),
                                                   enable_gqa=a.get("enable_gqa", False)), spec)
    ql, kl, vl = q._local, k._local, v._local
    lead = ql.shape[:-2]
    if ql.dim() != 4:
        # (B, N, d) or (B, heads, T, N, d) (NesT's blocks): the dims before the tokens are
        # independent problems; sequence-parallel attention takes (B, heads, N, d)
        if ql.dim() < 3 or kl.shape[:-2] != lead or vl.shape[:-2] != lead:
            raise context.unsupported(op, f"query, key and value of {q.dim()} dims with different batch dims")
        ql, kl, vl = (t.reshape(t.shape[0], -1, *t.shape[-2:]) for t in (ql, kl, vl))
    out = sequence_parallel_attention(ql, kl, vl, spec.token_counts(), spec.mesh,
                                      scale=a.get("scale"), algorithm=context.attention(),
                                      enable_gqa=a.get("enable_gqa", False), prefix=spec.prefix)
    return wrap(out.reshape(*lead, *out.shape[-2:]), spec)


def _kv_on_other_grid(q: SpatialTensor, k, v) -> bool:
    """Queries token-sharded on dim -2 and keys/values not on the queries' layout:
    each replicated (a plain tensor) or token-sharded on dim -2 of another grid
    (spatial-reduction attention: SegFormer / PVT-v2 K/V on a reduced grid)."""
    s = q._spec
    if not (s.is_tokens and s.dims[0] == q.dim() - 2):
        return False
    for t in (k, v):
        if isinstance(t, SpatialTensor) and not (t._spec.is_tokens and t._spec.dims[0] == t.dim() - 2
                                                 and t._spec.mesh == s.mesh):
            return False
    return not all(isinstance(t, SpatialTensor) and t._spec.same_layout(s) for t in (k, v))


def _sdpa_gathered_kv(a: dict, q: SpatialTensor, k, v, op: str) -> SpatialTensor:
    """Attention of the tile's queries over keys/values of the whole scene that
    live on another token grid (or are replicated): sharded K/V are gathered in
    their global order (``gather_tokens``: one all-to-all whose backward returns
    each rank the sum of every rank's gradient for its tokens), then the tile's
    rows of the attention run locally. K and V of one layout travel together."""
    if a.get("dropout_p", 0.0):
        raise context.unsupported(op, "attention dropout > 0 (masks would differ from one device)")
    if a.get("is_causal", False):
        raise context.unsupported(op, "is_causal (no causal order over a scene)")
    if a.get("attn_mask") is not None:
        raise context.unsupported(op, "attn_mask with keys/values on another token grid than the queries")
    if (isinstance(k, SpatialTensor) and isinstance(v, SpatialTensor) and k._spec.same_layout(v._spec)
            and k.shape[:-1] == v.shape[:-1]):
        kv = gather_tokens(torch.cat([k._local, v._local], dim=-1), k.dim() - 2, k._spec)
        kf, vf = kv.split([k.shape[-1], v.shape[-1]], dim=-1)
    else:
        kf, vf = (gather_tokens(t._local, t.dim() - 2, t._spec) if isinstance(t, SpatialTensor) else t
                  for t in (k, v))
    return wrap(F.scaled_dot_product_attention(q._local, kf, vf, scale=a.get("scale"),
                                               enable_gqa=a.get("enable_gqa", False)), q._spec)


_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
             "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")
_MHA_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
                 "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None,
                 "v_proj_weight": None, "static_k": None, "static_v": None, "average_attn_weights": True,
                 "is_causal": False}


@register(F.multi_head_attention_forward)
def _multi_head_attention(func, args, kwargs):
    """``nn.MultiheadAttention``'s functional core (torchvision's ViT, ...) on
    sequence-first ``(L, N, E)`` inputs with the query token-sharded on dim 0 (a
    batch-first module transposes before calling it): the same input projections,
    attention and output projection, each through its own SPIM rule, so the
    attention itself is ``F.scaled_dot_product_attention``'s sequence-parallel
    rule (or, for ``need_weights``, the explicit ``q @ k^T`` with the keys
    gathered). Keys/values: token-sharded like the query or replicated. Returns
    ``(output (L, N, E) sharded like the query, weights (N, [heads,] L, S) sharded
    on L, or None)`` as torch does. Refused by name: ``bias_k``/``bias_v``,
    ``add_zero_attn``, masks, ``static_k``/``static_v``, ``is_causal``, attention
    dropout in training, unbatched input."""
    a = dict(_MHA_DEFAULTS)
    a.update(zip(_MHA_ARGS, args))
    a.update(kwargs)
    op = "multi_head_attention_forward"
    q_in, k_in, v_in = a["query"], a["key"], a["value"]
    for name, why in (("bias_k", "bias_k/bias_v (a key appended to the scene's tokens)"),
                      ("bias_v", "bias_k/bias_v (a key appended to the scene's tokens)"),
                      ("key_padding_mask", "key_padding_mask"), ("attn_mask", "attn_mask"),
                      ("static_k", "static_k/static_v"), ("static_v", "static_k/static_v")):
        if a[name] is not None:
            raise context.unsupported(op, why)
    if a["add_zero_attn"] or a["is_causal"]:
        raise context.unsupported(op, "add_zero_attn" if a["add_zero_attn"] else "is_causal (no causal order over a scene)")
    if a["training"] and a["dropout_p"]:
        raise context.unsupported(op, "attention dropout > 0 in training (set the module's dropout to 0 "
                                      "or call it in eval mode)")
    if not isinstance(q_in, SpatialTensor) or q_in.dim() != 3 or q_in._spec.dims != (0,):
        raise context.unsupported(op, "the query must be a batched (L, N, E) tensor token-sharded on L")
    E, heads = a["embed_dim_to_check"], a["num_heads"]
    d = E // heads
    if a["use_separate_proj_weight"]:
        w = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
    else:
        w = a["in_proj_weight"].chunk(3)
    b = a["in_proj_bias"].chunk(3) if a["in_proj_bias"] is not None else (None, None, None)
    if q_in is k_in and k_in is v_in and not a["use_separate_proj_weight"]:
        q, k, v = F.linear(q_in, a["in_proj_weight"], a["in_proj_bias"]).chunk(3, dim=-1)
    else:
        q, k, v = (F.linear(t, w_, b_) for t, w_, b_ in zip((q_in, k_in, v_in), w, b))

    def heads_first(t):  # (L, N, E) -> (N, heads, L, d)
        return t.reshape(t.shape[0], t.shape[1], heads, d).permute(1, 2, 0, 3)

    q, k, v = heads_first(q), heads_first(k), heads_first(v)
    weights = None
    if a["need_weights"]:
        weights = ((q * d ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = weights @ v
        if a["average_attn_weights"]:
            weights = weights.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    L, N = q_in.shape[0], q_in.shape[1]
    out = F.linear(out.permute(2, 0, 1, 3).reshape(L, N, E), a["out_proj_weight"], a["out_proj_bias"])
    return out, weights
