"""Process-level settings for training processes (the CLI, sweep workers, Ray tasks).

``tune_allocator``: on glibc, every large tensor freed and allocated again each step goes
back to the OS and page-faults in anew. Serving every allocation from the heap (no mmap,
whatever the size) and raising the trim threshold keeps that memory in the process: a
training step allocates the same sizes every time, so the freed blocks are reused as they
are. Measured on a 2-core CPU (ms per training step, one thread): DPFP-3 at S = 600 from 118
to 62, FAVOR+ 512 at S = 600 from 697 to 498 (glibc's largest mmap threshold, 32 MB, still
left FAVOR's 78 MB tensors to mmap).

``bound_openmp_spinning``: idle OpenMP workers spin briefly, not for long, before they sleep
(measured below).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30


def tune_allocator() -> bool:
    """Keep freed memory for reuse (glibc only; elsewhere a no-op). Returns True if applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


# OpenMP worker threads busy-wait after each parallel region before they sleep: libgomp's
# default is 300,000 spins. On a 2-core machine a spinning worker holds the core that the
# compiled steps' second thread (models/rules/native.py, ``_over_batch``) needs. Measured with
# two threads, 150 protocol steps: 5 tanh FWM seeds at S = 20 trained together 2.97-3.46 s at
# the default, 1.85-1.96 s at 10,000 spins; one run 0.60-0.67 s and 0.50-0.51 s; Linear at
# S = 100 and S = 600 unchanged. No spinning at all (0) took 2.3-2.7 s and slowed Linear S = 100.
OPENMP_SPINCOUNT = 10_000


def bound_openmp_spinning() -> bool:
    """Set GOMP_SPINCOUNT to OPENMP_SPINCOUNT unless the user chose a wait policy (GOMP_SPINCOUNT
    or OMP_WAIT_POLICY). libgomp reads it once, when torch loads it: call this before torch
    is imported. Returns True if set. The spin count changes timings, never a float."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = str(OPENMP_SPINCOUNT)
    return True
