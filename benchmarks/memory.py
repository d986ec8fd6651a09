"""Per-process peak resident memory on Linux, for the benchmark scripts.

``reset_peak()`` resets the kernel's high-water mark (``VmHWM``) through
``/proc/self/clear_refs``; the peak of the work that follows is then
``rss_kib("VmHWM") - baseline``, with ``baseline = rss_kib("VmRSS")`` read
right after the reset. (The helpers live in :mod:`rest_ds.train.bench`,
which ``rest-ds bench`` uses.)"""
from __future__ import annotations

from rest_ds.train.bench import reset_rss_peak as reset_peak, rss_kib

__all__ = ["reset_peak", "rss_kib"]
