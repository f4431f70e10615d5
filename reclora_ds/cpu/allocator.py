"""Keep freed CPU memory in the process, so a training step does not page-fault its temporaries back in.

A CRM step allocates and frees the same few-MB tensors every step (the [B, L, E] search gather, the
[B, K, H] attention activations and their gradients). glibc's malloc serves blocks above its mmap
threshold with a fresh ``mmap`` and unmaps them on ``free``, and trims the heap top back to the kernel, so
each step touches thousands of new pages: every first write is a page fault and a page of zeroing. What
the setting buys: ``benchmarks/bench_crm.py --allocator``, docs/CRM_RESULTS.md section 4. Scoring a stage-2
run (the LLM's activations, eager attention's [B, H, T, T] scores) does the same, and
:func:`reclora_ds.training.scoring.score_table` sets it on a CPU; what it buys there, and why the stage-2
recipe does not set it: docs/PLORA_BENCH.md, "Measured and not adopted".

:func:`keep_freed_memory` fixes the mmap threshold at its maximum (32 MiB on 64-bit glibc: larger blocks
still get their own mapping) and raises the trim threshold, so freed blocks are reused. The cost is that
the process keeps its peak heap instead of returning it. Other C libraries (musl, macOS) are left as they
are. The environment variables ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` do the same
before a process starts; this sets them from inside it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

# mallopt parameters of glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc
TRIM_THRESHOLD = 1024 * 1024 * 1024

_done = False


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (module docstring) once per process; True when they were set."""
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = (
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    if not ok:
        log.warning(
            "glibc mallopt refused the mmap / trim thresholds; CPU steps may page-fault their temporaries"
        )
    _done = ok
    return ok


def keeping_freed_memory() -> bool:
    """True when :func:`keep_freed_memory` has set the thresholds in this process."""
    return _done
