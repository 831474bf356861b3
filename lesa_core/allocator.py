"""Keep the memory a generation frees for its next step, instead of handing it back to the kernel.

torch allocates CPU tensors with the C library's malloc. glibc's malloc gives large blocks back
to the kernel as soon as they are freed: a block above the mmap threshold (128 KiB at first,
raised as such blocks come and go) is unmapped, and a heap whose free top exceeds the trim
threshold is shrunk. A DiT's step allocates and frees the same activations on every call, so
each call can fault every page of them back in, and the kernel zeroes each page first. On the
2-core Intel Xeon of 2026-11-28, a full batch-8 call of the reference image model took ~1,000
page faults when it followed predicted steps (which free different blocks in between), against
~100 when it followed another full call: accelerated generations lost ~5% of every full step
to the allocator (`benchmarks/bench_predicted_call.py` counts the faults; `--allocator default`
measures without this tuning).

`retain_freed_memory` raises both thresholds, as allocators built for servers (jemalloc,
tcmalloc) behave by default: freed blocks stay in the process for the next step. The cost is
that the process's resident memory stays near its high-water mark (blocks above
`MMAP_THRESHOLD` are still unmapped when freed, and a free heap top above `TRIM_THRESHOLD` is
still trimmed). Only glibc on Linux is tuned; elsewhere it does nothing and says so.

The service calls it at start (`LESA_RETAIN_FREED_MEMORY`, on by default), as do the `lesa`
commands and the benchmarks, so every timing is measured as the server runs.
"""

from __future__ import annotations

import ctypes
import platform
import sys

# mallopt's parameter numbers (glibc <malloc.h>)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# 32 MiB is the largest mmap threshold glibc's dynamic adjustment itself reaches on 64-bit
# machines (DEFAULT_MMAP_THRESHOLD_MAX); larger blocks (weights being loaded) still go back.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20

_retained = False


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse; True if it now does (idempotent)."""
    global _retained
    if _retained:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _retained = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _retained


def freed_memory_retained() -> bool:
    """Whether `retain_freed_memory` tuned this process (benchmarks record it beside their timings)."""
    return _retained
