"""Compiled histogram loops for :mod:`surgeon.merge._streamselect` on CPU.

Why not ``torch.bincount``. The exact selection behind the TIES and breadcrumbs
trims counts the bit patterns of every ``|delta|`` twice per tensor. On CPU,
``torch.bincount`` scans its input three times (minimum, maximum, then the
scalar counting loop) into a fresh histogram that must then be added to the
running one, and the second pass first needs three more elementwise ops to
clamp the keys; on the 2-core development machine that was ~40 % of a TIES
merge. The same counts from one numba loop each (``nogil``, so the engine's
compute threads run them side by side) take 1/2 (top 16 bits) and 1/5 (one
bucket) of the time: a profile-guided choice, measured in
``docs/merging.md``.

numba is imported on first use only (CPU merges that trim by magnitude), and
compiled functions are cached on disk (``cache=True``), so only the very first
run pays the compilation (~2 s). Set ``SURGEON_NO_NUMBA=1`` to count with
torch ops instead (same counts; tests check both).
"""
from __future__ import annotations

import os
from functools import lru_cache
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

#: entries scanned per chunk of the bucket count: a chunk with no entry in
#: the bucket (most of them, the bucket holding well under 1 % of a tensor) is
#: skipped after one vectorised test
_CHUNK = 64
#: spare bins of the dense bucket count (a power of two)
_TRASH = 16
#: bucket share of a tensor above which the branch-free bucket count is faster
#: (measured: 0.2 % share 100 vs 260 us per 2^18 entries; 11 %: 660 vs 345)
DENSE_SHARE = 0.01


def _numba() -> Any:
    """The numba module, or None when it is unavailable or switched off
    (``SURGEON_NO_NUMBA=1``)."""
    if os.environ.get("SURGEON_NO_NUMBA", "").strip() not in ("", "0"):
        return None
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency; keep merges working without it
        return None
    return numba


def jit_options() -> Any:
    """numba's ``njit`` with the options every compiled loop of surgeon uses,
    or None without numba: ``nogil`` (the engine's compute threads run them
    side by side), ``cache`` (compiled once per machine), no bounds checks,
    and numpy's error model (IEEE results such as x / 0 = inf instead of
    Python exceptions, and no checks inside the loops)."""
    nb = _numba()
    if nb is None:
        return None
    return nb.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")


def compiled(build: Callable[[Any], Any]) -> Callable[[], Any]:
    """Decorator: ``build(jit)`` defines a module's compiled loops; the
    decorated name becomes a cached getter returning them (compiled, or loaded
    from numba's cache, on first use), or None without numba."""
    @lru_cache(maxsize=1)
    def get() -> Any:
        jit = jit_options()
        return None if jit is None else build(jit)

    get.__doc__ = build.__doc__
    return get


@compiled
def _kernels(jit: Any) -> Any:
    """The counting loops."""

    @jit
    def top16(bits, hist):  # pragma: no cover - compiled
        # the mask keeps a caller's negative value (sign bit set) inside the
        # histogram: no bounds checks here, and a stray write would corrupt memory
        for i in range(bits.shape[0]):
            hist[(bits[i] >> np.uint32(16)) & np.uint32(0x7FFF)] += 1

    @jit
    def bucket16_sparse(bits, bucket, hist):  # pragma: no cover - compiled
        # few entries in the bucket: skip whole chunks after one vectorised test
        b = np.uint32(bucket)
        n = bits.shape[0]
        for s in range(0, n, _CHUNK):
            e = min(n, s + _CHUNK)
            hit = False
            for i in range(s, e):
                hit |= (bits[i] >> np.uint32(16)) == b
            if hit:
                for i in range(s, e):
                    v = bits[i]
                    if (v >> np.uint32(16)) == b:
                        hist[v & np.uint32(0xFFFF)] += 1

    @jit
    def bucket16_dense(bits, bucket, hist):  # pragma: no cover - compiled
        # many entries in the bucket: no branch to mispredict; entries outside
        # it count into _TRASH spare bins past the end (several, so that
        # consecutive increments do not wait on each other)
        b = np.uint32(bucket)
        for i in range(bits.shape[0]):
            v = bits[i]
            if (v >> np.uint32(16)) == b:
                j = v & np.uint32(0xFFFF)
            else:
                j = np.uint32(0x10000) + (np.uint32(i) & np.uint32(_TRASH - 1))
            hist[j] += 1

    return SimpleNamespace(top16=top16, sparse=bucket16_sparse, dense=bucket16_dense)


def compiled_counts_available() -> bool:
    return _kernels() is not None


def _bits(values: torch.Tensor) -> np.ndarray:
    return values.detach().reshape(-1).contiguous().view(torch.int32).numpy().view(np.uint32)


def count_top16(values: torch.Tensor, hist: torch.Tensor) -> None:
    """``hist[v >> 16] += 1`` for the bit pattern ``v`` of each non-negative
    float32 in ``values`` (``hist``: int64, 2**15 bins, on the values' device)."""
    k = _kernels()
    if k is not None and values.device.type == "cpu":
        k.top16(_bits(values), hist.numpy())
        return
    hist.add_(torch.bincount(values.reshape(-1).view(torch.int32) >> 16, minlength=hist.numel()))


def bucket_hist(device: torch.device) -> torch.Tensor:
    """A zeroed histogram for :func:`count_bucket` (2**16 bins, plus spare
    bins that :func:`bucket_counts` drops)."""
    return torch.zeros((1 << 16) + _TRASH, dtype=torch.int64, device=device)


def bucket_counts(hist: torch.Tensor) -> torch.Tensor:
    return hist[:1 << 16]


def count_bucket(values: torch.Tensor, bucket: int, hist: torch.Tensor, share: float = 1.0) -> None:
    """``hist[v & 0xFFFF] += 1`` for the bit patterns ``v`` of ``values``
    whose top 16 bits equal ``bucket`` (``hist`` from :func:`bucket_hist`).
    ``share``: the fraction of entries expected in the bucket (picks the loop)."""
    k = _kernels()
    if k is not None and values.device.type == "cpu":
        (k.dense if share > DENSE_SHARE else k.sparse)(_bits(values), bucket, hist.numpy())
        return
    n = 1 << 16
    rel = (values.reshape(-1).view(torch.int32) - (bucket << 16)).clamp_(-1, n).add_(1)
    hist[:n].add_(torch.bincount(rel, minlength=n + 2)[1:n + 1])
