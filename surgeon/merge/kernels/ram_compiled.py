"""RAM's and RAM+'s passes compiled: contribution counts and the mix, from and to stored dtypes.

Why. Through torch, a block of RAM is a float32 cast per input, a task
vector, a bool mask and an int32 count per model, a division and a sum: some
twenty op dispatches over 1 MiB temporaries, and RAM+ makes them twice (its
counting pass and the merge). On the 1.1B family RAM took 10.3 s and RAM+
19.3 s for a whole-job floor of 2.9 s. Here each pass is one numba call per
piece: a 512-entry chunk of every input is widened in L1
(:mod:`surgeon.merge.kernels._raw`).

Exactness. The same float32 operations as :func:`surgeon.merge.kernels.ram.ram_tensors`
in the same order: ``d_i = m_i - b``, kept where ``|d_i| > epsilon`` (as
float32) by multiplying with 1 or 0, divided by ``max(count, 1)`` or, for
RAM+'s scaled unique entries, times ``lambda_i``; the terms summed in model
order and added to the base. The counts are exact integers. So the bytes
equal the torch block path's (tests/test_merge_conformance.py, bit for bit).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from . import _raw
from ._jit import compiled, numba_module
from .scratch import ListedEntries

_CH = _raw.CHUNK


@compiled
def _kernels(jit: Any) -> Any:
    """RAM's counting and mix loops."""
    global _contributions, _add_counts  # helpers are globals, not closure cells: see _jit.py
    _raw.register()
    inline = numba_module().njit(inline="always", nogil=True, boundscheck=False, error_model="numpy")

    @inline
    def _contributions(b_all, ms, s, e, eps, b, m, d, nz, count):  # pragma: no cover - compiled
        # a chunk's kept task vectors d_i = (m_i - b) * [|m_i - b| > eps], the flags nz_i and their count
        k = e - s
        zero = np.float32(0.0)
        one = np.float32(1.0)
        _raw.load(b_all[s:e], b)
        for j in range(k):
            count[j] = 0
        for i in range(len(ms)):
            _raw.load(ms[i][s:e], m)
            row = d[i]
            flags = nz[i]
            for j in range(k):
                x = m[j] - b[j]
                c = 1 if abs(x) > eps else 0
                row[j] = x * (one if c else zero)
                flags[j] = c
                count[j] += c

    @inline
    def _add_counts(nz, count, k, shared, unique):  # pragma: no cover - compiled
        # per model, its contributing entries of the chunk that others share, and that are its alone
        for i in range(nz.shape[0]):
            row = nz[i]
            sh = 0
            un = 0
            for j in range(k):
                sh += row[j] if count[j] > 1 else 0
                un += row[j] if count[j] == 1 else 0
            shared[i] += sh
            unique[i] += un

    @jit
    def counts(b_all, ms, eps, shared, unique):  # pragma: no cover - compiled
        # per model, its contributing entries (|m_i - b| > eps) that others share, and that are its alone
        nm = len(ms)
        n = b_all.shape[0]
        b = np.empty(_CH, np.float32)
        m = np.empty(_CH, np.float32)
        d = np.empty((nm, _CH), np.float32)
        nz = np.empty((nm, _CH), np.int64)
        count = np.empty(_CH, np.int64)
        for s in range(0, n, _CH):
            e = min(n, s + _CH)
            k = e - s
            _contributions(b_all, ms, s, e, eps, b, m, d, nz, count)
            _add_counts(nz, count, k, shared, unique)

    @jit
    def mix(b_all, ms, eps, lam, scaled, shared, unique, alone_pos, alone_b, alone_m, alone_count,
            out_all):  # pragma: no cover - compiled
        # out = b + sum_i term_i, term_i = d_i [|d_i| > eps] / max(count, 1), or d_i * lam_i where the entry is
        # model i's alone and scaled[i]. Returns whether every result was finite.
        # Counting as well (RAM+ in one pass, when shared is not empty): adds the counts of `counts`
        # to shared and unique, and lists the entries only one model contributes to (alone_pos:
        # flat indices, alone_b/alone_m: their inputs, stored dtype; one spare last slot takes the
        # writes past the capacity; alone_count[0] counts them all).
        counting = shared.shape[0] > 0
        last = alone_pos.shape[0] - 1
        nm = len(ms)
        n = b_all.shape[0]
        b = np.empty(_CH, np.float32)
        m = np.empty(_CH, np.float32)
        d = np.empty((nm, _CH), np.float32)
        nz = np.empty((nm, _CH), np.int64)
        count = np.empty(_CH, np.int64)
        acc = np.empty(_CH, np.float32)
        chk = np.zeros(_CH, np.float32)
        for s in range(0, n, _CH):
            e = min(n, s + _CH)
            k = e - s
            _contributions(b_all, ms, s, e, eps, b, m, d, nz, count)
            for i in range(nm):
                row = d[i]
                li = lam[i]
                sc = scaled[i]
                for j in range(k):
                    c = count[j]
                    x = row[j]
                    term = x / np.float32(c if c > 1 else 1)
                    if sc:
                        term = x * li if c == 1 else term
                    acc[j] = term if i == 0 else acc[j] + term
            for j in range(k):
                acc[j] = b[j] + acc[j]
            _raw.store_checked(acc[:k], out_all[s:e], chk)
            if counting:
                _add_counts(nz, count, k, shared, unique)
                listed = alone_count[0]
                for j in range(k):
                    if count[j] == 1:  # rare (0.15 % of a 1.1B fine-tune's entries): a branch is cheap
                        at = min(listed, last)
                        alone_pos[at] = s + j
                        alone_b[at] = b_all[s + j]
                        for i in range(nm):
                            alone_m[i, at] = ms[i][s + j]
                        listed += 1
                alone_count[0] = listed
        return _raw.all_finite(chk)

    return SimpleNamespace(counts=counts, mix=mix)


