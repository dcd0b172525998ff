"""Handing freed memory back to the operating system between blocks.

glibc's allocator keeps freed heap memory for reuse; after a block's float tensors and
temporaries are freed it can hold hundreds of MB that no later block fits into exactly
(~0.4 GB at the end of a 1.1 B-parameter RTN run, in a probe). `malloc_trim` returns
the free pages; once per block it costs milliseconds. Elsewhere (macOS, musl) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache


@cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def trim() -> None:
    """Return the allocator's free memory to the system (a no-op where that is not possible)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
