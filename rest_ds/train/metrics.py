"""Pixel loss on sharded logits, confusion matrices and segmentation metrics.

The loss follows docs/design.md section 4: ``sum over valid pixels / global count of
valid pixels``. On a :class:`~rest_ds.spim.SpatialTensor` the sum and the count
are all-reduced over the sp group by SPIM's ``F.cross_entropy`` rule, so the
loss is the whole-scene loss, the same value on every sp rank. Gradients are
NOT scaled here: the replicated loss back-propagated on every sp rank gives
``sp x`` the per-tile share, and the data-parallel average over all ``dp x sp``
ranks (DeepSpeed's) turns that into the exact whole-scene gradient averaged
over dp (rest_ds/spim/comm.py; checked by tests/test_train_engine.py).

Confusion matrices are ``K x K`` int64, rows = true class, columns = predicted
class, over pixels whose label is not ``ignore_index``; summing them over sp
and dp ranks gives the matrix of all evaluated scenes.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def pixel_loss(logits, target, *, ignore_index: int = -100, weight: torch.Tensor | None = None,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross entropy over the labelled pixels of the whole scene (or batch).

    ``logits``: ``N x K x H x W`` (a SpatialTensor or a plain tensor);
    ``target``: ``N x H x W`` class ids with the same layout (a SpatialTensor
    for sharded logits). Returns a replicated scalar."""
    return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)


def segmentation_loss(out, target, *, aux_weight: float = 0.0, **kw) -> torch.Tensor:
    """``pixel_loss`` of the logits, plus ``aux_weight x`` that of the auxiliary
    logits when the model returned ``(logits, aux_logits)``."""
    if isinstance(out, (tuple, list)):
        loss = pixel_loss(out[0], target, **kw)
        if len(out) > 1 and aux_weight:
            loss = loss + aux_weight * pixel_loss(out[1], target, **kw)
        return loss
    return pixel_loss(out, target, **kw)


def confusion_matrix(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, num_classes: int,
                     ignore_index: int = -100) -> np.ndarray:
    """``K x K`` int64 counts (rows: true, columns: predicted) over pixels whose
    target is a class id in ``[0, K)`` (``ignore_index`` and anything else skipped)."""
    p = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    t = target.detach().cpu().numpy() if isinstance(target, torch.Tensor) else np.asarray(target)
    p, t = p.reshape(-1).astype(np.int64), t.reshape(-1).astype(np.int64)
    keep = (t >= 0) & (t < num_classes) & (t != ignore_index)
    idx = t[keep] * num_classes + np.clip(p[keep], 0, num_classes - 1)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).astype(np.int64)


def _nan_to_none(v):
    return None if (isinstance(v, float) and math.isnan(v)) else v


def segmentation_metrics(conf: np.ndarray, class_names: list[str] | None = None) -> dict:
    """mIoU, per-class IoU, overall accuracy (OA), per-class and mean F1, Cohen's
    kappa, per-class precision/recall, from a confusion matrix.

    Means are over the classes present in the labels (row sum > 0); a class
    absent from the labels has IoU/F1 ``None`` (JSON null) and is not averaged."""
    conf = np.asarray(conf, dtype=np.float64)
    K = conf.shape[0]
    names = list(class_names) if class_names else [str(i) for i in range(K)]
    tp = np.diag(conf)
    gt = conf.sum(1)
    pr = conf.sum(0)
    total = conf.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (gt + pr - tp)
        precision = tp / pr
        recall = tp / gt
        f1 = 2 * tp / (gt + pr)
    present = gt > 0
    iou[~present] = np.nan
    f1[~present] = np.nan
    recall[~present] = np.nan
    precision = np.where(pr > 0, precision, 0.0)
    precision[~present] = np.nan
    oa = float(tp.sum() / total) if total else float("nan")
    pe = float((gt * pr).sum() / total ** 2) if total else float("nan")
    kappa = (oa - pe) / (1 - pe) if total and pe < 1 else float("nan")
    return {
        "mIoU": float(np.nanmean(iou)) if present.any() else float("nan"),
        "OA": oa,
        "mF1": float(np.nanmean(f1)) if present.any() else float("nan"),
        "kappa": float(kappa),
        "pixels": int(total),
        "per_class": {
            n: {"IoU": _nan_to_none(float(iou[i])), "F1": _nan_to_none(float(f1[i])),
                "precision": _nan_to_none(float(precision[i])), "recall": _nan_to_none(float(recall[i])),
                "pixels": int(gt[i])}
            for i, n in enumerate(names)
        },
    }


def class_weights_from_counts(counts, kind: str | list[float] | None, num_classes: int) -> list[float] | None:
    """Loss class weights: None, an explicit list, or ``sqrt_inv`` (1/sqrt of the
    class frequency over ``counts``, classes without pixels weighted 0,
    normalised to a mean of 1 over the classes with pixels)."""
    if kind is None:
        return None
    if not isinstance(kind, str):
        if len(kind) != num_classes:
            raise ValueError(f"train.class_weights: {len(kind)} weights for {num_classes} classes")
        return [float(v) for v in kind]
    c = np.asarray(counts, dtype=np.float64)
    if c.shape != (num_classes,):
        raise ValueError(f"class counts for {c.shape[0] if c.ndim else 0} classes, the model has {num_classes}")
    w = np.where(c > 0, 1.0 / np.sqrt(np.maximum(c, 1) / max(c.sum(), 1)), 0.0)
    w = w / w[c > 0].mean()
    return [float(v) for v in w]


__all__ = ["pixel_loss", "segmentation_loss", "confusion_matrix", "segmentation_metrics", "class_weights_from_counts"]
