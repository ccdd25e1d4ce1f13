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
uniform falls inside their bucket's probability range. Only entries whose
uniform lies in ``[p(0), p(n - 1))`` (a share of ``2 epsilon``: 20 % at
epsilon 0.1) look their bucket up at all; the rest are kept or dropped by the
uniform alone, in a loop the compiler vectorises. Each undecided entry is
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
from . import _jit, _raw
from ._jit import compiled

#: rows with more undecided entries than this are radix-sorted instead of counted one by one
EXACT_MAX = 48

#: buckets span at most the top ``2**SPAN_BINADES`` binades of a row's magnitudes; smaller
#: non-zero magnitudes share the lowest bucket (a tiny outlier would otherwise coarsen every bucket)
SPAN_BINADES = 4


def bucket_count(n: int) -> int:
    """Buckets for a row of ``n`` entries: a power of two near ``n / 8``, 64 to 4096.
    Any count gives the same decisions; fewer buckets mean a shorter walk over them
    per row but more undecided entries to rank. On the 1.1B family's rows (2048 and
    5632 entries, AVX-512 host) ``n / 8`` was the fastest: 3.5 and 4.2 ns an entry
    against 3.7 and 4.3 with ``n / 4``, 4.0 and 4.5 with ``n / 2``."""
    b = 64
    while b < 4096 and b * 16 <= n:
        b *= 2
    return b


def shift_cap(nb: int) -> int:
    """The widest bucket (a right shift of the magnitude's bit pattern) with which
    ``nb`` buckets still span no more than ``2**SPAN_BINADES`` binades' worth of patterns
    (``nb`` a power of two)."""
    return max(0, 23 + SPAN_BINADES - (nb - 1).bit_length())


