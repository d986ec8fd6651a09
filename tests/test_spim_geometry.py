"""rest_ds.spim.geometry against brute force, over seeded random shapes,
kernels, strides, dilations, paddings (incl. 'same'), ceil_mode and uneven
grids (pure Python, no ranks; a few seconds).

Brute force here means: enumerate every output position and the input indices
each of its kernel taps reads, every pixel of a window and the tile that owns
it; and, for the end-to-end check, run a 1-D conv / max pool on the tiles
exactly as SPIM does (window = need clipped to the scene, scene padding, op
without padding) and compare with the same op over the whole extent."""
from __future__ import annotations

import bisect
import random

import pytest
import torch
import torch.nn.functional as F

from rest_ds.spim import geometry as G
from rest_ds.spim.errors import SPIMError
from rest_ds.train.bench import border_needs, halo_bytes

CASES = 3000


def _random_partition(rnd: random.Random, n: int, parts: int) -> G.Partition:
    """Uneven interior boundaries (any tile size >= 1)."""
    return (0,) + tuple(sorted(rnd.sample(range(1, n), parts - 1))) + (n,)


def _random_split(rnd: random.Random, n_max: int):
    """(extent n, a random partition of it over 1-5 tiles, pool?) or None when the
    tiles drawn outnumber the positions."""
    n, parts, pool = rnd.randint(2, n_max), rnd.randint(1, 5), rnd.random() < 0.4
    return None if parts > n else (n, _random_partition(rnd, n, parts), pool)


