"""Per-rank inference on a scene: whole-scene (SPIM) and sliding-window (cropping baseline).

The scene is padded at its bottom/right to a multiple of the model's alignment
``A`` (fill 0 = the band mean after normalisation, labels ``ignore_index``,
pixels invalid), so any scene size works with any model; results are cropped
back to the scene. Training and inference pad the same way.

* :func:`predict_whole`: this rank's tile of the padded scene through the
  parallelized model (exactly the whole-scene logits, docs/design.md section 2).
* :func:`predict_slide`: the logits of this rank's tile as the average of the
  logits of every ``crop x crop`` window (stride ``crop - overlap``, mmseg's
  ``slide_inference`` window rule) that overlaps the tile. Each window is a
  plain single-device forward and windows are added in one global order, so the
  result is bit-identical for any number of ranks.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..data import read_tile
from ..spim import from_local, to_local


def round_up(n: int, a: int) -> int:
    return int(math.ceil(n / a) * a) if a > 1 else int(n)


def padded_shape(shape: tuple[int, int], align: int) -> tuple[int, int]:
    """``(H, W)`` rounded up to multiples of ``align``."""
    return round_up(shape[0], align), round_up(shape[1], align)


def read_padded(reader, rows: slice, cols: slice, scene_hw: tuple[int, int], *, stats, plan=None,
                region: str | None = None, with_label: bool = True, fill: float = 0.0, cache=None):
    """Window ``rows x cols`` of the padded (augmented) scene of size ``scene_hw``
    before padding. Returns ``(image C x h x w float32, label h x w int64 or None,
    valid h x w bool)``; only the part inside the scene is read from disk (or taken
    from ``cache``, a :class:`~rest_ds.data.WindowCache`)."""
    H, W = scene_hw
    r0, r1, c0, c1 = rows.start, rows.stop, cols.start, cols.stop
    h, w = r1 - r0, c1 - c0
    C = reader.shape[0]
    want_label = with_label and reader.label is not None
    img = np.full((C, h, w), np.float32(fill), dtype=np.float32)
    lab = np.full((h, w), reader.scene.ignore_index, dtype=np.int64) if want_label else None
    valid = np.zeros((h, w), dtype=bool)
    ir1, ic1 = min(r1, H), min(c1, W)
    if r0 < ir1 and c0 < ic1:
        t = read_tile(reader, slice(r0, ir1), slice(c0, ic1), stats=stats, plan=plan,
                      region=region if want_label else None, fill=fill, with_label=want_label,
                      cache=cache)
        img[:, : ir1 - r0, : ic1 - c0] = t.image
        valid[: ir1 - r0, : ic1 - c0] = t.valid
        if want_label:
            lab[: ir1 - r0, : ic1 - c0] = t.label
    return img, lab, valid


def logits_of(out) -> torch.Tensor:
    """The main logits of a model output (``(logits, aux)`` in training mode), as a
    local tensor (the tile of a SpatialTensor)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    return to_local(out)


def predict_whole(model, mesh, layout, x: torch.Tensor) -> torch.Tensor:
    """Logits ``1 x K x h x w`` of this rank's tile ``x`` (``1 x C x h x w``) of
    the padded scene split by ``layout``; ``model`` is parallelized when sp > 1."""
    if mesh.sp > 1:
        x = from_local(x, mesh, layout=layout)
    return logits_of(model(x))


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """``(r0, r1, c0, c1)`` windows covering ``height x width``: mmseg's rule (the last
    window of a row/column is shifted back to end at the border; windows are
    smaller than ``crop`` only when the scene is)."""
    if crop < 1 or stride < 1:
        raise ValueError(f"slide: crop ({crop}) and stride ({stride}) must be >= 1")

    def starts(n):
        k = max(n - crop + stride - 1, 0) // stride + 1
        out = []
        for i in range(k):
            a = i * stride
            b = min(a + crop, n)
            out.append((max(b - crop, 0), b))
        return out

    return [(a, b, c, d) for a, b in starts(height) for c, d in starts(width)]


def predict_slide(model, reader, stats, rows: slice, cols: slice, *, crop: int, overlap: int, align: int,
                  num_classes: int, min_forwards: int = 0, batch: int = 1,
                  progress: bool = False, device=None) -> tuple[torch.Tensor, int]:
    """Sliding-window logits ``K x h x w`` of the scene window ``rows x cols`` and
    the number of forwards run. ``model`` is a plain (not parallelized) model in
    eval mode. With ``min_forwards`` the last window is run again until that
    many forwards were made (ZeRO-3 needs every rank to run as many forwards).
    ``progress``: a progress bar over the windows (tqdm, stderr). Windows run on
    ``device`` (default: CPU); the result is on the CPU."""
    _, H, W = reader.shape
    if not 0 <= overlap < crop:
        raise ValueError(f"slide: overlap ({overlap}) must be in [0, crop={crop})")
    r0, r1, c0, c1 = rows.start, rows.stop, cols.start, cols.stop
    wins = [w for w in slide_windows(H, W, crop, crop - overlap)
            if w[0] < r1 and w[1] > r0 and w[2] < c1 and w[3] > c0]
    acc = torch.zeros(num_classes, r1 - r0, c1 - c0, dtype=torch.float32)
    cnt = torch.zeros(1, r1 - r0, c1 - c0, dtype=torch.float32)
    n = 0
    todo = list(wins)
    fallback = wins[-1] if wins else (0, min(crop, H), 0, min(crop, W))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(wins), desc="windows", unit="win", leave=False, dynamic_ncols=True)
    while todo or n < min_forwards:
        pad = not todo
        group, todo = ([fallback], todo) if pad else (todo[:batch], todo[batch:])
        xs = []
        for (a, b, c, d) in group:
            ph, pw = round_up(b - a, align), round_up(d - c, align)
            img, _, _ = read_padded(reader, slice(a, a + ph), slice(c, c + pw), (H, W), stats=stats, with_label=False)
            xs.append(torch.from_numpy(img))
        xb = torch.stack(xs)
        out = logits_of(model(xb if device is None else xb.to(device))).float().cpu()
        n += 1
        if pad:
            continue  # only keeps the collective count equal across ranks
        for (a, b, c, d), lg in zip(group, out):
            ia, ib, ic, id_ = max(a, r0), min(b, r1), max(c, c0), min(d, c1)
            acc[:, ia - r0:ib - r0, ic - c0:id_ - c0] += lg[:, ia - a:ib - a, ic - c:id_ - c]
            cnt[:, ia - r0:ib - r0, ic - c0:id_ - c0] += 1
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    return acc / cnt.clamp_min(1), n


__all__ = ["round_up", "padded_shape", "read_padded", "logits_of", "predict_whole", "slide_windows", "predict_slide"]
