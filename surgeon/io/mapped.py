"""Byte ranges of checkpoint files as views of the page cache (no copy).

Why. A streamed merge reads every input byte once or twice; ``pread`` copies
each byte from the page cache into a buffer of ours: ~0.16-0.2 CPU-s a GB on
the 2-core development VM (1.6-2.2 s of a 1.1B TIES merge, plus the first
touch of the read buffers), where mapping the same range costs ~0.03 s a GB
(page-table entries, 64 KiB at a fault). The kernels then read the file's
cached pages directly.

How memory stays bounded. Pages touched through a mapping count in the
process's resident set until they are unmapped, so every view comes with a
``release`` that drops the range's page-table entries (``MADV_DONTNEED``)
once its piece is merged: the pages stay in the page cache, and RSS holds
only the pieces in flight, as with read buffers. Dropping is always safe:
a view used afterwards faults the same bytes back in.

Faults, not populating. The thread that computes on a view faults its pages
in as it reads them (the kernel maps a fault's neighbours with it, and whole
large folios; on a cold file its read-ahead follows the sequential faults).
Filling the page tables ahead on the reader thread (``MADV_POPULATE_READ``,
as this module did) walked them a page at a time and held every prefetched
piece's pages mapped at once: on the 1.1B family's TIES merge, alternating
runs gave 12.7 -> 11.8 s wall and peak RSS 0.98 -> 0.79 GB without it (linear
and DARE-TIES alike), and no slower with a cold page cache.

Lifetimes. A file is mapped once (``MAP_PRIVATE``, readable and writable so
that torch and numba see ordinary writable arrays; a write would only
change a private copy, never the file) and unmapped when the last view of
it is gone: every view holds a reference to the mapping, and nothing here
ever closes one explicitly (``mmap.close`` would unmap under live views).

Where it does not apply (off Linux, where ``MADV_DONTNEED`` need not drop
a file page from the resident set; a file that cannot be mapped; a range not
aligned to its dtype) :meth:`FileMaps.view` returns None and the caller
reads with ``pread``. An input truncated by another
process while it is mapped ends the process with SIGBUS where ``pread``
would have failed with an error; inputs are never written during a run.
"""
from __future__ import annotations

import ctypes
import mmap
import sys
import threading
from pathlib import Path
from typing import Callable, Protocol

import torch

_PAGE = mmap.PAGESIZE
#: the largest page-cache folio (a PMD: 2 MiB on x86-64 and arm64 with 4 KiB pages). A fault
#: maps the whole folio it falls in, so reading a few KB of a file cached in large folios maps
#: up to this much (0.7 MB a touch on average on the development VM's ext4)
_FOLIO = 2 << 20
_LINUX = sys.platform.startswith("linux") and hasattr(mmap.mmap, "madvise")


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise(addr, length, advice)`` through ctypes, which lets go of the GIL
    for the call (``mmap.madvise`` holds it: on a 1.1B TIES merge the compute threads'
    releases held it ~0.5 s, while the unmapping walked page tables); None off Linux."""
    if not _LINUX:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # pragma: no cover - a libc without it
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn  # type: ignore[no-any-return]


_MADVISE = _libc_madvise()


class Release(Protocol):
    """Hands a view's pages back (``MADV_DONTNEED``; the view stays readable: it
    faults them back in). No arguments: the view's pages. ``(start, stop)``: a
    part of the view the caller read (bytes from its start), rounded out to
    whole :data:`_FOLIO` blocks, which may reach into neighbouring bytes (their
    readers fault them back in)."""

    def __call__(self, start: int = 0, stop: int | None = None) -> None: ...


class FileMaps:
    """One private mapping per file, made on first use; thread-safe."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap | None] = {}
        self._lock = threading.Lock()

    def _mapping(self, file: Path, fd: int) -> mmap.mmap | None:
        with self._lock:
            if file not in self._maps:
                try:
                    self._maps[file] = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE,
                                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
                except (OSError, ValueError, AttributeError):  # empty file, no mmap here: read it instead
                    self._maps[file] = None
            return self._maps[file]

    def view(self, file: Path, fd: int, offset: int, nbytes: int, align: int) -> tuple[torch.Tensor, Release] | None:
        """Bytes ``[offset, offset + nbytes)`` of ``file`` (open as ``fd``) as a
        uint8 tensor viewing the mapping, and the :class:`Release` that hands its
        pages back; None where a mapping does not apply (then read the bytes).
        ``align``: the element size the bytes will be viewed as. Pages map as
        they are read (see "Faults, not populating" above)."""
        if nbytes <= 0 or offset % max(1, align) or not _LINUX:
            return None
        mm = self._mapping(file, fd)
        if mm is None or offset + nbytes > len(mm):
            return None
        lo = offset - offset % _PAGE  # advice starts on a page
        span = offset + nbytes - lo
        t = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset)
        base = t.data_ptr() - offset  # the mapping's first byte (page-aligned); ``mm`` outlives the view

        def release(start: int = 0, stop: int | None = None) -> None:
            a, b = lo, lo + span
            if start or stop is not None:  # a part read: the large folios it touched, whole
                a = max(0, (offset + start) // _FOLIO * _FOLIO)
                b = min(len(mm), -(-(offset + (nbytes if stop is None else stop)) // _FOLIO) * _FOLIO)
            if _MADVISE is not None:  # advice only: a failure (-1) changes nothing
                _MADVISE(base + a, b - a, mmap.MADV_DONTNEED)
                return
            try:  # pragma: no cover - without ctypes' libc
                mm.madvise(mmap.MADV_DONTNEED, a, b - a)
            except (OSError, ValueError):
                pass

        return t, release

    def forget(self) -> None:
        """Drop this object's references: each mapping goes once its last view is freed."""
        with self._lock:
            self._maps.clear()