def available() -> bool:
    """Whether the compiled loops can run (numba present and not switched off)."""
    return _kernels() is not None


def ram_counts(base: np.ndarray, models: tuple[np.ndarray, ...], epsilon: float, shared: np.ndarray,
               unique: np.ndarray) -> None:
    """Add a piece's shared and unique contributing entries per model (flat
    stored-dtype arrays) to ``shared`` and ``unique`` (int64)."""
    _kernels().counts(base, models, np.float32(epsilon), shared, unique)


_NO_COUNTS = np.zeros(0, dtype=np.int64)


def ram_mix(base: np.ndarray, models: tuple[np.ndarray, ...], epsilon: float, lambdas: list[float] | None,
            out: np.ndarray, alone: Alone | None = None) -> bool:
    """RAM (``lambdas`` None) or RAM+ of a piece into ``out`` (float32 or bf16
    bits); returns whether every result was finite. ``alone``: also count the
    piece's shared and unique contributions and list its entries only one model
    contributes to (:class:`Alone`)."""
    n = len(models)
    lam = np.array(lambdas if lambdas is not None else [1.0] * n, dtype=np.float32)
    scaled = np.array([lambdas is not None and float(v) != 1.0 for v in lam.tolist()], dtype=np.bool_)
    if alone is None:
        return bool(_kernels().mix(base, models, np.float32(epsilon), lam, scaled, _NO_COUNTS, _NO_COUNTS,
                                   _NO_COUNTS[:0], base[:0], np.empty((n, 0), models[0].dtype),
                                   np.zeros(1, np.int64), out))
    listed = alone.entries
    return bool(_kernels().mix(base, models, np.float32(epsilon), lam, scaled, alone.shared, alone.unique,
                               listed.positions, listed.base, listed.models, listed.count, out))


@dataclass
class Alone:
    """RAM+ in one pass (:meth:`surgeon.merge.kernels.ram.RamKernel.merge_raw`): per model, its
    shared and unique contributing entries (added to), and ``entries``: the piece's entries only
    one model contributes to."""

    shared: np.ndarray     # int64 [models]
    unique: np.ndarray     # int64 [models]
    entries: ListedEntries

    @classmethod
    def empty(cls, n_models: int, capacity: int, base_dtype: np.dtype, model_dtype: np.dtype) -> Alone:
        return cls(np.zeros(n_models, np.int64), np.zeros(n_models, np.int64),
                   ListedEntries.empty("alone", n_models, capacity, base_dtype, model_dtype))