def _random_window(rnd: random.Random, n: int, pool: bool):
    """(k, s, d, p_before, p_total, ceil_mode, n_out) of a random conv or pooling
    over n inputs that torch accepts, or None when it has no output."""
    k, s, d = rnd.randint(1, 7), rnd.choice((1, 1, 2, 3, 4)), rnd.choice((1, 1, 2, 3, 5))
    ke = G.kernel_extent(k, d)
    if pool:
        p, ceil = rnd.randint(0, k // 2), rnd.random() < 0.5
        n_out = G.pool_out(n, k, s, p, d, ceil)
        return (k, s, d, p, 2 * p, ceil, n_out) if n_out >= 1 else None
    padding = rnd.choice(("same", "valid", rnd.randint(0, ke))) if s == 1 else rnd.choice(("valid", rnd.randint(0, ke)))
    pb, pt = G.conv_padding(padding, ke)
    n_out = G.conv_out(n, ke, s, pt)
    return (k, s, d, pb, pt, False, n_out) if n_out >= 1 else None


def _window_on(rnd: random.Random, part: G.Partition, pool: bool):
    """(window, output partition, needs) of a random window op on the split
    ``part``, or None when torch gives no output or a tile would own none."""
    win = _random_window(rnd, part[-1], pool)
    if win is None:
        return None
    k, s, d, p = win[:4]
    ke = G.kernel_extent(k, d)
    try:
        out = G.output_partition(part, win[-1], ke, s, p)
    except SPIMError:
        return None
    return win, out, G.needs(out, ke, s, p)


def _taps(o: int, k: int, s: int, d: int, p: int) -> list[int]:
    return [o * s - p + j * d for j in range(k)]


def _owner(part: G.Partition, x: int) -> int:
    """The tile holding position x, clamped to the first / last tile."""
    return min(max(bisect.bisect_right(part, x) - 1, 0), len(part) - 2)


def test_partitions_and_integers():
    rnd = random.Random(0)
    for _ in range(CASES):
        a, b = rnd.randint(-100, 100), rnd.randint(1, 20)
        assert G.ceil_div(a, b) == min(q for q in range(-200, 200) if q * b >= a)
        n, parts, align = rnd.randint(1, 200), rnd.randint(1, 6), rnd.randint(1, 16)
        if n // align < parts:
            with pytest.raises(SPIMError):
                G.split_extent(n, parts, align)
            continue
        part = G.split_extent(n, parts, align)
        sizes = G.tile_sizes(part)
        assert part[0] == 0 and part[-1] == n and len(part) == parts + 1 and min(sizes) >= 1
        assert all(b % align == 0 for b in part[1:-1])
        G.check_aligned(part, align)
        assert max(sizes[:-1], default=0) - min(sizes[:-1], default=0) <= align  # as even as alignment allows
        assert G.partition_from_sizes(sizes) == part
        before, after = rnd.randint(0, 5), rnd.randint(0, 5)  # padding: positions outside go to the end tiles
        owners = [_owner(part, y - before) for y in range(n + before + after)]
        assert G.pad_partition(part, before, after) == G.partition_from_sizes([owners.count(i) for i in range(parts)])
        f = rnd.choice((1, 2, 4))
        if n % f == 0 and all(b % f == 0 for b in part[1:-1]):
            assert G.scale_partition(part, n // f, n) == (0,) + tuple(b // f for b in part[1:-1]) + (n // f,)
    assert G.lcm(4, 6, 16) == 48 and G.lcm() == 1


def test_output_sizes_match_torch():
    """conv_out / pool_out / conv_padding('same') against torch's own output shapes (meta tensors)."""
    rnd = random.Random(1)
    for _ in range(800):
        n, pool = rnd.randint(1, 40), rnd.random() < 0.5
        k, s, d = rnd.randint(1, 6), rnd.randint(1, 4), rnd.randint(1, 3)
        ke = G.kernel_extent(k, d)
        x = torch.empty(1, 1, n, device="meta")
        if pool:
            p, ceil = rnd.randint(0, k // 2), rnd.random() < 0.5
            ours = G.pool_out(n, k, s, p, d, ceil)
            try:
                got = F.max_pool1d(x, k, s, p, d, ceil).shape[-1]
            except RuntimeError:
                got = None
            assert (got if got and got > 0 else None) == (ours if ours > 0 else None), (n, k, s, p, d, ceil)
        else:
            padding = rnd.choice(("same", "valid", rnd.randint(0, 4))) if s == 1 else rnd.randint(0, 4)
            pb, pt = G.conv_padding(padding, ke)
            w = torch.empty(1, 1, k, device="meta")
            if n + pt < ke:
                continue
            assert F.conv1d(x, w, None, s, padding, d).shape[-1] == G.conv_out(n, ke, s, pt)
            if padding == "same":  # which input output 0's tap 0 reads: -pb (a one-hot probe)
                xs = torch.zeros(1, 1, n, dtype=torch.float64)
                xs[..., 0] = 1
                wk = torch.zeros(1, 1, k, dtype=torch.float64)
                wk[..., -1] = 1  # the last tap of output o reads o - pb + (k - 1) d
                y = F.conv1d(xs, wk, None, 1, "same", d)[0, 0]
                hits = [o for o in range(n) if y[o] != 0]
                assert hits == ([pb - (k - 1) * d] if 0 <= pb - (k - 1) * d < n else []), (n, k, d, pb)


def test_pool_divisors_match_torch():
    """avg pooling's divisor per output (count_include_pad either way, ceil_mode)
    against torch's: its sums (divisor_override=1) over its means of ones."""
    rnd = random.Random(6)
    for _ in range(300):
        n, k, s = rnd.randint(1, 30), rnd.randint(1, 6), rnd.randint(1, 4)
        p, ceil, incl = rnd.randint(0, k // 2), rnd.random() < 0.5, rnd.random() < 0.5
        n_out = G.pool_out(n, k, s, p, 1, ceil)
        if n_out < 1:
            continue
        ones = torch.ones(1, 1, 1, n, dtype=torch.float64)
        sums = F.avg_pool2d(ones, (1, k), (1, s), (0, p), ceil, incl, divisor_override=1)[0, 0, 0]
        means = F.avg_pool2d(ones, (1, k), (1, s), (0, p), ceil, incl)[0, 0, 0]
        assert (sums / means).round().long().tolist() == G.pool_divisors(0, n_out, n, k, s, p, incl), (n, k, s, p)
        o0 = rnd.randrange(n_out)
        assert G.pool_divisors(o0, n_out, n, k, s, p, incl) == G.pool_divisors(0, n_out, n, k, s, p, incl)[o0:]


def test_output_partition_and_needs_brute_force():
    """Output owners by the window-centre rule, output by output; each tile's
    needed inputs as the union of every tap of every output it owns; scene pads
    and halo extents counted position by position."""
    rnd = random.Random(2)
    checked = refused = 0
    for _ in range(CASES):
        split = _random_split(rnd, 60)
        if split is None:
            continue
        n, part, pool = split
        parts = len(part) - 1
        win = _random_window(rnd, n, pool)
        if win is None:
            continue
        k, s, d, p, pt, ceil, n_out = win
        ke = G.kernel_extent(k, d)
        owners = [_owner(part, o * s - p + (ke - 1) // 2) for o in range(n_out)]
        assert owners == sorted(owners)  # each tile's outputs are contiguous
        counts = [owners.count(i) for i in range(parts)]
        if min(counts) == 0:
            with pytest.raises(SPIMError, match="owns no output"):
                G.output_partition(part, n_out, ke, s, p, "op", "row")
            refused += 1
            continue
        out = G.output_partition(part, n_out, ke, s, p, "op", "row")
        assert out == G.partition_from_sizes(counts), (part, win)
        need = G.needs(out, ke, s, p)
        for i in range(parts):
            read = {x for o in range(out[i], out[i + 1]) for x in _taps(o, k, s, d, p)}
            assert need[i] == (min(read), max(read) + 1)
            before, after = G.scene_pads(need[i], n)
            assert before == sum(1 for x in range(*need[i]) if x < 0)
            assert after == sum(1 for x in range(*need[i]) if x >= n)
            assert before <= p  # padding only where the op pads
            if not ceil:
                assert after <= pt - p
            inside = [x for x in range(*need[i]) if 0 <= x < n]
            if not inside:  # a window all in the padding (a conv padded by more than its half kernel): refused later
                lo, hi = G.clip(need[i], n)
                assert hi <= lo
                continue
            assert G.halo_extents(part, need)[i] == (part[i] - inside[0], inside[-1] + 1 - part[i + 1])
        far = [i for i in range(parts) if any(abs(_owner(part, x) - i) > 1 for x in range(*G.clip(need[i], n)))]
        assert G.far_tile(part, need) == (far[0] if far else None)
        if s == 1 and k % 2 == 1 and p == (ke - 1) // 2 and pt == 2 * p:  # a "same" window keeps the partition
            assert out == part
        checked += 1
    assert checked > CASES // 3 and refused > 20, (checked, refused)


def _tile_conv_1d(x: list[float], w: list[float], part, out, k, s, d, p, pt, fill: float, op) -> list[float]:
    """The whole output assembled from the tiles, each computed as SPIM does."""
    n = len(x)
    got = []
    ke = G.kernel_extent(k, d)
    for i, (lo, hi) in enumerate(G.needs(out, ke, s, p)):
        before, after = G.scene_pads((lo, hi), n)
        a, b = G.clip((lo, hi), n)
        window = [fill] * before + x[a:b] + [fill] * after
        n_loc = (len(window) - ke) // s + 1
        assert n_loc == out[i + 1] - out[i]
        got += [op([window[o * s + j * d] for j in range(k)], w) for o in range(n_loc)]
    return got


def test_tiles_reproduce_the_whole_extent():
    """1-D conv (zero padding) and max pool (-inf padding, ceil_mode) on the
    tiles of random uneven partitions, each over its needed window with scene
    padding only, equal the op over the whole padded extent (exact floats)."""
    rnd = random.Random(3)
    conv = lambda v, w: sum(a * b for a, b in zip(v, w))  # noqa: E731
    mx = lambda v, w: max(v)  # noqa: E731
    done = 0
    for _ in range(1500):
        split = _random_split(rnd, 48)
        if split is None:
            continue
        n, part, pool = split
        case = _window_on(rnd, part, pool)
        if case is None:
            continue
        (k, s, d, p, pt, ceil, n_out), out, _ = case
        x = [float(rnd.randint(-50, 50)) for _ in range(n)]
        w = [float(rnd.randint(-3, 3)) for _ in range(k)]
        fill = float("-inf") if pool else 0.0
        padded = [fill] * p + x + [fill] * max(0, n_out * s + G.kernel_extent(k, d))
        op = mx if pool else conv
        ref = [op([padded[o * s + j * d] for j in range(k)], w) for o in range(n_out)]
        assert _tile_conv_1d(x, w, part, out, k, s, d, p, pt, fill, op) == ref, (part, win)
        done += 1
    assert done > 500


def _pixels_of(rows, cols, box) -> dict:
    """{(y, x): (tile row, tile col)} of the pixels in box (global rows, cols)."""
    (r0, r1), (c0, c1) = box
    return {(y, x): (_owner(rows, y), _owner(cols, x)) for y in range(r0, r1) for x in range(c0, c1)}


def test_exchange_plans_and_halo_volume_brute_force():
    """Per tile of random uneven 2-D grids and window ops: the plan's own and
    received pieces tile the clipped window exactly, each piece comes from the
    tile that owns it, what (i, j) sends to (r, c) is what (r, c) receives from
    (i, j), a far plan is needed exactly when a window holds a pixel of a
    non-adjacent tile, and the halo volume (geometry, bench.halo_bytes, the
    plans' sends) equals the pixels counted one by one."""
    rnd = random.Random(4)
    far_seen = near_seen = 0
    for _ in range(400):
        H, W = rnd.randint(2, 28), rnd.randint(2, 28)
        ph, pw = rnd.randint(1, min(4, H)), rnd.randint(1, min(4, W))
        rows, cols = _random_partition(rnd, H, ph), _random_partition(rnd, W, pw)
        cases = [_window_on(rnd, part, rnd.random() < 0.3) for part in (rows, cols)]
        if None in cases:
            continue
        need = [case[2] for case in cases]
        far = G.reaches_far(rows, need[0]) or G.reaches_far(cols, need[1])
        volume, sends = 0, {}
        brute_far = False
        for r in range(ph):
            for c in range(pw):
                win = (G.clip(need[0][r], H), G.clip(need[1][c], W))
                pix = _pixels_of(rows, cols, win)
                brute_far |= any(abs(i - r) > 1 or abs(j - c) > 1 for i, j in pix.values())
                volume += sum(1 for o in pix.values() if o != (r, c))
                plan = G.exchange_plan(rows, cols, need[0], need[1], (r, c), far)
                assert plan.origin == (rows[r], cols[c]) and plan.ext == win
                got = {}
                pieces = ([((r, c), plan.own)] if plan.own else []) + [(ij, (rr, cc)) for ij, rr, cc in plan.recv]
                for key, box in pieces:
                    for px, o in _pixels_of(rows, cols, box).items():
                        assert o == key and px not in got
                        got[px] = o
                assert got == pix
                for ij, rr, cc in plan.send:
                    sends[(r, c), ij] = (rr, cc)
        # every receive matches the sender's send (checked in both orders)
        for r in range(ph):
            for c in range(pw):
                plan = G.exchange_plan(rows, cols, need[0], need[1], (r, c), far)
                for ij, rr, cc in plan.recv:
                    assert sends[ij, (r, c)] == (rr, cc)
        assert far == brute_far
        assert len(sends) == sum(len(G.exchange_plan(rows, cols, need[0], need[1], (r, c), far).recv)
                                 for r in range(ph) for c in range(pw))
        sent = sum((rr[1] - rr[0]) * (cc[1] - cc[0]) for rr, cc in sends.values())
        assert G.halo_volume(rows, cols, need[0], need[1]) == volume == sent
        assert halo_bytes(rows, cols, need[0], need[1], 3) == 3 * volume
        far_seen += far
        near_seen += not far
    assert far_seen > 10 and near_seen > 100, (far_seen, near_seen)
    # the closed form of a 3x3 'same' conv: one line per interior border and direction, one pixel per corner pair
    rows, cols = (0, 9, 20, 30), (0, 19, 34)
    assert halo_bytes(rows, cols, border_needs(rows, 1, 1), border_needs(cols, 1, 1), 1) == \
        2 * 34 * 2 + 2 * 30 * 1 + 4 * 2 * 1


def test_border_strips_and_piece_terms_brute_force():
    """The padded-tile fast path's geometry: when padded_fit accepts a tile, the
    tile with torch's padding computes exactly the tile's outputs; every output
    that reads a halo pixel lies in exactly one strip, no output lies in two,
    and a strip's input range is what its outputs read. axis_term: the outputs
    and taps that read a piece are inside its ranges, and the region conv
    reads exactly the region with that many outputs."""
    rnd = random.Random(5)
    fits = strips_seen = 0
    for _ in range(2500):
        H, W = rnd.randint(4, 30), rnd.randint(4, 30)
        ph, pw = rnd.randint(1, 3), rnd.randint(1, 3)
        rows, cols = _random_partition(rnd, H, ph), _random_partition(rnd, W, pw)
        cases = [_window_on(rnd, part, False) for part in (rows, cols)]
        if None in cases:
            continue
        wins, outs, need = zip(*cases)
        far = G.reaches_far(rows, need[0]) or G.reaches_far(cols, need[1])
        if far:
            continue
        k, s, d = [w[0] for w in wins], [w[1] for w in wins], [w[2] for w in wins]
        ke = [G.kernel_extent(k[a], d[a]) for a in (0, 1)]
        r, c = rnd.randrange(ph), rnd.randrange(pw)
        plan = G.exchange_plan(rows, cols, need[0], need[1], (r, c))
        tile_hw = (rows[r + 1] - rows[r], cols[c + 1] - cols[c])
        my_need = (need[0][r], need[1][c])
        ranges = ((outs[0][r], outs[0][r + 1]), (outs[1][c], outs[1][c + 1]))
        recv = [(rr, cc) for _, rr, cc in plan.recv]
        fit = G.padded_fit(plan.origin, tile_hw, my_need, ranges, ke, s)
        # piece terms: brute force per axis for every received piece
        for a in (0, 1):
            lo, n_loc = my_need[a][0], ranges[a][1] - ranges[a][0]
            for box in recv:
                pa, pb = box[a]
                hits = [(o, j) for o in range(n_loc) for j in range(k[a]) if pa <= lo + o * s[a] + j * d[a] < pb]
                term = G.axis_term(pa, pb, lo, s[a], k[a], d[a], n_loc)
                if not hits:  # (a term without reads, possible between dilation gaps, adds zeros)
                    continue
                assert term is not None, (box, a)
                (o0, o1), (j0, j1), (before, after) = term
                # every (output, tap) that reads the piece is in the term (with dilation gaps it may hold more)
                assert 0 <= o0 < o1 <= n_loc and 0 <= j0 < j1 <= k[a]
                assert all(o0 <= o < o1 and j0 <= j < j1 for o, j in hits)
                start, end = pa - before, pb + after
                reads = [lo + o * s[a] + j * d[a] for o in range(o0, o1) for j in range(j0, j1)]
                assert start == min(reads) and end == max(reads) + 1
                assert (end - start - G.kernel_extent(j1 - j0, d[a])) // s[a] + 1 == o1 - o0
        if fit is None:
            continue
        fits += 1
        pad, lo, n = fit
        for a in (0, 1):
            t0 = plan.origin[a]
            assert n[a] == (tile_hw[a] + 2 * pad[a] - ke[a]) // s[a] + 1 == ranges[a][1] - ranges[a][0]
            # local output i of the padded tile reads what global output ranges[a][0] + i reads
            for i in range(n[a]):
                assert t0 - pad[a] + i * s[a] == (ranges[a][0] + i) * s[a] - wins[a][3]
        strips = G.halo_strips(plan.origin, tile_hw, recv, lo, s, ke, n)
        strips_seen += bool(strips)
        in_strip = {}
        for orows, ocols, irows, icols in strips:
            for a, (o, i) in enumerate(((orows, irows), (ocols, icols))):
                assert i == (lo[a] + o[0] * s[a], lo[a] + (o[1] - 1) * s[a] + ke[a])
            for y in range(*orows):
                for x in range(*ocols):
                    assert (y, x) not in in_strip
                    in_strip[y, x] = True
        halo_px = set(_pixels_of(rows, cols, plan.ext)) - set(_pixels_of(rows, cols, (
            (rows[r], rows[r + 1]), (cols[c], cols[c + 1]))))
        for y in range(n[0]):
            for x in range(n[1]):
                reads = {(lo[0] + y * s[0] + i * d[0], lo[1] + x * s[1] + j * d[1])
                         for i in range(k[0]) for j in range(k[1])}
                if reads & halo_px:
                    assert (y, x) in in_strip, (y, x)
    assert fits > 300 and strips_seen > 150, (fits, strips_seen)


def test_roll_pieces_reproduce_torch_roll():
    # the pure geometry on its own: every output element comes from exactly one piece
    for part in ((0, 5), (0, 3, 10), (0, 4, 8, 10), (0, 7, 10), (0, 2, 3, 9, 16)):
        n = part[-1]
        src = torch.arange(n)
        for shift in (0, 1, -1, 3, -4, n - 1, n, n + 2, -3 * n - 1, 7):
            out = torch.full((n,), -1)
            for j, k, lo, hi, dlo in G.roll_pieces(part, shift):
                assert part[j] <= lo < hi <= part[j + 1] and part[k] <= dlo and dlo + hi - lo <= part[k + 1]
                assert (out[dlo:dlo + hi - lo] == -1).all()
                out[dlo:dlo + hi - lo] = src[lo:hi]
            assert torch.equal(out, torch.roll(src, shift)), (part, shift)
            pairs = [(j, k) for j, k, *_ in G.roll_pieces(part, shift) if j != k]
            assert len(pairs) == len(set(pairs)), (part, shift)  # one message per pair of tiles


def test_resampling_partition_and_needs_brute_force():
    """proportional: the outputs before an input border b are those whose scaled extent
    ends within the first b inputs; tap_needs: the inputs a tile's outputs read, from
    the taps of torch-equivalent resampling (rest_ds.spim.ops.resample.axis_taps)."""
    from rest_ds.spim.ops.resample import axis_taps

    rnd = random.Random(7)
    for _ in range(300):
        n_in = rnd.randint(2, 40)
        n_out = rnd.choice([rnd.randint(1, 4 * n_in), n_in * rnd.choice([2, 4, 8]), max(1, n_in // 2)])
        part = _random_partition(rnd, n_in, rnd.randint(1, min(4, n_in)))
        bounds = G.proportional(part, n_in, n_out)
        assert bounds[0] == 0 and bounds[-1] == n_out and list(bounds) == sorted(bounds)
        for i, b in enumerate(part[1:-1], start=1):
            assert bounds[i] == sum(1 for o in range(n_out) if (o + 1) * n_in <= b * n_out)
        empty = [i for i in range(len(part) - 1) if bounds[i + 1] == bounds[i]]
        assert G.empty_tile(bounds) == (empty[0] if empty else None)
        if empty:
            continue
        mode = rnd.choice(["nearest", "nearest-exact", "bilinear", "bicubic", "area"])
        ac = mode in ("bilinear", "bicubic") and rnd.random() < 0.5
        idx, _ = axis_taps(n_in, n_out, mode, ac, None, torch.float64, torch.device("cpu"))
        lo, hi = tuple(idx.min(0).values.tolist()), tuple(idx.max(0).values.tolist())
        for t, (a, b) in enumerate(G.tap_needs(bounds, lo, hi)):
            read = {int(v) for o in range(bounds[t], bounds[t + 1]) for v in idx[:, o].tolist()}
            assert (a, b) == (min(read), max(read) + 1), (n_in, n_out, mode, part, t)
