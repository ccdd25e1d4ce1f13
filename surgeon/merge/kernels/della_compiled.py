"""DELLA's MagPrune compiled: a piece's keep bits and L1 sums in one numba call per model.

Why. MagPrune keeps entry ``i`` of a row when its uniform ``u_i`` is below
``p(rank_i)``, the keep probability of its magnitude's rank in the row
(:func:`surgeon.merge.kernels.della.keep_table`). Ranking every entry — a
stable sort of each row, even as a radix sort (:mod:`surgeon.merge.select.ranks`,
~13 ns an entry) — was two thirds of a DELLA merge. But ``p`` is
non-decreasing in the rank, so an entry whose rank is only known to lie in
``[lo, hi]`` is already decided when ``u_i < p(lo)`` (kept) or ``u_i >= p(hi)``
(dropped). One counting sweep puts every entry in a bucket of its magnitude
(buckets are ranges of the bit pattern, which orders like the magnitude),
and the bucket's first and last ranks decide all but the few entries whose
uniform falls inside their bucket's probability range. Each of those is
ranked exactly by counting, over the row, the smaller magnitudes and the
equal ones before it (ties by index, as the stable sort); when a row has more
than :data:`EXACT_MAX` of them, the row is radix-sorted instead.
A task-vector entry of 0 needs no rank: it is 0 whether kept or not.

Exactness. The keep decisions are the reference's (``u < table[rank]``,
the same uniforms and the same float32 table), so the pruned task vectors are
bit-identical; the L1 norms are float64 sums of the same float32 values,
added row by row (the reference: torch's whole-tensor float64 sum), equal to
float64 rounding. The merge pass reads the keep bits
(:func:`surgeon.merge.kernels.ties_compiled.merge_raw`, ``kinds == 3``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import rng as _random
from ..select import ranks
from . import _raw
from ._jit import compiled

#: rows with more undecided entries than this are radix-sorted instead of counted one by one
EXACT_MAX = 48


def bucket_count(n: int) -> int:
    """Buckets for a row of ``n`` entries: a power of two near ``n / 4``, 64 to 4096.
    Any count gives the same decisions; fewer buckets mean a shorter walk over them
    per row but more undecided entries to rank. On the 1.1B family's rows (2048 and
    5632 entries, AVX2 host) ``n / 4`` was the fastest: 7.6 and 9.3 ns an entry
    against 8.1 and 9.5 with ``n / 2``, 7.7-8.0 and 9.7 with ``n / 8``."""
    b = 64
    while b < 4096 and b * 8 <= n:
        b *= 2
    return b


@compiled
def _kernels(jit: Any) -> Any:
    """The statistic loop of one model over a piece of whole rows."""
    global _order  # helpers are globals, not closure cells: see _jit.py
    _raw.register()
    _random.register()
    _order = ranks._kernels().order

    @jit
    def keep_bits(b_all, m_all, n, nb, key, start, table, bits, sums):  # pragma: no cover - compiled
        # b_all, m_all: a piece's rows of length n, stored dtype; key: the model's uniform stream;
        # start: the piece's flat index in the tensor; table: float32 [n], keep probability by rank;
        # bits: uint8, zeroed, one bit per entry (msb first); sums[0] += sum |d|, sums[1] += sum |kept d|.
        # Choices below are branch-free where the data is random (the uniforms): a mispredicted
        # branch per entry cost more than all the arithmetic.
        rows = m_all.shape[0] // n
        base = np.empty(n, np.float32)
        d = np.empty(n, np.float32)
        u = np.empty(n, np.float32)
        bucket = np.empty(n, np.int64)
        keep = np.empty(n, np.uint8)
        undecided = np.empty(n + 1, np.int64)
        cnt = np.zeros(nb + 1, np.int64)
        cnt2 = np.zeros(nb + 1, np.int64)  # odd entries: two count arrays halve the store-to-load chains
        t_lo = np.empty(nb + 1, np.float32)
        t_hi = np.empty(nb + 1, np.float32)
        va = np.empty(n, np.uint64)
        vb = np.empty(n, np.uint64)
        rcnt = np.zeros((4, 256), np.int64)
        mag = np.uint32(0x7FFFFFFF)
        low = np.uint64(0xFFFFFFFF)
        before = 0.0
        after = 0.0
        for r in range(rows):
            s = r * n
            _raw.load(b_all[s:s + n], base)
            _raw.load(m_all[s:s + n], d)
            for i in range(n):
                d[i] = d[i] - base[i]
            keys = d.view(np.uint32)
            # buckets: 0 holds the zeros; the others split [kmin, kmax] of the non-zero magnitudes' patterns
            kmin = mag
            kmax = np.uint32(0)
            for i in range(n):
                k = keys[i] & mag
                kmax = max(kmax, k)
                kmin = min(kmin, k if k != 0 else mag)
            shift = np.uint32(0)
            if kmax >= kmin:
                while ((kmax - kmin) >> shift) >= np.uint32(nb):
                    shift += np.uint32(1)
            for i in range(n):
                k = keys[i] & mag
                bucket[i] = 0 if k == 0 else 1 + np.int64((k - kmin) >> shift)
            for i in range(0, n - 1, 2):
                cnt[bucket[i]] += 1
                cnt2[bucket[i + 1]] += 1
            if n & 1:
                cnt[bucket[n - 1]] += 1
            first = 0
            for h in range(nb + 1):
                c = cnt[h] + cnt2[h]
                cnt[h] = 0
                cnt2[h] = 0
                if c > 0:
                    t_lo[h] = table[first]
                    t_hi[h] = table[first + c - 1]
                first += c
            _random.fill_uniform(key, start + s, u)
            # kept when u is below the bucket's lowest probability; undecided when below its highest
            na = 0
            for i in range(n):
                h = bucket[i]
                x = u[i]
                below = x < t_lo[h]
                inside = (x < t_hi[h]) & (h != 0)
                keep[i] = np.uint8(below)
                undecided[na] = i
                na += np.int64(inside & ~below)
            if na > EXACT_MAX:  # many undecided entries (a row of few distinct magnitudes): sort the row
                for a in range(na):
                    keep[undecided[a]] = 2
                srt = _order(keys, va, vb, rcnt)
                for p in range(n):
                    i = np.int64(srt[p] & low)
                    if keep[i] == 2:
                        keep[i] = 1 if u[i] < table[p] else 0
            else:
                for a in range(na):
                    i = undecided[a]
                    k = keys[i] & mag
                    rank = 0
                    for j in range(n):
                        rank += 1 if (keys[j] & mag) < k else 0
                    for j in range(i):
                        rank += 1 if (keys[j] & mag) == k else 0
                    keep[i] = 1 if u[i] < table[rank] else 0
            # the L1 sums in four float64 lanes (one running sum would wait on each add); the kept
            # value is x times keep as a float (0 or 1), not a choice between x and 0: a choice
            # compiled to a branch on random data, mispredicted ~1 in 3 (4 ns an entry on AVX2)
            b0, b1, b2, b3 = 0.0, 0.0, 0.0, 0.0
            a0, a1, a2, a3 = 0.0, 0.0, 0.0, 0.0
            n4 = n >> 2
            for g in range(n4):
                x0, x1, x2, x3 = d[4 * g], d[4 * g + 1], d[4 * g + 2], d[4 * g + 3]
                b0 += abs(np.float64(x0))
                b1 += abs(np.float64(x1))
                b2 += abs(np.float64(x2))
                b3 += abs(np.float64(x3))
                a0 += abs(np.float64(x0 * np.float32(keep[4 * g])))
                a1 += abs(np.float64(x1 * np.float32(keep[4 * g + 1])))
                a2 += abs(np.float64(x2 * np.float32(keep[4 * g + 2])))
                a3 += abs(np.float64(x3 * np.float32(keep[4 * g + 3])))
            for i in range(4 * n4, n):
                b0 += abs(np.float64(d[i]))
                a0 += abs(np.float64(d[i] * np.float32(keep[i])))
            before += (b0 + b1) + (b2 + b3)
            after += (a0 + a1) + (a2 + a3)
            # the bits, a byte at a time where the row starts on a byte
            done = 0
            if (s & 7) == 0:
                for g in range(n >> 3):
                    kk = keep[8 * g:8 * g + 8]
                    bits[(s >> 3) + g] = ((kk[0] << 7) | (kk[1] << 6) | (kk[2] << 5) | (kk[3] << 4)
                                          | (kk[4] << 3) | (kk[5] << 2) | (kk[6] << 1) | kk[7])
                done = 8 * (n >> 3)
            for i in range(done, n):
                q = s + i
                bits[q >> 3] |= np.uint8(keep[i] << (7 - (q & 7)))
        sums[0] += before
        sums[1] += after

    return keep_bits


def available() -> bool:
    """Whether the compiled loop can run (numba present and not switched off)."""
    return _kernels() is not None


def keep_bits(base: np.ndarray, model: np.ndarray, row: int, key: int, start: int, table: np.ndarray,
              bits: np.ndarray, sums: np.ndarray) -> None:
    """MagPrune one model over a piece of whole rows of ``row`` entries (flat
    stored-dtype arrays, :func:`surgeon.merge.kernels._raw.raw_inputs`):
    set the kept entries' bits in ``bits`` (uint8, zeroed, ``ceil(n / 8)``),
    and add ``sum |d|`` and ``sum |kept d|`` (float64) to ``sums[0]`` and
    ``sums[1]``. ``key``: the model's uniform stream; ``start``: the piece's
    flat index in the tensor; ``table``: :func:`surgeon.merge.kernels.della.keep_table`."""
    _kernels()(base, model, row, bucket_count(row), _random.signed_key(key), start, table, bits, sums)
