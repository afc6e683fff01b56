"""glibc malloc settings that stop XLA's large CPU temporaries from being mmapped per step.

XLA on CPU allocates each step's temporaries (tens of MB) with malloc. glibc serves blocks
above its mmap threshold with a fresh mmap and gives them back on free, so every step pays
kernel page faults and page zeroing for the same buffers again. Keeping large blocks on the
heap and never trimming it makes the memory of step N serve step N+1.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_applied = False


def tune_malloc() -> bool:
    """Apply the settings once per process (Linux + glibc only; JPAGED_MALLOC_TUNING=0 skips).

    Returns True when they are in effect.
    """
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or os.environ.get("JPAGED_MALLOC_TUNING", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
    ok = ok and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    _applied = bool(ok)
    logger.debug("malloc tuning %s", "applied" if ok else "refused")
    return _applied
