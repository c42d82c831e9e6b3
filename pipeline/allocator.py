"""glibc's allocator set for batch work, in the processes that decode images and run the model.

Every batch allocates the same large buffers again: decoded images, the resized batch, the model's
activations. glibc starts with a 128 KiB mmap threshold that it raises only as mmapped blocks are freed,
and it gives the top of its heap back to the OS whenever more than twice that is free, so a worker keeps
faulting in fresh zeroed pages, hundreds per image. With the threshold fixed where the dynamic one ends
(32 MiB) and 128 MiB of free heap kept, a batch reuses the memory of the one before (tests/test_allocator.py
measures both in one run; bench/RESULTS.md, "allocator", what it gains).

The free heap is kept by two settings. The trim threshold says when glibc gives the top of its heap back;
the top pad says how much it keeps when it does: glibc keeps only 128 KiB by default, so a batch whose
buffers happened to sit at the top of the heap gave them all back and faulted them in again on the next
batch (17,000 pages per batch where the others fault 357, in 1 process of 8 with a 64 MiB threshold alone).
With 128 MiB kept and a 128 MiB threshold, 16 processes of 16 measured faulted 357 pages per batch.

A process whose environment already sets these thresholds (``MALLOC_MMAP_THRESHOLD_`` and the like, or
their ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``) is left as it is, and so is one on another C library.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where its dynamic threshold stops
TRIM_THRESHOLD = 128 << 20  # free heap above this is given back...
TOP_PAD = 128 << 20  # ...down to this much (glibc's default keeps 128 KiB)

_tuned: bool | None = None


_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.top_pad",
             "glibc.malloc.mmap_max")


def user_set(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """Whether the environment sets glibc's thresholds itself (an environment variable or a tunable)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(k in environ for k in _ENV) or any(t + "=" in tunables for t in _TUNABLES)


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold at 32 MiB and keep 128 MiB of free heap, once per process; returns
    whether the process runs with these settings (False where they were left alone)."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if not sys.platform.startswith("linux") or user_set():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no glibc mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    return _tuned
