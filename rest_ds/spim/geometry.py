"""Tile geometry: partitions, sliding-window output partitions, needed input
ranges, halo pieces and strips, as pure integer arithmetic.

No tensors and no process group: every function takes and returns ints and
tuples of global coordinates, so every rank computes the same answer from the
same global information (docs/design.md sections 1 and 3), and each rule is
checked against brute force (tests/test_spim_geometry.py).

Words (docs/design.md section 1). A *partition* of an extent ``n`` over
``parts`` tiles is ``(0, b1, ..., n)``; tile ``i`` owns ``[b_i, b_{i+1})``. A
*range* is a global half-open ``(lo, hi)``.

Sliding windows (conv, pooling), per axis: kernel size ``k``, dilation ``d``
(extent ``ke = d (k - 1) + 1``), stride ``s``, padding ``p`` before. Global
output ``o`` reads inputs ``o s - p + j d`` for taps ``j < k``, all inside
``[o s - p, o s - p + ke)``. Output ownership follows the window centre: the
tile holding input ``o s - p + (ke - 1) // 2`` owns output ``o`` (clamped to
the first / last tile), so a "same" conv keeps the partition, a stride-s layer
divides it by s, and a pad followed by a valid conv gives the same partition as
the padded conv. A tile owning outputs ``[o0, o1)`` needs the inputs
``[o0 s - p, (o1 - 1) s - p + ke)``: its own tile, halos from neighbours, and
positions outside ``[0, n)``, which are the scene padding (never padding at a
tile border).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .errors import SPIMError

Partition = tuple[int, ...]
Range = tuple[int, int]
Box = tuple[Range, Range]  # (rows, cols), global


# ---------------------------------------------------------------- integers

def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers (``b > 0``), exact for any size."""
    return -(-a // b)


def lcm(*values: int) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


# ---------------------------------------------------------------- partitions

def split_extent(n: int, parts: int, align: int = 1) -> Partition:
    """Split ``n`` into ``parts`` tiles with interior boundaries on multiples of
    ``align``; tiles are as even as the alignment allows, the last one takes the
    remainder. Raises :class:`SPIMError` when a tile would be empty."""
    if parts < 1 or align < 1:
        raise SPIMError(f"split_extent: parts ({parts}) and align ({align}) must be >= 1")
    units = n // align  # whole alignment units; the remainder joins the last tile
    if units < parts:
        raise SPIMError(
            f"cannot split an extent of {n} px into {parts} tiles aligned to {align} px: "
            f"only {units} whole units of {align} px; use fewer ranks along this axis "
            f"or a smaller alignment"
        )
    base, extra = divmod(units, parts)
    bounds = [0]
    for i in range(parts - 1):
        bounds.append(bounds[-1] + (base + (1 if i < extra else 0)) * align)
    bounds.append(n)
    return tuple(bounds)


def partition_from_sizes(sizes: list[int] | tuple[int, ...]) -> Partition:
    out = [0]
    for s in sizes:
        out.append(out[-1] + int(s))
    return tuple(out)


def tile_sizes(part: Partition) -> tuple[int, ...]:
    return tuple(b - a for a, b in zip(part[:-1], part[1:]))


def check_aligned(part: Partition, align: int, what: str = "tile") -> None:
    """Interior boundaries must be multiples of ``align``."""
    bad = [b for b in part[1:-1] if b % align]
    if bad:
        raise SPIMError(
            f"{what} boundaries {list(part)} are not aligned: {bad} are not multiples "
            f"of the alignment {align} (the lcm of the network's stride products); "
            f"use rest_ds.spim.split_extent(n, parts, align={align})"
        )


def pad_partition(part: Partition, before: int, after: int) -> Partition:
    """The partition of the extent padded by ``before`` / ``after`` at the scene
    border: the first tile takes the padding before, the last the padding after."""
    return (0,) + tuple(b + before for b in part[1:-1]) + (part[-1] + before + after,)


def scale_partition(part: Partition, n: int, full: int) -> Partition:
    """The partition of a feature map of size ``n`` whose input (size ``full``)
    is split by ``part``: every boundary scaled by ``n / full``, floored (exact
    when the boundaries are aligned to ``full / n``)."""
    return (0,) + tuple(b * n // full for b in part[1:-1]) + (n,)


# ---------------------------------------------------------------- ranges

def clip(r: Range, n: int) -> Range:
    """``r`` clipped to the scene ``[0, n)`` (may come out empty: hi <= lo)."""
    return max(r[0], 0), min(r[1], n)


def intersect(a: Range, b: Range) -> Range | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if hi > lo else None


def box_intersect(key: Box, rows: Range, cols: Range) -> Box | None:
    """The part of box ``key`` = (rows, cols) inside rows x cols, or None."""
    r, c = intersect(key[0], rows), intersect(key[1], cols)
    return None if r is None or c is None else (r, c)


# ---------------------------------------------------------------- sliding windows

def kernel_extent(k: int, d: int = 1) -> int:
    """Inputs spanned by a kernel of ``k`` taps at dilation ``d``."""
    return d * (k - 1) + 1


def conv_padding(padding: int | str, ke: int) -> tuple[int, int]:
    """(padding before, total padding) of one axis of a conv with kernel extent
    ``ke``: an int pads both sides alike; ``'valid'`` none; ``'same'`` (stride
    1 only, the caller checks) torch's rule, ``(ke - 1) // 2`` before and the
    rest after."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        return (ke - 1) // 2, ke - 1
    if isinstance(padding, str):
        raise SPIMError(f"conv padding {padding!r}: expected an int, 'same' or 'valid'")
    return int(padding), 2 * int(padding)


def conv_out(n: int, ke: int, s: int, p_total: int) -> int:
    """Outputs of a conv over ``n`` inputs padded by ``p_total`` in all."""
    return (n + p_total - ke) // s + 1


def pool_out(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """Outputs of torch's max/avg pooling (its ceil_mode rule: the last window
    must start inside the input or the left padding)."""
    ke = kernel_extent(k, d)
    num = n + 2 * p - ke + ((s - 1) if ceil_mode else 0)
    out = num // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def pool_divisors(o0: int, o1: int, n: int, k: int, s: int, p: int, count_include_pad: bool) -> list[int]:
    """torch's average-pooling divisor of each global output in ``[o0, o1)``:
    the window ``[o s - p, o s - p + k)`` cut at the padded end ``n + p``, and
    without ``count_include_pad`` also at the scene ``[0, n)``."""
    out = []
    for o in range(o0, o1):
        start = o * s - p
        end = min(start + k, n + p)
        out.append(end - start if count_include_pad else min(end, n) - max(start, 0))
    return out


def output_partition(part: Partition, n_out: int, ke: int, s: int, p: int, op: str = "op", axis: str = "row",
                     where: str = "") -> Partition:
    """The partition of the ``n_out`` outputs of a window op (extent ``ke``,
    stride ``s``, padding ``p`` before) whose input is split by ``part``: output
    ``o`` goes to the tile holding its window centre (module docstring).
    Raises :class:`SPIMError` (prefixed by ``where``) when a tile owns no output."""
    c = (ke - 1) // 2
    bounds = [0] + [min(max(ceil_div(b + p - c, s), 0), n_out) for b in part[1:-1]] + [n_out]
    for i in range(len(bounds) - 1):
        if bounds[i + 1] <= bounds[i]:
            raise SPIMError(
                f"{where + ': ' if where else ''}{op}: the tile in grid {axis} {i} (input {axis}s "
                f"{part[i]}:{part[i + 1]}) owns no output {axis}s (output size {n_out}, stride {s}); tiles are "
                f"too small for this network: use fewer ranks along this axis or a larger scene"
            )
    return tuple(bounds)


def needs(out_part: Partition, ke: int, s: int, p: int) -> tuple[Range, ...]:
    """Per tile, the global input range its outputs ``out_part`` read (not
    clipped: parts outside ``[0, n)`` are scene padding)."""
    return tuple((o0 * s - p, (o1 - 1) * s - p + ke) for o0, o1 in zip(out_part[:-1], out_part[1:]))


def border_needs(part: Partition, before: int, after: int) -> list[Range]:
    """Needed input range of each tile of ``part`` for an op reading ``before`` /
    ``after`` lines beyond it (a stride-1 window op: ``p`` and ``ke - 1 - p``)."""
    return [(part[i] - before, part[i + 1] + after) for i in range(len(part) - 1)]


def scene_pads(need: Range, n: int) -> tuple[int, int]:
    """(before, after): the positions of ``need`` outside the scene ``[0, n)``,
    which the op fills with its padding value."""
    return max(0, -need[0]), max(0, need[1] - n)


def halo_extents(part: Partition, needs_: tuple[Range, ...]) -> tuple[tuple[int, int], ...]:
    """Per tile, (before, after): how many inputs of its need, clipped to the
    scene, lie before its first and after its last own input (what the
    neighbours send). Negative when the need stops short of the tile's own
    edge (a rank's last rows can feed its neighbour's first output)."""
    n = part[-1]
    return tuple((part[i] - clip(r, n)[0], clip(r, n)[1] - part[i + 1]) for i, r in enumerate(needs_))


def far_tile(part: Partition, needs_: tuple[Range, ...]) -> int | None:
    """The first tile whose need, clipped to the scene, reaches past its own
    and the adjacent tiles, or None."""
    n = part[-1]
    for i, need in enumerate(needs_):
        lo, hi = clip(need, n)
        if lo < part[max(i - 1, 0)] or hi > part[min(i + 2, len(part) - 1)]:
            return i
    return None


def reaches_far(part: Partition, needs_: tuple[Range, ...]) -> bool:
    """Whether some tile's need reaches past its adjacent tiles (then a
    neighbour exchange cannot serve it: a far plan)."""
    return far_tile(part, needs_) is not None


def blocks(part: Partition, idx: int, need: Range, far: bool = False) -> list[tuple[int, Range]]:
    """(offset in grid, global range) pieces of ``need`` held by tiles idx-1,
    idx, idx+1 (``far``: by any tile), in grid order."""
    out = []
    for d in (range(-idx, len(part) - 1 - idx) if far else (-1, 0, 1)):
        j = idx + d
        if 0 <= j < len(part) - 1:
            r = intersect(need, (part[j], part[j + 1]))
            if r is not None:
                out.append((d, r))
    return out


# ---------------------------------------------------------------- exchange plans

class ExchangePlan(NamedTuple):
    """Who sends what to whom in one halo exchange, for the tile at grid
    ``coord``, in global ranges. ``origin``: the tile's first (row, col);
    ``ext``: its need clipped to the scene; ``own``: the part of its own tile
    inside ``ext`` (None when the window skips it); ``recv``: ((i, j), rows,
    cols) pieces tile (i, j) sends it; ``send``: ((i, j), rows, cols) pieces of
    its tile that tile (i, j) needs; ``far``: pieces may come from any tile
    (some tile's need reaches past its neighbours)."""
    origin: tuple[int, int]
    ext: Box
    own: Box | None
    recv: tuple
    send: tuple
    far: bool


def exchange_plan(rows: Partition, cols: Partition, need_rows: tuple[Range, ...], need_cols: tuple[Range, ...],
                  coord: tuple[int, int], far: bool = False) -> ExchangePlan:
    """The :class:`ExchangePlan` of the tile at grid ``coord``: its window is
    ``need_rows[r] x need_cols[c]`` clipped to the scene, cut along the tile
    borders; without ``far`` only the 8 neighbours are looked at (the caller
    checks with :func:`reaches_far` that this suffices)."""
    r, c = coord
    H, W = rows[-1], cols[-1]
    my_r, my_c = clip(need_rows[r], H), clip(need_cols[c], W)
    recv, own = [], None
    for dr, rr in blocks(rows, r, my_r, far):
        for dc, cc in blocks(cols, c, my_c, far):
            if dr == 0 and dc == 0:
                own = (rr, cc)
            else:
                recv.append(((r + dr, c + dc), rr, cc))
    send = []
    mine_r, mine_c = (rows[r], rows[r + 1]), (cols[c], cols[c + 1])
    for dr in range(-r, len(rows) - 1 - r) if far else (-1, 0, 1):
        for dc in range(-c, len(cols) - 1 - c) if far else (-1, 0, 1):
            i, j = r + dr, c + dc
            if (dr, dc) == (0, 0) or not (0 <= i < len(rows) - 1 and 0 <= j < len(cols) - 1):
                continue
            rr = intersect(clip(need_rows[i], H), mine_r)
            cc = intersect(clip(need_cols[j], W), mine_c)
            if rr is not None and cc is not None:
                send.append(((i, j), rr, cc))
    return ExchangePlan((rows[r], cols[c]), (my_r, my_c), own, tuple(recv), tuple(send), far)


def halo_volume(rows: Partition, cols: Partition, need_rows, need_cols) -> int:
    """Pixels all tiles together send in one exchange (per channel and sample):
    each tile sends every other tile the part of its own tile inside that
    tile's need, clipped to the scene. Within the 8 neighbours unless a need
    reaches further (a far plan, where they come from any tile)."""
    H, W = rows[-1], cols[-1]

    def overlap(a: Range, b: Range) -> int:
        return max(0, min(a[1], b[1]) - max(a[0], b[0]))

    total = 0
    for i in range(len(rows) - 1):
        nr = clip(need_rows[i], H)
        for j in range(len(cols) - 1):
            nc = clip(need_cols[j], W)
            for r in range(len(rows) - 1):
                hr = overlap(nr, (rows[r], rows[r + 1]))
                if not hr:
                    continue
                for c in range(len(cols) - 1):
                    if (r, c) != (i, j):
                        total += hr * overlap(nc, (cols[c], cols[c + 1]))
    return total


# ---------------------------------------------------------------- border strips (padded-tile fast paths)

def border_strips(origin: tuple[int, int], tile_hw: tuple[int, int], recv_boxes, n, first, last_from_end):
    """The outputs of an op over a tile that read a neighbour's halo, as strips
    (local output rows, local output cols) of [start, end) pairs. ``origin``,
    ``tile_hw``: the tile's global first (row, col) and size; ``recv_boxes``:
    the (rows, cols) of the halo pieces it receives; ``n``: output count per
    axis; per axis the first ``first[a]`` outputs read the halo before the tile
    and the last ``last_from_end[a]`` the one after it, where a piece lies on
    that side. The top and bottom strips span all columns, the left and right
    ones the rows in between, so each output lies in at most one."""
    t0 = origin
    t1 = (t0[0] + tile_hw[0], t0[1] + tile_hw[1])
    recv_boxes = list(recv_boxes)
    f = [min(n[a], first[a]) if any(rc[a][0] < t0[a] for rc in recv_boxes) else 0 for a in (0, 1)]
    last = [max(f[a], n[a] - last_from_end[a]) if any(rc[a][1] > t1[a] for rc in recv_boxes) else n[a]
            for a in (0, 1)]
    (nr, nc), (fr, fc), (lr, lc) = n, f, last
    out = (((0, fr), (0, nc)), ((lr, nr), (0, nc)), ((fr, lr), (0, fc)), ((fr, lr), (lc, nc)))
    return [(r, c) for r, c in out if r[1] > r[0] and c[1] > c[0]]


def padded_fit(origin: tuple[int, int], tile_hw: tuple[int, int], need: Box, out_ranges: Box, ke, s):
    """Per axis (pad, window start, output count) when a window op run on the
    tile alone with symmetric zero padding ``pad`` has exactly this tile's
    outputs ``out_ranges``: its window ``need`` starts at or before the tile
    (``pad = tile start - window start >= 0``) and reaches at most ``pad``
    beyond its end. Else None."""
    pad, lo, n = [], [], []
    for a in (0, 1):
        t0, h = origin[a], tile_hw[a]
        w0, w1 = need[a]
        n_out = out_ranges[a][1] - out_ranges[a][0]
        p = t0 - w0
        if p < 0 or w1 - (t0 + h) > p or (h + 2 * p - ke[a]) // s[a] + 1 != n_out:
            return None
        pad.append(p)
        lo.append(w0)
        n.append(n_out)
    return tuple(pad), tuple(lo), tuple(n)


def halo_strips(origin: tuple[int, int], tile_hw: tuple[int, int], recv_boxes, lo, s, ke, n):
    """:func:`border_strips` of a window op over the padded tile (window start
    ``lo``, stride ``s``, kernel extent ``ke``, ``n`` outputs per axis), each as
    ``(out rows, out cols, in rows, in cols)`` with the global inputs it reads."""
    t1 = (origin[0] + tile_hw[0], origin[1] + tile_hw[1])
    first = [ceil_div(origin[a] - lo[a], s[a]) for a in (0, 1)]
    from_end = [n[a] - ((t1[a] - lo[a] - ke[a]) // s[a] + 1) for a in (0, 1)]
    return [(orows, ocols) + tuple((lo[a] + o[0] * s[a], lo[a] + (o[1] - 1) * s[a] + ke[a])
                                   for a, o in enumerate((orows, ocols)))
            for orows, ocols in border_strips(origin, tile_hw, recv_boxes, n, first, from_end)]


def axis_term(a: int, b: int, lo: int, s: int, k: int, d: int, n: int):
    """Along one axis, for a piece of global inputs [a, b): the local outputs
    [o0, o1) (of ``n``) whose windows (output o reads ``lo + o s + j d``, tap
    j < k) touch it, the taps [j0, j1) that do for some of them, and the zero
    pads before and after the piece of the input region those taps read. None
    when no tap reads the piece."""
    o0, o1 = max(0, ceil_div(a - lo - (k - 1) * d, s)), min(n, (b - 1 - lo) // s + 1)
    if o0 >= o1:
        return None
    j0, j1 = max(0, ceil_div(a - lo - (o1 - 1) * s, d)), min(k, (b - 1 - lo - o0 * s) // d + 1)
    if j0 >= j1:
        return None
    start, end = lo + o0 * s + j0 * d, lo + (o1 - 1) * s + (j1 - 1) * d + 1
    return (o0, o1), (j0, j1), (a - start, end - b)


# ---------------------------------------------------------------- resampling and cyclic rolls
def proportional(part: Partition, n_in: int, n_out: int) -> Partition:
    """The output partition of resampling ``n_in`` -> ``n_out`` lines for the input
    partition ``part``: the first ``b n_out // n_in`` outputs (those whose scaled
    extent ``[o n_in / n_out, (o + 1) n_in / n_out)`` ends within the first ``b``
    inputs) belong before an input border ``b``. A tile may get none (equal bounds:
    see :func:`empty_tile`)."""
    return (0,) + tuple(b * n_out // n_in for b in part[1:-1]) + (n_out,)


def empty_tile(part: Partition) -> int | None:
    """The first tile that owns nothing in ``part``, or None."""
    return next((i for i in range(len(part) - 1) if part[i + 1] <= part[i]), None)


def tap_needs(out_part: Partition, lo: tuple[int, ...], hi: tuple[int, ...]) -> tuple[Range, ...]:
    """The input range each tile's outputs read, given the first (``lo[o]``) and last
    (``hi[o]``) input index every global output ``o`` reads (a resampling's taps)."""
    return tuple((min(lo[a:b]), max(hi[a:b]) + 1) for a, b in zip(out_part[:-1], out_part[1:]))


# (source tile, destination tile, global source start, global source end, global destination start)
Piece = tuple[int, int, int, int, int]


def roll_pieces(part: Partition, shift: int) -> list[Piece]:
    """The pieces of a cyclic roll by ``shift`` of an axis split by ``part``.

    Output index ``i`` takes input index ``(i - shift) mod n`` (``torch.roll``).
    Returns every ``(src, dst, lo, hi, dst_lo)``: tile ``dst``'s output rows
    ``dst_lo : dst_lo + hi - lo`` are tile ``src``'s input rows ``lo : hi``
    (global indices); the same list on every rank."""
    n = part[-1]
    s = shift % n
    out = []
    for k in range(len(part) - 1):
        pos, end = part[k], part[k + 1]
        while pos < end:
            src = (pos - s) % n
            run = min(end - pos, n - src)  # a run stops at the scene's end, where the roll wraps
            for j in range(len(part) - 1):
                lo, hi = max(src, part[j]), min(src + run, part[j + 1])
                if hi > lo:
                    out.append((j, k, lo, hi, pos + lo - src))
            pos += run
    return out
