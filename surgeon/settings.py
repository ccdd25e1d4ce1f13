"""Process settings: every ``SURGEON_*`` environment variable, read in one place.

Variables (all optional):

``SURGEON_NO_NUMBA=1``
    run every merge kernel with torch ops instead of the compiled numba loops
    (same numbers; for diagnosis and for machines without numba).
``SURGEON_COMPUTE_WORKERS=N``
    compute threads of a merge (default: the run's ``threads``).
``SURGEON_KEEP_WRITE_CACHE=1``
    write the output through the page cache and leave it there (the writer
    normally writes it past the cache with ``O_DIRECT``, or drops it from the
    cache behind itself: :mod:`surgeon.io.direct_write`).
``SURGEON_NO_PLOT=1``
    draw no pictures (cards and ``surgeon diff --plot`` behave as without matplotlib).
``SURGEON_FULL_EXIT=1``
    let the ``surgeon`` command end through the interpreter's whole teardown
    (:func:`exit_process` skips it; set this for tools that write their results
    at teardown, such as ``python -m cProfile``).

:func:`current` returns them parsed; the environment is read again only when
one of these variables changed (tests set them with ``monkeypatch.setenv``).

:func:`configure_process` sets the process-wide policies a merge wants
(allocator thresholds, transparent huge pages, torch threads, the cycle
collector). The command line applies it to its own process; a library user
may call it, and nothing in surgeon changes them otherwise: importing surgeon
writes nothing to ``os.environ`` and a run restores torch's thread count when
it returns. See docs/architecture.md ("Settings").
"""
from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
from dataclasses import dataclass
from typing import NoReturn

#: the variables this module reads, with a one-line description each
VARIABLES: dict[str, str] = {
    "SURGEON_NO_NUMBA": "1: torch ops instead of the compiled merge loops",
    "SURGEON_COMPUTE_WORKERS": "compute threads of a merge (default: the run's threads)",
    "SURGEON_KEEP_WRITE_CACHE": "1: write the output through the page cache and leave it there",
    "SURGEON_NO_PLOT": "1: draw no pictures, as without matplotlib",
    "SURGEON_FULL_EXIT": "1: end the command through the interpreter's whole teardown",
}


@dataclass(frozen=True)
class Settings:
    """The parsed ``SURGEON_*`` variables."""

    no_numba: bool = False
    compute_workers: int | None = None
    keep_write_cache: bool = False
    no_plot: bool = False
    full_exit: bool = False


def _flag(raw: str | None) -> bool:
    return (raw or "").strip() not in ("", "0")


def _parse(raw: tuple[str | None, ...]) -> Settings:
    no_numba, workers, keep, no_plot, full_exit = raw
    n: int | None = None
    if workers is not None and workers.strip():
        try:
            n = max(1, int(workers))
        except ValueError:
            from .errors import InvalidInputError

            raise InvalidInputError(f"SURGEON_COMPUTE_WORKERS must be a whole number, got {workers!r}") from None
    return Settings(no_numba=_flag(no_numba), compute_workers=n, keep_write_cache=_flag(keep),
                    no_plot=bool((no_plot or "").strip()), full_exit=_flag(full_exit))


_cache: tuple[tuple[str | None, ...], Settings] | None = None


def current() -> Settings:
    """The settings of this process, from its environment."""
    global _cache
    raw = tuple(os.environ.get(k) for k in VARIABLES)
    if _cache is None or _cache[0] != raw:
        _cache = (raw, _parse(raw))
    return _cache[1]


#: whether numba, once surgeon's first compiled loop loads it, may load scipy's BLAS (a process
#: policy :func:`configure_process` sets; read by :mod:`surgeon.merge.kernels._jit`)
_numba_blas = True


def numba_blas_wanted() -> bool:
    """Whether numba may load scipy's BLAS when surgeon first loads it (True unless
    :func:`configure_process` turned it off for this process)."""
    return _numba_blas


