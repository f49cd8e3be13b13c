"""Facts about this machine that the service reports or checks against."""

from __future__ import annotations

import os


def available_memory_bytes() -> int:
    """Memory available to new allocations (MemAvailable), or total memory when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0
