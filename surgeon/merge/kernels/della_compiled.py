"""DELLA's MagPrune compiled: a piece's keep bits and L1 sums, every model in one numba call.

What. :func:`surgeon.merge.kernels.della.magprune_keep`, entry for entry: an
entry whose uniform ``U`` is below ``L`` is kept, at or above ``H`` dropped,
and in between (the band) kept when its magnitude outranks (ties by index) a
partner drawn from its row's other entries by its band slot's 64-bit word.
No row is ranked. Per row:

- the uniforms' top halves come four to a hash (a vectorised loop filling
  64-bit words, read as uint16) and decide every entry whose top half differs
  from both bounds' (all but ~2 in 65,536); the rest read their low half (the
  ``fine`` stream) in a scalar loop that runs only for rows holding one;
- the band's words are drawn in one vectorised loop (one per band entry: slot
  ``k``'s counter is the flat index of the row's ``k``-th entry) and turned
  into partner offsets in another; then the band's entries are compared with
  their partners, slot by slot: on a CPU with AVX-512, listed and compared 16
  at a time (:mod:`surgeon.merge.kernels.della_vector`: compress-stores and a
  gather; 1.26-1.38 -> 1.13-1.25 ns an entry and model, one thread, 1.1B rows),
  elsewhere found by walking the set bits of 64-entry masks (one mispredicted
  loop exit a mask, not one an entry; listing them first by a table of each
  byte's set bits was slower).

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
from . import _jit, _raw, della_vector
from ._jit import compiled

#: byte ``b`` of a word (0 or 1) to bit ``56 + b`` of the product: eight flags packed into one byte
PACK8_LSB_FIRST = 0x0102040810204080


@compiled
def _kernels(jit: Any) -> Any:
    """The statistic loop of a piece of whole rows."""
    global _l1_sums, _outranks, _trailing_zeros  # helpers are globals, not closure cells: see _jit.py
    _raw.register()
    _random.register()
    della_vector.register()
    from numba.cpython.unsafe.numbers import trailing_zeros as _trailing_zeros

    @_jit.jit_options(fastmath={"reassoc"})
    def _l1_sums(d, keep, n):  # pragma: no cover - compiled
        # (sum |d|, sum |d kept|) in float64; reassociation lets the sums run in vector
        # lanes (the reference is torch's whole-tensor float64 sum: no order to keep). The
        # reference's kept magnitude is |d * keep|, so a dropped inf or NaN makes its sum NaN:
        # where the row's |d| are all finite (its sum is), a masked add is the same sum (x * 1
        # = x, x * 0 = +0 for finite x >= 0) at ~0.08 ns an entry less than the product (a
        # byte widened to float64 and a multiply); otherwise the row's is summed again as
        # the product
        before = 0.0
        after = 0.0
        for i in range(n):
            x = abs(np.float64(d[i]))
            before += x
            after += x if keep[i] else 0.0
        if not before < np.inf:  # an inf or NaN in the row
            after = 0.0
            for i in range(n):
                after += abs(np.float64(d[i])) * np.float64(keep[i])
        return before, after

    @_jit.jit_options(inline="always")
    def _outranks(x, y, off, i):  # pragma: no cover - compiled
        # a band entry at position i with magnitude x against its partner at offset off among
        # the row's other entries, magnitude y: kept (1) when x is larger, or equal and the
        # partner lies before it (ties by position; della_vector.band_compare16 is the same rule)
        return np.uint8((x > y) | ((x == y) & (off < i)))

    @jit
    def keep_bits(b_all, m_all, n, which, keys, start, bounds, bits, sums, gathers):  # pragma: no cover - compiled
        # b_all: a piece's base rows of length n, m_all: the models' (a tuple), stored dtype;
        # which: the models to prune; keys[t]: model which[t]'s coarse, fine and partner
        # streams; start: the piece's flat index in the tensor (a row's start); bounds[t]: its
        # L, H (uint64, <= 2^32); bits[i]: model i's, uint8, zeroed, one bit per entry (msb
        # first); sums[i, 0] += sum |d|, sums[i, 1] += sum |kept d|; gathers: the band by
        # della_vector (else the walk). Row by row, every model in turn: the base row is
        # widened once and stays in L1.
        # Choices are branch-free where the data is random: a mispredicted branch an entry
        # cost more than all the arithmetic.
        rows = b_all.shape[0] // n
        base = np.empty(n, np.float32)
        d = np.empty(n, np.float32)
        hw = np.empty((n + 3) // 4 + 1, np.uint64)  # the row's coarse words (one more: a row may start mid-word)
        top = hw.view(np.uint16)  # entry 4 c + q's top half is bits 16 q.. of word c: little-endian uint16 q
        partner = np.empty(n, np.uint64)  # the band slots' words
        offs = np.empty(n, np.uint32)  # and their partners' offsets
        mags = np.empty((n + 63) // 64 * 64, np.uint32)  # read in 16s (gathers) past n: never listed there
        idx = np.empty(n, np.uint32)  # gathers: the band's positions, slot by slot
        bm = np.empty(n, np.uint32)  # and magnitudes
        kb = np.empty(n, np.uint8)  # and keep flags
        keep = np.zeros((n + 7) // 8 * 8, np.uint8)
        words = keep.view(np.uint64)  # keep[8 g] is the low byte of words[g]: numba's platforms are little-endian
        gather8 = np.uint64(0x8040201008040201)
        in_band = np.zeros((n + 63) // 64 * 64, np.uint8)  # 0/1 an entry; past n stays 0
        flags = in_band.view(np.uint64)
        pack8 = np.uint64(PACK8_LSB_FIRST)
        low32 = np.uint64(0xFFFFFFFF)
        mag = np.uint32(0x7FFFFFFF)
        m = np.uint64(max(n - 1, 1)) & low32  # < 2^31: 32-bit products
        for r in range(rows):
            s = r * n
            g = start + s  # the row's flat index
            a = g & 3
            _raw.load(b_all[s:s + n], base)
            for t in range(which.shape[0]):
                i_model = which[t]
                ckey, fkey, wkey = keys[t, 0], keys[t, 1], keys[t, 2]
                lo, hi = bounds[t, 0], bounds[t, 1]
                lo16, hi16 = np.uint16(lo >> np.uint64(16)), np.uint16(hi >> np.uint64(16))
                _raw.load(m_all[i_model][s:s + n], d)
                _random.fill_words(ckey, g >> 2, hw[:(a + n + 3) >> 2])
                ints = d.view(np.uint32)
                edge = np.int32(0)
                listed = np.int32(0)  # int32 counts: the loop keeps 16 lanes (_raw.add_if)
                for i in range(n):
                    d[i] = d[i] - base[i]
                    mags[i] = ints[i] & mag
                    c = top[a + i]
                    keep[i] = np.uint8(c < lo16)
                    in_band[i] = np.uint8((c > lo16) & (c < hi16))
                    edge = _raw.add_if(edge, (c == lo16) | (c == hi16))
                    listed = _raw.add_if(listed, (c > lo16) & (c < hi16))
                nb = np.int64(listed)
                if edge != 0:  # an entry whose top half is a bound's: its low half decides
                    for i in range(n):
                        c = top[a + i]
                        if c == lo16 or c == hi16:
                            u = (np.uint64(c) << np.uint64(16)) | (_random.word(fkey, g + i) >> np.uint64(48))
                            keep[i] = np.uint8(u < lo)
                            nb += np.int64((u >= lo) & (u < hi)) - np.int64(in_band[i])
                            in_band[i] = np.uint8((u >= lo) & (u < hi))
                _random.fill_words(wkey, g, partner[:nb])
                if n > 1:
                    for k in range(nb):  # floor(z m / 2^64): the partner's offset among the other n - 1 entries
                        z = partner[k]
                        offs[k] = np.uint32(((z >> np.uint64(32)) * m + (((z & low32) * m) >> np.uint64(32)))
                                            >> np.uint64(32))
                    if gathers:  # the band listed and decided 16 slots at a time (della_vector)
                        k = 0
                        for e in range(0, n, della_vector.LANES):
                            k += della_vector.band_list16(in_band, mags, e, idx, bm, k)
                        q = 0
                        while q + della_vector.LANES <= nb:
                            della_vector.band_compare16(mags, idx, offs, bm, kb, q)
                            q += della_vector.LANES
                        for q in range(q, nb):
                            i = np.int64(idx[q])
                            off = np.int64(offs[q])
                            kb[q] = _outranks(bm[q], mags[off + (off >= i)], off, i)
                        for q in range(nb):
                            keep[idx[q]] = kb[q]
                    else:
                        k = 0
                        for e in range((n + 63) >> 6):  # the band's entries, walking 64-entry masks
                            band = np.uint64(0)
                            for q in range(8):
                                band |= ((flags[8 * e + q] * pack8) >> np.uint64(56)) << np.uint64(8 * q)
                            while band != np.uint64(0):
                                i = 64 * e + np.int64(_trailing_zeros(band))
                                band &= band - np.uint64(1)
                                off = np.int64(offs[k])
                                k += 1
                                keep[i] = _outranks(mags[i], mags[off + (off >= i)], off, i)
                else:
                    k1 = 0
                    for i in range(n):  # rows of one entry: the word's top bit
                        if in_band[i]:
                            keep[i] = np.uint8(partner[k1] >> np.uint64(63))
                            k1 += 1
                row_before, row_after = _l1_sums(d, keep, n)
                sums[i_model, 0] += row_before
                sums[i_model, 1] += row_after
                # the bits, a byte at a time where the row starts on a byte
                out = bits[i_model]
                done = 0
                if (s & 7) == 0:
                    for e in range(n >> 3):  # 8 bytes of 0/1 to one byte, the first byte's in bit 7
                        out[(s >> 3) + e] = np.uint8((words[e] * gather8) >> np.uint64(56))
                    done = 8 * (n >> 3)
                for i in range(done, n):
                    q = s + i
                    out[q >> 3] |= np.uint8(keep[i] << (7 - (q & 7)))

    return keep_bits


def available() -> bool:
    """Whether the compiled loop can run (numba present and not switched off)."""
    return _kernels() is not None


def keep_bits(base: np.ndarray, models: tuple[np.ndarray, ...], row: int, which: list[int],
              keys: list[tuple[int, int, int]], start: int, bounds: list[tuple[int, int]], bits: np.ndarray,
              sums: np.ndarray, gathers: bool | None = None) -> None:
    """MagPrune models ``which`` over a piece of whole rows of ``row`` entries (flat
    stored-dtype arrays, :func:`surgeon.merge.kernels._raw.raw_inputs`): set model
    ``i``'s kept entries' bits in ``bits[i]`` (uint8, zeroed, ``ceil(n / 8)`` a model),
    and add its ``sum |d|`` and ``sum |kept d|`` (float64) to ``sums[i]``. ``keys``:
    each pruned model's coarse, fine and partner stream keys
    (:class:`surgeon.merge.kernels.della.DellaDraws`); ``start``: the piece's flat
    index in the tensor; ``bounds``: each one's
    :func:`surgeon.merge.kernels.della.keep_bounds`; ``gathers``: decide each row's band
    by :mod:`surgeon.merge.kernels.della_vector`'s 16-lane operations (True) or by the
    scalar walk (False), the same bits either way (None: where the CPU runs them as
    vector instructions, :func:`~surgeon.merge.kernels.della_vector.preferred`)."""
    if not which:
        return
    _kernels()(base, models, row, np.array(which, np.int64),
               np.array([[_random.signed_key(k) for k in ks] for ks in keys], np.int64), start,
               np.array(bounds, np.uint64), bits, sums, della_vector.preferred() if gathers is None else gathers)