def configure_process(*, threads: int | None = None, huge_pages: bool = False, keep_freed_memory: bool = True,
                      freeze_gc: bool = True, quiet_late_blas: bool = True, numba_blas: bool = False) -> dict[str, bool]:
    """Apply surgeon's process-wide policies to *this* process (the CLI calls it once).

    - ``keep_freed_memory``: raise glibc malloc's trim/mmap thresholds so freed
      block buffers are reused instead of page-faulted again
      (:mod:`surgeon.allocator`);
    - ``huge_pages``: False turns transparent huge pages off for the process
      (``PR_SET_THP_DISABLE``: first touches of fresh read buffers compacted
      memory, ~130 vs ~25 ms); True asks torch to back large tensors with them
      (``THP_MEM_ALLOC_ENABLE``, effective only before torch's first allocation);
    - ``threads``: torch's intra-op threads (None: unchanged);
    - ``freeze_gc``: move the objects alive now (torch's import) out of the cycle
      collector's sight (~4 % of a TIES merge's CPU time went to full collections);
    - ``quiet_late_blas``: BLAS libraries loaded from now on start with one thread
      (``OPENBLAS_NUM_THREADS=1`` unless set): a merge's first compiled loop imports numba's
      array maths, which loads scipy's OpenBLAS where scipy is installed, whose extra thread
      busy-waited ~0.1 CPU-s beside the merge's compute threads. numpy's BLAS, loaded with
      torch, keeps its threads; code that wants more asks threadpoolctl (a transplant's
      products do);
    - ``numba_blas``: False lets surgeon's first compiled loop set numba up without scipy's
      BLAS (numba imports ``scipy.linalg`` to offer ``np.dot`` inside compiled code, which
      surgeon's loops never call: ~0.2 s at the start of every merge, before its first
      piece). numba code compiled later in this process then cannot call ``np.dot`` or
      ``np.linalg``; ``scipy.linalg`` itself imports as usual. No effect once numba has
      set its array maths up (``numba.np.arraymath`` imported).

    Returns which of them took effect.
    """
    from . import allocator

    global _numba_blas
    done = {"keep_freed_memory": False, "huge_pages_off": False, "threads": False, "freeze_gc": False,
            "quiet_late_blas": False, "numba_without_blas": False}
    if keep_freed_memory:
        done["keep_freed_memory"] = allocator.keep_freed_memory()
    if huge_pages:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    else:
        done["huge_pages_off"] = allocator.no_huge_pages()
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
        done["threads"] = True
    if freeze_gc:
        gc.freeze()
        done["freeze_gc"] = True
    if quiet_late_blas and "OPENBLAS_NUM_THREADS" not in os.environ:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        done["quiet_late_blas"] = True
    _numba_blas = numba_blas
    done["numba_without_blas"] = not numba_blas and "numba.np.arraymath" not in sys.modules
    return done


def exit_process(code: int | None) -> NoReturn:
    """End this process with ``code`` as ``sys.exit`` would, without the interpreter's teardown.

    Everything a program can observe of a normal exit still happens, in the
    same order: non-daemon threads are waited for (with the hooks that stop
    idle executor workers), ``atexit`` handlers run (logging's flush, temporary
    folders' cleanup, ``weakref.finalize``), and standard output and error are
    flushed. What is skipped is tearing down every module and object, which
    with torch loaded takes ~0.5 s of a command's wall time. Finalisers do not
    run: a file object still open with buffered writes would lose them (surgeon
    leaves none open; its writer's journal is flushed line by line).
    ``SURGEON_FULL_EXIT=1`` (:class:`Settings`) exits through ``sys.exit`` instead.
    """
    code = 0 if code is None else code
    if current().full_exit:
        sys.exit(code)
    shutdown = getattr(threading, "_shutdown", None)  # CPython's own first exit step
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a reader that left, or a stream a caller closed
            if stream is sys.stdout and code == 0:
                code = 120  # what the interpreter returns when the final flush of stdout fails
    os._exit(code)