@compiled
def _kernels(jit: Any) -> Any:
    """The statistic loop of one model over a piece of whole rows."""
    global _order, _l1_sums  # helpers are globals, not closure cells: see _jit.py
    _raw.register()
    _random.register()
    _order = ranks._kernels().order

    @_jit.jit_options(fastmath={"reassoc"})
    def _l1_sums(d, keep, n):  # pragma: no cover - compiled
        # (sum |d|, sum |d kept|) in float64; reassociation lets the sums run in vector
        # lanes (the reference is torch's whole-tensor float64 sum: no order to keep). The
        # kept value is d times keep as a float (0 or 1), not a choice between d and 0: a
        # choice compiled to a branch on random bits, mispredicted ~1 in 3
        before = 0.0
        after = 0.0
        for i in range(n):
            x = d[i]
            before += abs(np.float64(x))
            after += abs(np.float64(x * np.float32(keep[i])))
        return before, after

    @jit
    def keep_bits(b_all, m_all, n, nb, cap, key, start, table, bits, sums):  # pragma: no cover - compiled
        # b_all, m_all: a piece's rows of length n, stored dtype; nb buckets, at most 2**cap
        # patterns wide; key: the model's uniform stream; start: the piece's flat index in the
        # tensor; table: float32 [n], keep probability by rank; bits: uint8, zeroed, one bit per
        # entry (msb first); sums[0] += sum |d|, sums[1] += sum |kept d|.
        # Choices are branch-free where the data is random (the uniforms): a mispredicted
        # branch per entry cost more than all the arithmetic. Loops that compilers vectorise
        # (the whole row) are kept apart from those that gather (the band's entries).
        rows = m_all.shape[0] // n
        base = np.empty(n, np.float32)
        d = np.empty(n, np.float32)
        u = np.empty(n, np.float32)
        bucket = np.empty(n, np.int32)
        mags = np.empty(n, np.uint32)
        keep = np.zeros((n + 7) // 8 * 8, np.uint8)
        words = keep.view(np.uint64)  # keep[8 g] is the low byte of words[g]: numba's platforms are little-endian
        gather8 = np.uint64(0x8040201008040201)
        in_band = np.empty(n, np.uint8)
        band = np.empty(n + 1, np.int64)
        undecided = np.empty(n + 1, np.int64)
        cnt = np.zeros((4, nb + 1), np.int32)  # four count rows: shorter store-to-load chains
        probs = np.empty((nb + 1, 2), np.float32)  # a bucket's lowest and highest keep probability
        va = np.empty(n, np.uint64)
        vb = np.empty(n, np.uint64)
        rcnt = np.zeros((4, 256), np.int64)
        mag = np.uint32(0x7FFFFFFF)
        low = np.uint64(0xFFFFFFFF)
        p_lo = table[0]
        p_hi = table[n - 1]
        before = 0.0
        after = 0.0
        for r in range(rows):
            s = r * n
            _raw.load(b_all[s:s + n], base)
            _raw.load(m_all[s:s + n], d)
            for i in range(n):
                d[i] = d[i] - base[i]
            keys = d.view(np.uint32)
            # buckets: 0 holds the zeros; the others split [klo, kmax] of the non-zero
            # magnitudes' bit patterns (which order as the magnitudes do)
            kmin = mag
            kmax = np.uint32(0)
            for i in range(n):
                k = keys[i] & mag
                kmax = max(kmax, k)
                kmin = min(kmin, k if k != 0 else mag)
            shift = np.uint32(0)
            klo = kmin
            if kmax >= kmin:
                while ((kmax - kmin) >> shift) >= np.uint32(nb):
                    shift += np.uint32(1)
                if shift > cap:
                    shift = np.uint32(cap)
                    klo = kmax - (np.uint32(nb - 1) << shift)
            for i in range(n):
                k = keys[i] & mag
                mags[i] = k
                h = np.int32(1) + np.int32((max(k, klo) - klo) >> shift)
                bucket[i] = h if k != 0 else np.int32(0)
            n4 = n >> 2
            for g in range(n4):
                cnt[0, bucket[4 * g]] += 1
                cnt[1, bucket[4 * g + 1]] += 1
                cnt[2, bucket[4 * g + 2]] += 1
                cnt[3, bucket[4 * g + 3]] += 1
            for i in range(4 * n4, n):
                cnt[0, bucket[i]] += 1
            first = 0
            for h in range(nb + 1):
                c = cnt[0, h] + cnt[1, h] + cnt[2, h] + cnt[3, h]
                probs[h, 0] = table[min(first, n - 1)]
                probs[h, 1] = table[max(first + c - 1, 0)]
                first += c
            cnt[:, :] = 0
            _random.fill_uniform(key, start + s, u)
            # below the lowest probability of any rank: kept; at or above the highest:
            # dropped; in between (the band), decided by the rank range of the entry's bucket
            for i in range(n):
                x = u[i]
                keep[i] = np.uint8(x < p_lo)
                in_band[i] = np.uint8((x >= p_lo) & (x < p_hi))
            nband = 0
            for i in range(n):
                band[nband] = i
                nband += np.int64(in_band[i])
            na = 0
            for a in range(nband):
                i = band[a]
                h = bucket[i]
                x = u[i]
                below = x < probs[h, 0]
                keep[i] = np.uint8(below)
                undecided[na] = i
                na += np.int64((x < probs[h, 1]) & ~below & (h != 0))
            if na > EXACT_MAX:  # many undecided entries (a row of few distinct magnitudes): sort the row
                for a in range(na):
                    keep[undecided[a]] = 2
                srt = _order(keys, va, vb, rcnt)
                for p in range(n):
                    i = np.int64(srt[p] & low)
                    if keep[i] == 2:
                        keep[i] = 1 if u[i] < table[p] else 0
            else:
                # the rank: smaller magnitudes, and equal ones before it (ties by index). The
                # undecided entries are put in (magnitude, index) order, so that entries of one
                # magnitude (bf16 task vectors hold few distinct ones) share one count of the
                # smaller magnitudes and one sweep over the equal ones up to the last of them
                for a in range(1, na):
                    i = undecided[a]
                    k = mags[i]
                    b = a
                    while b > 0 and mags[undecided[b - 1]] > k:
                        undecided[b] = undecided[b - 1]
                        b -= 1
                    undecided[b] = i
                a = 0
                while a < na:
                    k = mags[undecided[a]]
                    rank = 0
                    for j in range(n):
                        rank += 1 if mags[j] < k else 0
                    j0 = 0
                    while a < na and mags[undecided[a]] == k:
                        i = undecided[a]
                        seg = mags[j0:i]
                        for j in range(i - j0):
                            rank += 1 if seg[j] == k else 0
                        keep[i] = 1 if u[i] < table[rank] else 0
                        rank += 1  # entry i itself, for the next of its magnitude
                        j0 = i + 1
                        a += 1
            row_before, row_after = _l1_sums(d, keep, n)
            before += row_before
            after += row_after
            # the bits, a byte at a time where the row starts on a byte
            done = 0
            if (s & 7) == 0:
                for g in range(n >> 3):  # 8 bytes of 0/1 to one byte, the first byte's in bit 7
                    bits[(s >> 3) + g] = np.uint8((words[g] * gather8) >> np.uint64(56))
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
    nb = bucket_count(row)
    _kernels()(base, model, row, nb, shift_cap(nb), _random.signed_key(key), start, table, bits, sums)
