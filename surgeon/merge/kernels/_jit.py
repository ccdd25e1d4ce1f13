"""numba set-up shared by every compiled loop of :mod:`surgeon.merge`.

- :func:`numba_module`: numba, or None when it is missing or switched off
  (``SURGEON_NO_NUMBA=1``, read through :mod:`surgeon.settings`).
- :func:`jit_options`: ``njit`` with the options every loop uses.
- :func:`compiled`: decorator turning a module's ``build(jit)`` into a cached
  getter of its compiled loops.

Cache invalidation. numba's on-disk cache (``cache=True``) keys each
function on the content of the file that defines it, but the loops inline
helpers from other files (``_raw.load``/``store``, ``rng.fill_uniform``):
editing ``_raw.py`` used to leave stale machine code behind until the cache
files were deleted by hand. :func:`_install_locator` registers a cache locator
for surgeon's kernel files whose freshness stamp is the hash of *all* of them
(:data:`KERNEL_SOURCES`), so a change to any kernel source recompiles every
loop on next use. See docs/architecture.md ("Compiled kernels").

Inline helpers are module globals, never closure cells. numba's cache index
key pickles a loop's closure cells, and a dispatcher pickles differently in
every process: a loop that closed over a helper (``scratch = inline(...)``
inside a builder, called from the loop) missed the cache and was compiled
anew by every process (~3 s of CPU a merge), its cache folder growing by one
entry each time. A builder declares its helpers ``global`` and defines them
under those names; tests/test_merge_conformance.py checks every loop.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import sys
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from ... import settings

_MERGE = Path(__file__).resolve().parent.parent
#: every source file whose code ends up inside a compiled loop
KERNEL_SOURCES: tuple[Path, ...] = (
    _MERGE / "kernels" / "_jit.py",
    _MERGE / "kernels" / "_raw.py",
    _MERGE / "kernels" / "ties_compiled.py",
    _MERGE / "kernels" / "linear.py",
    _MERGE / "kernels" / "nearswap.py",
    _MERGE / "kernels" / "widen_compiled.py",
    _MERGE / "kernels" / "sce_compiled.py",
    _MERGE / "kernels" / "della_compiled.py",
    _MERGE / "kernels" / "della_vector.py",
    _MERGE / "kernels" / "model_stock_compiled.py",
    _MERGE / "kernels" / "ram_compiled.py",
    _MERGE / "kernels" / "gram_compiled.py",
    _MERGE / "kernels" / "arcee_fusion.py",
    _MERGE / "rng.py",
    _MERGE / "select" / "counting.py",
)


def numba_module() -> Any:
    """The numba module, or None when it is unavailable or switched off
    (``SURGEON_NO_NUMBA=1``)."""
    if settings.current().no_numba:
        return None
    collecting = gc.isenabled()
    gc.disable()  # numba's first import: ~60 cycle collections, ~0.25 s, for objects that all live on
    try:
        if settings.numba_blas_wanted():
            import numba
        else:
            with _scipy_blas_hidden():
                import numba
                import numba.np.arraymath  # noqa: F401 - where numba looks for scipy's BLAS, once a process
    except ImportError:  # pragma: no cover - numba is a dependency; keep merges working without it
        return None
    finally:
        if collecting:
            gc.enable()
    allow_wide_vectors(numba)
    return numba


#: the LLVM subtarget feature that caps vectorised loops at 256-bit registers
PREFER_256 = "prefer-256-bit"


def allow_wide_vectors(numba: Any) -> bool:
    """Let numba's loops use 512-bit vectors on an AVX-512 host; returns whether it did.

    LLVM tunes Intel's AVX-512 CPUs (Skylake-X onwards) to vectorise with 256-bit registers
    (``prefer-256-bit``, against the clock slow-down that the first of them took on 512-bit
    instructions). On the development VM (AVX-512 Xeon), compiled without it, breadcrumbs'
    one-pass loop ran 4.5 -> 3.6 ns an entry and the 1.1B family's merges took 0.4-0.7 s less wall
    (breadcrumbs, breadcrumbs_ties, SCE, DELLA) and none slower (docs/merging.md, "Vector
    width"). So where the host has AVX-512 and the user chose neither numba's CPU name nor
    its features (``NUMBA_CPU_NAME``, ``NUMBA_CPU_FEATURES``: those win, e.g.
    ``NUMBA_CPU_FEATURES=<host features>,+prefer-256-bit`` to go back), numba compiles for the
    host's features with ``-prefer-256-bit`` added. Call before numba compiles anything in
    the process (its code generator reads the setting once); a compiled loop's cache entry is
    keyed by the features, so loops cached under other ones are compiled again once."""
    from numba.core import codegen, config

    if config.CPU_NAME is not None or config.CPU_FEATURES is not None:
        return False
    features = codegen.get_host_cpu_features()
    if "+avx512f" not in features.split(","):
        return False
    config.CPU_FEATURES = f"{features},-{PREFER_256}"
    return True


#: the modules numba imports to offer BLAS and LAPACK inside compiled code
_SCIPY_BLAS = ("scipy.linalg.cython_blas", "scipy.linalg.cython_lapack")


@contextlib.contextmanager
def _scipy_blas_hidden() -> Iterator[None]:
    """Inside the block, importing scipy's BLAS and LAPACK modules fails (as where scipy is
    not installed), unless something imported them already; afterwards they import as
    usual. numba's array maths, imported inside, then record that compiled code has no
    BLAS (:func:`surgeon.settings.configure_process`, ``numba_blas``)."""
    hide = [name for name in _SCIPY_BLAS if name not in sys.modules]
    for name in hide:
        sys.modules[name] = None  # type: ignore[assignment] - Python's marker for "cannot be imported"
    try:
        yield
    finally:
        for name in hide:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


@lru_cache(maxsize=1)
def sources_stamp() -> bytes:
    """sha256 over the contents of :data:`KERNEL_SOURCES` (the cache's freshness stamp)."""
    h = hashlib.sha256()
    for p in KERNEL_SOURCES:
        h.update(p.name.encode())
        try:
            h.update(p.read_bytes())
        except OSError:  # pragma: no cover - a zipped install: fall back to numba's per-file stamp
            pass
    return h.digest()


@lru_cache(maxsize=1)
def _install_locator() -> bool:
    """Put a cache locator for surgeon's kernel files first in numba's list
    (once). Files outside :mod:`surgeon.merge` are left to numba's own
    locators. Returns False when numba's caching internals differ from the
    ones this was written against (numba 0.6x): the per-file stamps then apply."""
    try:
        from numba.core import caching
    except ImportError:  # pragma: no cover
        return False
    base = getattr(caching, "InTreeCacheLocator", getattr(caching, "_InTreeCacheLocator", None))
    impl = getattr(caching, "CacheImpl", getattr(caching, "_CacheImpl", None))
    if base is None or impl is None or not isinstance(getattr(impl, "_locator_classes", None), list):
        return False  # pragma: no cover - other numba versions
    mine = {str(p) for p in KERNEL_SOURCES}

    class KernelSourcesLocator(base):  # type: ignore[misc, valid-type]
        """numba's in-tree ``__pycache__`` locator, stamped by all kernel sources."""

        def get_source_stamp(self) -> Any:
            return sources_stamp()

        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> Any:
            if str(Path(py_file).resolve()) not in mine:
                return None
            return super().from_function(py_func, py_file)

    if not any(getattr(c, "__name__", "") == "KernelSourcesLocator" for c in impl._locator_classes):
        impl._locator_classes.insert(0, KernelSourcesLocator)
    return True


def jit_options(**extra: Any) -> Any:
    """numba's ``njit`` with the options every compiled loop of surgeon uses,
    or None without numba: ``nogil`` (the engine's compute threads run them
    side by side), ``cache`` (compiled once per machine, recompiled when any
    kernel source changes; best effort, :func:`best_effort_cache`), no bounds
    checks, and numpy's error model (IEEE results such as x / 0 = inf instead
    of Python exceptions, and no checks inside the loops). ``extra``: more
    ``njit`` options for one helper (``fastmath={"reassoc"}`` lets a float
    sum whose order is free run in vector lanes)."""
    nb = numba_module()
    if nb is None:
        return None
    _install_locator()
    njit = nb.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy", **extra)

    def jit(fn: Callable[..., Any]) -> Any:
        return best_effort_cache(njit(fn))

    return jit


def best_effort_cache(dispatcher: Any) -> Any:
    """Make a compiled loop's on-disk cache an extra: a save or load that fails with an
    ``OSError`` (a full disk, a file-size limit, a read-only install, an unreadable
    file) is skipped, and the loop runs compiled in memory. numba itself lets these
    errors out of the first call, which would fail a merge over its cache. Returns
    ``dispatcher``."""
    cache = getattr(dispatcher, "_cache", None)
    save, load = getattr(cache, "save_overload", None), getattr(cache, "load_overload", None)
    if save is None or load is None:  # pragma: no cover - other numba versions
        return dispatcher

    def save_overload(sig: Any, data: Any) -> None:
        try:
            save(sig, data)
        except OSError:
            pass  # compiled again by the next process

    def load_overload(sig: Any, target_context: Any) -> Any:
        try:
            return load(sig, target_context)
        except OSError:
            return None  # as if not cached: compile

    cache.save_overload, cache.load_overload = save_overload, load_overload
    return dispatcher


#: options of the ``@overload`` helpers inlined into the loops
OVERLOAD_OPTIONS = {"nogil": True, "boundscheck": False, "error_model": "numpy"}


def compiled(build: Callable[[Any], Any]) -> Callable[[], Any]:
    """Decorator: ``build(jit)`` defines a module's compiled loops; the
    decorated name becomes a cached getter returning them (compiled, or loaded
    from numba's cache, on first use), or None without numba."""
    @lru_cache(maxsize=1)
    def build_once() -> Any:
        jit = jit_options()
        return None if jit is None else build(jit)

    def get() -> Any:
        # SURGEON_NO_NUMBA is honoured on every call, not only before the first
        # compilation (tests switch backends with monkeypatch.setenv)
        return None if settings.current().no_numba else build_once()

    get.__doc__ = build.__doc__
    return get
