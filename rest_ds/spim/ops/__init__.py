"""Sharded rules for torch ops on :class:`~rest_ds.spim.tensor.SpatialTensor`.

Importing this package registers every rule. One module per family of ops."""
from . import pointwise, structural, reduce, window, norm, resample, adaptive, loss, linear, patch, roll  # noqa: F401
