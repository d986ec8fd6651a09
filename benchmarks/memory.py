"""Per-process peak resident memory on Linux, for the benchmark scripts.

``reset_peak()`` resets the kernel's high-water mark (``VmHWM``) through
``/proc/self/clear_refs``; the peak of the work that follows is then
``rss_kib("VmHWM") - baseline``, with ``baseline = rss_kib("VmRSS")`` read
right after the reset."""
from __future__ import annotations

import re


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
