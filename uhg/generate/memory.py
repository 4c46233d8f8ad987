"""Freed memory stays in generation processes.

glibc returns a freed block above its mmap threshold (at most 32 MiB by default) straight to the
operating system, and trims the heap's free top beyond twice that threshold. Generating one full
PXD event allocates and frees several maps of 30-60 MiB (noise, gates, the decoder's last
feature maps), so every event faulted their pages in afresh: ~45 000 page faults and ~70 ms of
system CPU per event, a third of its cost (docs/benchmarks.md). With both thresholds raised the
next event reuses the same memory. Generation workers call `keep_freed_memory` once, when they
load their generator (`uhg.generate.distributed.open_generator`).
"""

from __future__ import annotations

import ctypes
import sys

RETAINED_BYTES = 1 << 30  # blocks up to 1 GiB come from (and go back to) the process heap
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def keep_freed_memory(limit: int = RETAINED_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds to `limit` bytes for this process. Returns True where
    that took effect, False on a C library without `mallopt` (then nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
    except (OSError, AttributeError):  # e.g. musl: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
