"""DELLA's MagPrune compiled: a piece's keep bits and L1 sums in one numba call per model.

What. :func:`surgeon.merge.kernels.della.magprune_keep`, entry for entry: an
entry whose uniform ``u`` is below ``lo`` is kept, at or above ``hi``
dropped, and in between kept when its magnitude outranks (ties by index) a
partner drawn from its row's other entries by the entry's own 64-bit word.
Only the band's entries (a share ``hi - lo = 2 epsilon`` of them) draw a
word and look at their partner; the rest are decided by the uniform alone,
in a loop the compiler vectorises. No row is ranked.

Exactness. The same uniforms, words, bounds and comparisons as the reference,
so the same keep bits; the L1 norms are float64 sums of the same float32
values, added row by row (the reference: torch's whole-tensor float64 sum),
equal to float64 rounding. The merge pass reads the keep bits
(:func:`surgeon.merge.kernels.ties_compiled.merge_raw`, ``kinds == 3``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import rng as _random
from . import _jit, _raw
from ._jit import compiled

#: byte ``b`` of a word (0 or 1) to bit ``56 + b`` of the product: eight flags packed into one byte
PACK8_LSB_FIRST = 0x0102040810204080


@compiled
def _kernels(jit: Any) -> Any:
    """The statistic loop of one model over a piece of whole rows."""
    global _l1_sums, _trailing_zeros  # helpers are globals, not closure cells: see _jit.py
    _raw.register()
    _random.register()
    from numba.cpython.unsafe.numbers import trailing_zeros as _trailing_zeros

    @_jit.jit_options(fastmath={"reassoc"})
    def _l1_sums(d, keep, n):  # pragma: no cover - compiled
        # (sum |d|, sum |d kept|) in float64; reassociation lets the sums run in vector
        # lanes (the reference is torch's whole-tensor float64 sum: no order to keep). The
        # kept magnitude is |d| times keep as a float (0 or 1), not a choice between |d| and
        # 0: a choice compiled to a branch on random bits, mispredicted ~1 in 3
        before = 0.0
        after = 0.0
        for i in range(n):
            x = abs(np.float64(d[i]))
            before += x
            after += x * np.float64(keep[i])
        return before, after

    @jit
    def keep_bits(b_all, m_all, n, ukey, wkey, start, lo, hi, bits, sums):  # pragma: no cover - compiled
        # b_all, m_all: a piece's rows of length n, stored dtype; ukey, wkey: the model's
        # uniform and word streams; start: the piece's flat index in the tensor; lo, hi:
        # float32 keep bounds; bits: uint8, zeroed, one bit per entry (msb first);
        # sums[0] += sum |d|, sums[1] += sum |kept d|.
        # Choices are branch-free where the data is random (the uniforms): a mispredicted
        # branch per entry cost more than all the arithmetic. The loop over the whole row
        # (vectorised) is kept apart from the one over the band's entries, which walks the
        # set bits of 64-entry band masks (one mispredicted loop exit a word, not one an entry).
        rows = m_all.shape[0] // n
        base = np.empty(n, np.float32)
        d = np.empty(n, np.float32)
        u = np.empty(n, np.float32)
        mags = np.empty(n, np.uint32)
        keep = np.zeros((n + 7) // 8 * 8, np.uint8)
        words = keep.view(np.uint64)  # keep[8 g] is the low byte of words[g]: numba's platforms are little-endian
        gather8 = np.uint64(0x8040201008040201)
        in_band = np.zeros((n + 63) // 64 * 64, np.uint8)  # 0/1 an entry, whole words of 64 entries
        flags = in_band.view(np.uint64)
        pack8 = np.uint64(PACK8_LSB_FIRST)
        mag = np.uint32(0x7FFFFFFF)
        low32 = np.uint64(0xFFFFFFFF)
        m = np.uint64(max(n - 1, 1))
        top = np.uint64(63)
        before = 0.0
        after = 0.0
        for r in range(rows):
            s = r * n
            _raw.load(b_all[s:s + n], base)
            _raw.load(m_all[s:s + n], d)
            _random.fill_uniform(ukey, start + s, u)
            keys = d.view(np.uint32)
            for i in range(n):
                d[i] = d[i] - base[i]
                mags[i] = keys[i] & mag
                v = u[i]
                keep[i] = np.uint8(v < lo)
                in_band[i] = np.uint8((v >= lo) & (v < hi))
            for w in range((n + 63) >> 6):
                band = np.uint64(0)  # bit b: entry 64 w + b is in the band
                for q in range(8):
                    band |= ((flags[8 * w + q] * pack8) >> np.uint64(56)) << np.uint64(8 * q)
                while band != np.uint64(0):
                    i = 64 * w + np.int64(_trailing_zeros(band))
                    band &= band - np.uint64(1)
                    z = _random.word(wkey, start + s + i)
                    if n > 1:
                        # floor(z m / 2^64): the partner's offset among the other n - 1 entries
                        off = np.int64(((z >> np.uint64(32)) * m + (((z & low32) * m) >> np.uint64(32)))
                                       >> np.uint64(32))
                        j = off + (off >= i)
                        k, kj = mags[i], mags[j]
                        keep[i] = np.uint8((k > kj) | ((k == kj) & (off < i)))
                    else:
                        keep[i] = np.uint8(z >> top)
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


def keep_bits(base: np.ndarray, model: np.ndarray, row: int, keys: tuple[int, int], start: int,
              bounds: tuple[float, float], bits: np.ndarray, sums: np.ndarray) -> None:
    """MagPrune one model over a piece of whole rows of ``row`` entries (flat
    stored-dtype arrays, :func:`surgeon.merge.kernels._raw.raw_inputs`):
    set the kept entries' bits in ``bits`` (uint8, zeroed, ``ceil(n / 8)``),
    and add ``sum |d|`` and ``sum |kept d|`` (float64) to ``sums[0]`` and
    ``sums[1]``. ``keys``: the model's uniform and word streams; ``start``: the
    piece's flat index in the tensor; ``bounds``:
    :func:`surgeon.merge.kernels.della.keep_bounds`."""
    lo, hi = bounds
    _kernels()(base, model, row, _random.signed_key(keys[0]), _random.signed_key(keys[1]), start,
               np.float32(lo), np.float32(hi), bits, sums)
