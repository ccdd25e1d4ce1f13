"""Keep freed memory in the process instead of handing it back to the kernel.

Why. A merge allocates and frees the same few megabytes of float32 block
temporaries tens of thousands of times. glibc's malloc gives memory at the top
of its heaps back to the kernel once more than a few MiB are free there
(``M_TRIM_THRESHOLD``, 2x the dynamic ``M_MMAP_THRESHOLD``: 2 MiB after a
1 MiB block), so the next block's first write page-faults and the kernel
zeroes the pages again. On the 2-core development VM, where a fresh page is
expensive, that was 4 of a TIES merge's 65 CPU seconds (``clear_page_erms``
under the bf16 -> float32 casts, from ``perf``); raising both thresholds cut
its system time from 23 s to 15 s. Each malloc heap (one per thread that
allocates) keeps at most :data:`TRIM_THRESHOLD` free: 1 GiB let a DARE
merge's peak RSS grow from 1.2 to 1.5 GB, 64 MiB left TIES at 1.39 GB, and
16 MiB — still more than a compute thread's block temporaries — gave 1.17 GB
at the same speed and page-fault count.

Transparent huge pages. torch asks the kernel for huge pages on large
allocations (``madvise(MADV_HUGEPAGE)``), and with the common ``defrag:
madvise`` setting the kernel then compacts memory *synchronously* on the
first touch to find free 2 MiB pages. With the page cache full of model
files, that is slow: the first read into each fresh 32 MiB read buffer took
~130 ms instead of ~25 ms (2.1 s of a 1.1B TIES merge's reader time went to
16 buffers). The buffers are reused for the whole run, so huge pages would
save almost nothing afterwards; the command line turns them off for its own
process (``PR_SET_THP_DISABLE``).

:func:`surgeon.settings.configure_process` calls :func:`keep_freed_memory`
and :func:`no_huge_pages` (the command line calls it once, since the process
is its own; library users may call it themselves). Other C libraries (musl,
macOS) are left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
import threading
from functools import lru_cache

_PAGE = mmap.PAGESIZE
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: allocations below this come from malloc's heaps (reused) rather than fresh
#: mmaps; 32 MiB is the most glibc accepts on 64-bit (half its heap size)
MMAP_THRESHOLD = 32 << 20
#: free memory a heap keeps at its top before giving any back
TRIM_THRESHOLD = 16 << 20

_done = False


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    """The C library, loaded once: ``find_library`` runs ``ldconfig`` in a
    child process, which forks the whole merge (~2 ms a call, and the engine
    trims once a tensor). ``libc.so.6`` is glibc's name everywhere; the lookup
    is only the fallback."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        pass
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Raise glibc malloc's trim and mmap thresholds for this process (once
    per process). Returns whether the thresholds were set (False off glibc)."""
    global _done
    if _done:
        return True
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done


#: anonymous memory a merge may gain over its level after the last trim before
#: :class:`HeapTrim` trims again
TRIM_SLACK = 256 << 20


def anon_bytes() -> int | None:
    """This process's resident anonymous memory (``/proc/self/statm``: resident minus
    shared pages, ~10 us), or None where that file is missing."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class HeapTrim:
    """:func:`release_free_memory`, but only once the process's anonymous memory
    has grown by more than ``slack`` since the last trim (or since this object was
    made); thread-safe.

    Why. ``malloc_trim`` hands back every free page, and whatever is allocated
    next faults its pages in again (zeroed). A merge whose kernels allocate large
    torch temporaries paid for that once a tensor: Arcee Fusion on the 1.1B family
    spent ~10 of its 13 system seconds re-faulting memory trimmed after every
    tensor's statistic pass (26 -> 19 s wall without the trims). The trims only
    matter when freed holes accumulate (:func:`release_free_memory`: SCE's
    statistics), which shows as growth.
    """

    def __init__(self, slack: int = TRIM_SLACK):
        self.slack = slack
        self._lock = threading.Lock()
        self._mark = anon_bytes()

    def __call__(self) -> bool:
        """Trim if grown past the slack; returns whether it trimmed."""
        with self._lock:
            now = anon_bytes()
            if now is not None and self._mark is not None and now - self._mark <= self.slack:
                return False
            trimmed = release_free_memory()
            self._mark = anon_bytes()
            return trimmed


def release_free_memory() -> bool:
    """Hand the free memory inside malloc's heaps back to the kernel (glibc
    ``malloc_trim(0)``: every heap, holes below the top included); False off glibc.

    Why. The trim threshold only frees what lies at a heap's top. A kernel
    with statistic passes holds its statistics (histograms, sums) across a
    tensor's pieces while pieces and outputs come and go, and the holes they
    leave stayed: a three-model SCE on the 1.1B family grew from 0.8 to
    1.22 GB over the run, and to 1.05 GB with this called once a tensor's
    statistics are done (~0.8 ms a call). The merge engine calls it there, through
    :class:`HeapTrim` (only once the heaps have grown).
    """
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True


_PR_SET_THP_DISABLE = 41


def no_huge_pages() -> bool:
    """Disable transparent huge pages for this process (Linux >= 3.15;
    inherited by children). Returns whether the kernel accepted it."""
    libc = _libc()
    try:
        prctl = libc.prctl  # type: ignore[union-attr]
    except AttributeError:
        return False
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0
