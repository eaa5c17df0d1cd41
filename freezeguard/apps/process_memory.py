"""This process's memory as the Linux kernel counts it: the resident set now and its peak.

The CPU has no allocator counter like ``torch.cuda.max_memory_allocated``; the benchmarks and the
baselines' cost figures read the kernel's instead (``/proc/self``).

Example:
    >>> rss_bytes() > 0 and peak_rss_bytes() >= rss_bytes() // 2
    True
"""
from __future__ import annotations

import os
import re


def rss_bytes() -> int:
    """The resident set size now (``/proc/self/statm``); OSError where there is no /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The resident set's high-water mark (VmHWM) since the process started or ``reset_peak_rss``."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024


def reset_peak_rss() -> None:
    """Reset the high-water mark to the current resident set (Linux >= 4.0: "5" to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


__all__ = ["rss_bytes", "peak_rss_bytes", "reset_peak_rss"]
