"""TIES' and DARE's merge compiled: trim or drop, sign election and disjoint mean in one numba call.

Why. With torch ops a TIES block (2^18 entries, three models) costs ~25 op
dispatches over 1 MiB operands: 2.4 ms of merge pass on the development CPU.
Here each op is a loop over a 512-entry chunk that stays in L1, and the loops
vectorise (LLVM turns the keep/drop choices into blends); the trim's tie
quota — keep the first ``q`` entries equal to the threshold, in flat order —
is counted per chunk, and only the chunk where a quota runs out takes a
sequential loop. Inputs and output stay in their stored dtype (bf16 widened
and rounded per chunk: :mod:`surgeon.merge.kernels._raw`), and DARE's uniforms are
drawn per chunk (:mod:`surgeon.merge.rng`), so a whole piece is one call.

Exactness. Every float operation is the one :class:`surgeon.merge.kernels.ties.TiesKernel`
does with torch, in the same order and in float32 (the thresholds and
weights are passed as float32, as torch casts its scalars), so the result is
bit-identical to the torch kernel and to the whole-tensor ``ties`` for finite
inputs (tests/test_merge_blocks.py). A NaN delta makes the entry NaN, as
with torch (the relu keeps NaN), so the engine's non-finite check still
catches it; which NaN or sign of zero shows may differ.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from .. import rng as _random
from ..select.counting import DEBRUIJN_INDEX, DEBRUIJN_MAGIC
from . import _raw
from ._jit import compiled, numba_module
from .scratch import ListedEntries, thread_scratch

_CH = _raw.CHUNK  # entries per chunk: every scratch row of a chunk stays in L1
#: byte ``b``'s eight bits, msb first, as eight 0/1 bytes of one word (DELLA's keep bits spread;
#: a module constant, which numba compiles in, as ``DEBRUIJN_INDEX``)
SPREAD_OF = np.array([sum(((b >> (7 - t)) & 1) << (8 * t) for t in range(8)) for b in range(256)], np.uint64)


@compiled
def _kernels(jit: Any) -> Any:
    """The TIES/DARE block merge."""
    global _band_chunk, _in_band, _bands3, _sign, _consensus3, _keep_floats, _drawn, _sum3, _list_flagged  # helpers are globals, not closure cells: see _jit.py
    _raw.register()
    _random.register()
    inline = numba_module().njit(inline="always", nogil=True, boundscheck=False, error_model="numpy")

    @inline
    def _band_chunk(m, b, k, row, cut, quota, counting, lo2, hi2, flag, below):  # pragma: no cover - compiled
        # row[j] = x * [x's magnitude in the stop set and not in the start set], x = m - b.
        # A set holds the magnitudes below its cut and, of those equal to it, the
        # first quota[c] in flat order (quota: int64 [2], start then stop, counted down).
        # With ``counting``, also below[c] += #(|x| < lo2[c]) and flag[j] |= lo2[c] <= |x| < hi2[c]
        # for both brackets c, in the same loop. Returns how many magnitudes equal each cut.
        # One loop takes every tie at a cut with a quota left (each cut's ties in a chunk all fit,
        # but in the one chunk where its quota runs out, which then takes the loop in flat order).
        zero = np.float32(0.0)
        one = np.float32(1.0)
        lo = cut[0]
        hi = cut[1]
        ql = quota[0]
        qh = quota[1]
        all_lo = ql > 0
        all_hi = qh > 0
        tl = np.int32(0)
        th = np.int32(0)
        lo0 = lo2[0]
        hi0 = hi2[0]
        lo1 = lo2[1]
        hi1 = hi2[1]
        c0 = np.int32(0)
        c1 = np.int32(0)
        for j in range(k):  # one loop either way: each call site passes ``counting`` as a literal
            x = m[j] - b[j]
            a = abs(x)
            at_lo = a == lo
            at_hi = a == hi
            tl = _raw.add_if(tl, at_lo)
            th = _raw.add_if(th, at_hi)
            in_lo = (a < lo) | (at_lo & all_lo)
            in_hi = (a < hi) | (at_hi & all_hi)
            row[j] = x * (one if (in_hi & ~in_lo) else zero)
            if counting:
                c0 = _raw.add_if(c0, a < lo0)
                c1 = _raw.add_if(c1, a < lo1)
                flag[j] |= 1 if ((a >= lo0) & (a < hi0)) | ((a >= lo1) & (a < hi1)) else 0
        below[0] += c0
        below[1] += c1
        if (all_lo and tl > ql) or (all_hi and th > qh):  # a quota runs out here: ties in flat order
            for j in range(k):
                x = m[j] - b[j]
                a = abs(x)
                in_lo = a < lo
                if a == lo and ql > 0:
                    in_lo = True
                    ql -= 1
                in_hi = a < hi
                if a == hi and qh > 0:
                    in_hi = True
                    qh -= 1
                row[j] = x * (one if (in_hi and not in_lo) else zero)
            quota[0] = ql
            quota[1] = qh
        else:
            quota[0] = ql - (tl if all_lo else 0)
            quota[1] = qh - (th if all_hi else 0)
        return tl, th

    @inline
    def _in_band(a, lo, hi, all_lo, all_hi):  # pragma: no cover - compiled
        # 1 where |x| = a is in the stop set and not in the start set, every tie at a cut
        # taken where its quota has room for the chunk's (all_lo, all_hi), else 0
        in_lo = (a < lo) | ((a == lo) & all_lo)
        in_hi = (a < hi) | ((a == hi) & all_hi)
        return np.float32(1.0) if (in_hi & ~in_lo) else np.float32(0.0)

    @inline
    def _bands3(d, b, k, res, w, cut, quota, summing, br_lo, br_hi, flag, tally, by_count, zs, normalize,
                positive_weights, total, lam):  # pragma: no cover - compiled
        # Three models' bands (_band_chunk's rows, weighted) and their mix (_sum3 with ``summing``,
        # a literal at each call, else _consensus3) into res[:k], in one loop; every tie at a cut
        # taken where its quota is positive (the caller checks that the chunk's ties fit:
        # tally[i, 0] and tally[i, 1] count each model's entries at its start and stop cut). Also
        # tally[i, 2 + c] = #(|x_i| < br_lo[i, c]) and flag[j] = whether any model's |x| is inside
        # [br_lo[i, c], br_hi[i, c]) for either c (brackets [0, 0): none).
        m0 = d[0]
        m1 = d[1]
        m2 = d[2]
        w0 = w[0]
        w1 = w[1]
        w2 = w[2]
        start0 = cut[0, 0]
        stop0 = cut[0, 1]
        start1 = cut[1, 0]
        stop1 = cut[1, 1]
        start2 = cut[2, 0]
        stop2 = cut[2, 1]
        al0 = quota[0, 0] > 0
        ah0 = quota[0, 1] > 0
        al1 = quota[1, 0] > 0
        ah1 = quota[1, 1] > 0
        al2 = quota[2, 0] > 0
        ah2 = quota[2, 1] > 0
        blo00 = br_lo[0, 0]
        bhi00 = br_hi[0, 0]
        blo01 = br_lo[0, 1]
        bhi01 = br_hi[0, 1]
        blo10 = br_lo[1, 0]
        bhi10 = br_hi[1, 0]
        blo11 = br_lo[1, 1]
        bhi11 = br_hi[1, 1]
        blo20 = br_lo[2, 0]
        bhi20 = br_hi[2, 0]
        blo21 = br_lo[2, 1]
        bhi21 = br_hi[2, 1]
        tl0 = np.int32(0)
        th0 = np.int32(0)
        tl1 = np.int32(0)
        th1 = np.int32(0)
        tl2 = np.int32(0)
        th2 = np.int32(0)
        c00 = np.int32(0)
        c01 = np.int32(0)
        c10 = np.int32(0)
        c11 = np.int32(0)
        c20 = np.int32(0)
        c21 = np.int32(0)
        for j in range(k):
            bj = b[j]
            y0 = m0[j] - bj
            y1 = m1[j] - bj
            y2 = m2[j] - bj
            a0 = abs(y0)
            a1 = abs(y1)
            a2 = abs(y2)
            tl0 = _raw.add_if(tl0, a0 == start0)
            th0 = _raw.add_if(th0, a0 == stop0)
            tl1 = _raw.add_if(tl1, a1 == start1)
            th1 = _raw.add_if(th1, a1 == stop1)
            tl2 = _raw.add_if(tl2, a2 == start2)
            th2 = _raw.add_if(th2, a2 == stop2)
            x0 = (y0 * _in_band(a0, start0, stop0, al0, ah0)) * w0
            x1 = (y1 * _in_band(a1, start1, stop1, al1, ah1)) * w1
            x2 = (y2 * _in_band(a2, start2, stop2, al2, ah2)) * w2
            c00 = _raw.add_if(c00, a0 < blo00)
            c01 = _raw.add_if(c01, a0 < blo01)
            c10 = _raw.add_if(c10, a1 < blo10)
            c11 = _raw.add_if(c11, a1 < blo11)
            c20 = _raw.add_if(c20, a2 < blo20)
            c21 = _raw.add_if(c21, a2 < blo21)
            inside = (((a0 >= blo00) & (a0 < bhi00)) | ((a0 >= blo01) & (a0 < bhi01))
                      | ((a1 >= blo10) & (a1 < bhi10)) | ((a1 >= blo11) & (a1 < bhi11))
                      | ((a2 >= blo20) & (a2 < bhi20)) | ((a2 >= blo21) & (a2 < bhi21)))
            flag[j] = 1 if inside else 0
            if summing:
                res[j] = _sum3(x0, x1, x2, bj, normalize, total, lam)
            else:
                res[j] = _consensus3(x0, x1, x2, w0, w1, w2, bj, by_count, zs, normalize, positive_weights, lam)
        tally[0, 0] = tl0
        tally[0, 1] = th0
        tally[1, 0] = tl1
        tally[1, 1] = th1
        tally[2, 0] = tl2
        tally[2, 1] = th2
        tally[0, 2] = c00
        tally[0, 3] = c01
        tally[1, 2] = c10
        tally[1, 3] = c11
        tally[2, 2] = c20
        tally[2, 3] = c21

    @inline
    def _sign(x):  # pragma: no cover - compiled
        return np.float32(1.0) if x > np.float32(0.0) else (np.float32(-1.0) if x < np.float32(0.0) else np.float32(0.0))

    @inline
    def _consensus3(x0, x1, x2, w0, w1, w2, bj, by_count, zs, normalize, positive_weights, lam):  # pragma: no cover
        # one entry of the general path's election and disjoint mean for three models, the same
        # float ops in the same order (by the weighted sum, or by the count of signs). Branch-free:
        # the settings pick between values (a branch in the loop kept it from vectorising); a
        # lambda of 1 multiplies exactly, so it is always applied
        zero = np.float32(0.0)
        one = np.float32(1.0)
        tiny = np.float32(1.1754944e-38)
        counted = (_sign(x0) + _sign(x1)) + _sign(x2)
        summed = (x0 + x1) + x2
        a = counted if by_count else summed
        sg = one if a > zero else (-one if a < zero else zs)
        r0 = x0 * sg
        r0 = zero if r0 <= zero else r0  # noqa: FURB136 - relu that keeps NaN
        r1 = x1 * sg
        r1 = zero if r1 <= zero else r1  # noqa: FURB136
        r2 = x2 * sg
        r2 = zero if r2 <= zero else r2  # noqa: FURB136
        mx = (r0 + r1) + r2
        dv = ((w0 if r0 > zero else zero) + (w1 if r1 > zero else zero)) + (w2 if r2 > zero else zero)
        den = (dv if dv > tiny else tiny) if positive_weights else (one if dv == zero else dv)
        mx = mx / den if normalize else mx
        return (mx * sg) * lam + bj

    @inline
    def _keep_floats(bits, s, k, out, flip, spread, spread_of):  # pragma: no cover - compiled
        # out[:k] = the keep bits of a chunk's entries s... (piece-local, msb first) as floats,
        # each bit xor flip (flip 1: 0 where kept): each byte (xor 0xFF for flip) looked up in
        # `spread_of` (the 256 bytes' eight 0/1 bytes as one word) into `spread` (uint64
        # scratch of _CH / 8 words), then widened in a vector loop (a chunk starts on a byte:
        # _CH % 8 == 0)
        mask = np.uint8(0xFF) if flip else np.uint8(0)
        for g in range((k + 7) >> 3):
            spread[g] = spread_of[bits[(s >> 3) + g] ^ mask]
        flags = spread.view(np.uint8)
        for j in range(k):
            out[j] = np.float32(flags[j])

    @inline
    def _drawn(y, u, kb, dv, sc, w, divide):  # pragma: no cover - compiled
        # one drawn model's entry as the general loops make it from y = m - b: kept where
        # u < kb, / divisor (DARE's rescale), * scale (DELLA's), * weight; a divisor or scale
        # of 1 changes no bit, so `divide` (a literal at each call) False skips the division
        # where every divisor is 1 (DELLA; DARE without rescale): a division a model and entry
        # was ~15 % of della_linear's merge pass
        kept = y * (np.float32(1.0) if u < kb else np.float32(0.0))
        return ((kept / dv if divide else kept) * sc) * w

    @inline
    def _sum3(x0, x1, x2, bj, normalize, total, lam):  # pragma: no cover - compiled
        # one entry of the general path's weighted sum without consensus, the same float ops in
        # the same order (a lambda of 1 multiplies exactly, so it is always applied)
        a = (x0 + x1) + x2
        a = a / total if normalize else a
        return a * lam + bj

    @inline
    def _list_flagged(s, words, b_all, ms, br_pos, br_b, br_m, br_count):  # pragma: no cover - compiled
        # the chunk's flagged entries (each set byte of a word by its lowest bit) onto the lists
        last = br_pos.shape[0] - 1
        listed = br_count[0]
        for qw in range(words.shape[0]):
            wd = words[qw]
            if wd != 0:
                words[qw] = 0
                while wd != 0:
                    low = wd & (~wd + np.uint64(1))
                    at = min(listed, last)
                    jj = s + 8 * qw + (DEBRUIJN_INDEX[(low * DEBRUIJN_MAGIC) >> np.uint64(58)] >> 3)
                    br_pos[at] = jj
                    br_b[at] = b_all[jj]  # in cache now: gathering them later read every line again
                    for i in range(len(ms)):
                        br_m[i, at] = ms[i][jj]
                    listed += 1
                    wd ^= low
        br_count[0] = listed

    @jit
    def merge(b_all, ms, keys, start, strict, with_ties, quota, kinds, dens, rescale, masks, scales, band,
              band_quota, w, mode, zero_sign, normalize, positive_weights, total, lam, br_lo, br_hi, br_tie, br_below,
              br_inside, br_pos, br_b, br_m, br_count, out_all):  # pragma: no cover - compiled
        # Inputs and output in their stored dtype (float32, or bf16 bits as
        # uint16: see surgeon.merge.kernels._raw), widened one chunk at a time. Loops
        # index chunk slices from 0 (``x[s:e][j]``, not ``x[s + j]``): with an
        # offset index LLVM kept every loop scalar (6x slower).
        # Brackets (one pass, when br_lo is not empty; [models, 2]): each bracket c of model i
        # with br_hi[i, c] > 0 counts the entries with |x| < br_lo[i, c] into br_below[i, c],
        # and the entries inside [br_lo[i, c], br_hi[i, c]) of any bracket are listed in br_pos
        # (flat indices; one spare last slot takes the writes past its capacity; br_count[0]
        # counts them all), words of flags scanned as the counting loop does, their inputs copied
        # to br_b and br_m (stored dtype; [models, capacity + 1]). TIES' trim (no kinds) with
        # bracket 0 keeps the entries with |x| >= br_hi[i, 0] instead of trimming by threshold.
        # A tie bracket (br_tie[i, c] != 0: it holds one value v) is counted, not listed: the entries
        # below v into br_below, those equal to v per chunk into br_inside[i, c, chunk], and the cut at
        # v decides them (TIES: the trim by its thresholds and quota; breadcrumbs: the band, whose
        # bracket is passed empty, [v, v)).
        # Returns whether every result was finite.
        nm = len(ms)
        n = b_all.shape[0]
        bracketed = br_lo.shape[0] > 0
        flag = np.zeros(_CH, np.uint8)
        words = flag.view(np.uint64)
        d = np.empty((nm, _CH), np.float32)
        b = np.empty(_CH, np.float32)
        m = np.empty(_CH, np.float32)
        u = np.empty(_CH, np.float32)
        acc = np.empty(_CH, np.float32)
        mixed = np.empty(_CH, np.float32)
        div = np.empty(_CH, np.float32)
        chk = np.zeros(_CH, np.float32)  # the output check (_raw.store_checked)
        spread = np.empty(_CH // 8, np.uint64)  # DELLA: a chunk's keep bits, a byte an entry
        no_cut = np.zeros(2, np.float32)  # the band's brackets where there are none
        no_count = np.zeros(2, np.int64)
        zero = np.float32(0.0)
        one = np.float32(1.0)
        tiny = np.float32(1.1754944e-38)
        zs = np.float32(zero_sign)
        # three models electing signs, each trimmed by a threshold (TIES) or kept or dropped by its
        # uniforms (DARE): chunks whose trims need no tie quota go through one fused loop (about 17
        # loops over the chunk otherwise). Measured (one thread, 2^24 entries from memory): DARE-TIES
        # 3.13 -> 2.85 ns an entry, TIES 2.22 -> 2.03; with brackets (TIES in one pass) the counting
        # beside it made the fused loop no faster than the general one, which those chunks keep
        drawing = len(kinds) > 0
        fused = nm == 3 and not bracketed and (drawing or mode != 2)
        if drawing:
            for i in range(nm):
                fused = fused and (kinds[i] == 0 or kinds[i] == 2 or kinds[i] == 3)
        keep_below = np.ones(3, np.float32)  # kept where u < keep_below (u 0 for a model kept whole)
        divisor = np.ones(3, np.float32)     # DARE's rescale
        scale3 = np.ones(3, np.float32)      # DELLA's rescale
        u3 = np.zeros((3, _CH), np.float32)  # DARE: the uniforms; DELLA: 0 where the keep bit is set, else 1
        res = np.empty(_CH, np.float32)
        by_count = mode == 1
        if fused:
            for i in range(3):
                if drawing and kinds[i] == 2:
                    keep_below[i] = dens[i]
                    divisor[i] = dens[i] if rescale else one
                if drawing and kinds[i] == 3:
                    scale3[i] = scales[i]
        divides = divisor[0] != one or divisor[1] != one or divisor[2] != one
        # three breadcrumbs bands: their chunks go through one loop (_bands3), counting beside it
        # with brackets, but the one where a cut's quota runs out (the general loops, not counting again)
        banded = nm == 3 and len(kinds) == 3
        for i in range(len(kinds)):
            banded = banded and kinds[i] == 4
        tally = np.zeros((3, 4), np.int64)
        no_cut3 = np.zeros((3, 2), np.float32)
        for s in range(0, n, _CH):
            e = min(n, s + _CH)
            k = e - s
            _raw.load(b_all[s:e], b)
            counted = False
            if banded:
                for i in range(3):
                    _raw.load(ms[i][s:e], d[i])
                # two copies of the loop, not four: without brackets it counts around empty ones
                # ([0, 0): no count, no flag), ~0.15 ns an entry on the few such merges, and each
                # copy added ~6 s to the loops' first compilation
                blo = br_lo if bracketed else no_cut3
                bhi = br_hi if bracketed else no_cut3
                if mode == 2:
                    _bands3(d, b, k, res, w, band, band_quota, True, blo, bhi, flag, tally, by_count, zs, normalize,
                            positive_weights, total, lam)
                else:
                    _bands3(d, b, k, res, w, band, band_quota, False, blo, bhi, flag, tally, by_count, zs, normalize,
                            positive_weights, total, lam)
                fits = True
                for i in range(3):
                    ql = band_quota[i, 0]
                    qh = band_quota[i, 1]
                    fits = fits and not ((ql > 0 and tally[i, 0] > ql) or (qh > 0 and tally[i, 1] > qh))
                    if bracketed:
                        br_below[i, 0] += tally[i, 2]
                        br_below[i, 1] += tally[i, 3]
                counted = bracketed
                if fits:
                    for i in range(3):
                        if band_quota[i, 0] > 0:
                            band_quota[i, 0] -= tally[i, 0]
                        if band_quota[i, 1] > 0:
                            band_quota[i, 1] -= tally[i, 1]
                        if bracketed:  # as the general loop: a tie bracket's entries at its value, per chunk
                            if br_tie[i, 0] != 0:
                                br_inside[i, 0, s // _CH] = tally[i, 1]
                            if br_tie[i, 1] != 0:
                                br_inside[i, 1, s // _CH] = tally[i, 0]
                    if bracketed:
                        _list_flagged(s, words, b_all, ms, br_pos, br_b, br_m, br_count)
                    _raw.store_checked(res[:k], out_all[s:e], chk)
                    continue
            if fused and (drawing or (quota[0] <= 0 and quota[1] <= 0 and quota[2] <= 0)):
                m0 = d[0]
                m1 = d[1]
                m2 = d[2]
                for i in range(3):  # a runtime index: ms may hold fewer models when this is never run
                    _raw.load(ms[i][s:e], d[i])
                w0 = w[0]
                w1 = w[1]
                w2 = w[2]
                if drawing:
                    for i in range(3):
                        if kinds[i] == 2:
                            _random.fill_uniform(keys[i], start + s, u3[i, :k])
                        elif kinds[i] == 3:  # the keep bits as 0 (kept) or 1
                            _keep_floats(masks[i], s, k, u3[i], 1, spread, SPREAD_OF)
                    u0 = u3[0]
                    u1 = u3[1]
                    u2 = u3[2]
                    kb0 = keep_below[0]
                    kb1 = keep_below[1]
                    kb2 = keep_below[2]
                    dv0 = divisor[0]
                    dv1 = divisor[1]
                    dv2 = divisor[2]
                    sc0 = scale3[0]
                    sc1 = scale3[1]
                    sc2 = scale3[2]
                    if mode == 2 and divides:  # no consensus: the weighted sum (dare_linear, della_linear)
                        for j in range(k):
                            bj = b[j]
                            x0 = _drawn(m0[j] - bj, u0[j], kb0, dv0, sc0, w0, True)
                            x1 = _drawn(m1[j] - bj, u1[j], kb1, dv1, sc1, w1, True)
                            x2 = _drawn(m2[j] - bj, u2[j], kb2, dv2, sc2, w2, True)
                            res[j] = _sum3(x0, x1, x2, bj, normalize, total, lam)
                    elif mode == 2:
                        for j in range(k):
                            bj = b[j]
                            x0 = _drawn(m0[j] - bj, u0[j], kb0, dv0, sc0, w0, False)
                            x1 = _drawn(m1[j] - bj, u1[j], kb1, dv1, sc1, w1, False)
                            x2 = _drawn(m2[j] - bj, u2[j], kb2, dv2, sc2, w2, False)
                            res[j] = _sum3(x0, x1, x2, bj, normalize, total, lam)
                    elif divides:
                        for j in range(k):
                            bj = b[j]
                            x0 = _drawn(m0[j] - bj, u0[j], kb0, dv0, sc0, w0, True)
                            x1 = _drawn(m1[j] - bj, u1[j], kb1, dv1, sc1, w1, True)
                            x2 = _drawn(m2[j] - bj, u2[j], kb2, dv2, sc2, w2, True)
                            res[j] = _consensus3(x0, x1, x2, w0, w1, w2, bj, by_count, zs, normalize, positive_weights,
                                                 lam)
                    else:
                        for j in range(k):
                            bj = b[j]
                            x0 = _drawn(m0[j] - bj, u0[j], kb0, dv0, sc0, w0, False)
                            x1 = _drawn(m1[j] - bj, u1[j], kb1, dv1, sc1, w1, False)
                            x2 = _drawn(m2[j] - bj, u2[j], kb2, dv2, sc2, w2, False)
                            res[j] = _consensus3(x0, x1, x2, w0, w1, w2, bj, by_count, zs, normalize, positive_weights,
                                                 lam)
                else:
                    t0 = strict[0]
                    t1 = strict[1]
                    t2 = strict[2]
                    for j in range(k):
                        bj = b[j]
                        y0 = m0[j] - bj
                        y1 = m1[j] - bj
                        y2 = m2[j] - bj
                        x0 = (zero if (y0 >= -t0) & (y0 <= t0) else y0) * w0
                        x1 = (zero if (y1 >= -t1) & (y1 <= t1) else y1) * w1
                        x2 = (zero if (y2 >= -t2) & (y2 <= t2) else y2) * w2
                        res[j] = _consensus3(x0, x1, x2, w0, w1, w2, bj, by_count, zs, normalize, positive_weights,
                                             lam)
                _raw.store_checked(res[:k], out_all[s:e], chk)
                continue
            # trim (TIES: hardshrink, zero where -t <= x <= t) or drop (DARE: keep where u < density)
            for i in range(nm):
                _raw.load(ms[i][s:e], m)
                row = d[i]
                if len(kinds) > 0:  # 0 keep all, 1 drop all, 2 draw (on the exact density), 3 keep bits, 4 band
                    dn = dens[i]
                    if kinds[i] == 0:
                        for j in range(k):
                            row[j] = m[j] - b[j]
                    elif kinds[i] == 1:
                        for j in range(k):
                            row[j] = zero
                    elif kinds[i] == 3:  # DELLA: the statistic pass's keep bits (piece-local, msb first), scaled
                        sc = scales[i]
                        _keep_floats(masks[i], s, k, u, 0, spread, SPREAD_OF)
                        for j in range(k):
                            row[j] = ((m[j] - b[j]) * u[j]) * sc  # 0 or 1 as a float: no branch
                    elif kinds[i] == 4:  # breadcrumbs: |x| among the `stop` smallest and not the `start` smallest
                        # an absent bracket is [0, 0): it counts and flags nothing. ``counting`` is a
                        # literal at each call, so the loop without brackets compiles without the counts
                        # (passing ``bracketed`` instead left them in: 2.7 -> 4.0 ns an entry)
                        if bracketed and not counted:
                            tl, th = _band_chunk(m, b, k, row, band[i], band_quota[i], True, br_lo[i], br_hi[i],
                                                 flag, br_below[i])
                        else:
                            tl, th = _band_chunk(m, b, k, row, band[i], band_quota[i], False, no_cut, no_cut, flag,
                                                 no_count)
                        if bracketed:
                            # a tie bracket is empty here ([v, v): flags nothing), its cut is its value:
                            # the band counted the entries at it (bracket 0 is the stop cut's)
                            if br_tie[i, 0] != 0:
                                br_inside[i, 0, s // _CH] = th
                            if br_tie[i, 1] != 0:
                                br_inside[i, 1, s // _CH] = tl
                    else:
                        _random.fill_uniform(keys[i], start + s, u[:k])
                        for j in range(k):
                            row[j] = (m[j] - b[j]) * (one if u[j] < dn else zero)
                        if rescale:
                            for j in range(k):
                                row[j] = row[j] / dn
                elif bracketed and br_hi[i, 0] > zero and br_tie[i, 0] == 0:  # keep above the bracket, count below it, flag inside
                    lo_i = br_lo[i, 0]
                    hi_i = br_hi[i, 0]
                    cnt = np.int32(0)
                    for j in range(k):
                        x = m[j] - b[j]
                        a = abs(x)
                        row[j] = zero if a < hi_i else x  # a NaN stays, as in the trim
                        cnt = _raw.add_if(cnt, a < lo_i)
                        flag[j] |= 1 if (a >= lo_i) & (a < hi_i) else 0
                    br_below[i, 0] += cnt
                else:
                    if bracketed and br_tie[i, 0] != 0:  # a tie bracket: counted here, trimmed below
                        lo_i = br_lo[i, 0]
                        cnt = np.int32(0)
                        tied = np.int32(0)
                        for j in range(k):
                            a = abs(m[j] - b[j])
                            cnt = _raw.add_if(cnt, a < lo_i)
                            tied = _raw.add_if(tied, a == lo_i)
                        br_below[i, 0] += cnt
                        br_inside[i, 0, s // _CH] = tied
                    t = strict[i]
                    q = quota[i]
                    if q > 0:
                        tt = with_ties[i]
                        tied = np.int32(0)
                        for j in range(k):
                            x = m[j] - b[j]
                            tied = _raw.add_if(tied, (x >= -t and x <= t) and not (x >= -tt and x <= tt))
                        if tied <= q:  # every tied entry of the chunk is kept: the with-ties trim
                            for j in range(k):
                                x = m[j] - b[j]
                                row[j] = zero if (x >= -tt and x <= tt) else x
                            q -= tied
                        else:  # the chunk where the quota runs out: tied entries in flat order
                            for j in range(k):
                                x = m[j] - b[j]
                                if x >= -t and x <= t:
                                    if q > 0 and not (x >= -tt and x <= tt):
                                        q -= 1
                                    else:
                                        x = zero
                                row[j] = x
                        quota[i] = q
                    else:
                        for j in range(k):
                            x = m[j] - b[j]
                            row[j] = zero if (x >= -t and x <= t) else x
                wi = w[i]
                if wi != one:
                    for j in range(k):
                        row[j] = row[j] * wi
            if bracketed:
                _list_flagged(s, words, b_all, ms, br_pos, br_b, br_m, br_count)
            # acc: the weighted sum (modes 0 and 2) or the sum of signs (mode 1)
            row = d[0]
            if mode == 1:
                for j in range(k):
                    x = row[j]
                    acc[j] = one if x > zero else (-one if x < zero else zero)
                for i in range(1, nm):
                    row = d[i]
                    for j in range(k):
                        x = row[j]
                        acc[j] = acc[j] + (one if x > zero else (-one if x < zero else zero))
            else:
                for j in range(k):
                    acc[j] = row[j]
                for i in range(1, nm):
                    row = d[i]
                    for j in range(k):
                        acc[j] = acc[j] + row[j]
            if mode == 2:  # no consensus: the sum, divided by the summed weights
                if normalize:
                    for j in range(k):
                        acc[j] = acc[j] / total
                if lam != one:
                    for j in range(k):
                        acc[j] = acc[j] * lam + b[j]
                else:
                    for j in range(k):
                        acc[j] = acc[j] + b[j]
                _raw.store_checked(acc, out_all[s:e], chk)
                continue
            for j in range(k):  # acc becomes the elected sign (selects, not bool arithmetic: these vectorise)
                a = acc[j]
                acc[j] = one if a > zero else (-one if a < zero else zs)
            # disjoint sum and the agreeing models' summed weights
            w0 = w[0]
            row = d[0]
            for j in range(k):
                r = row[j] * acc[j]
                r = zero if r <= zero else r  # noqa: FURB136 - relu that keeps NaN, as torch's does (max() would not)
                mixed[j] = r
                div[j] = w0 if r > zero else zero
            for i in range(1, nm):
                wi = w[i]
                row = d[i]
                for j in range(k):
                    r = row[j] * acc[j]
                    r = zero if r <= zero else r  # noqa: FURB136 - relu that keeps NaN, as torch's does (max() would not)
                    mixed[j] = mixed[j] + r
                    div[j] = div[j] + (wi if r > zero else zero)
            if normalize:
                if positive_weights:
                    for j in range(k):
                        dv = div[j]
                        mixed[j] = mixed[j] / (dv if dv > tiny else tiny)  # noqa: FURB136
                else:
                    for j in range(k):
                        dv = div[j]
                        mixed[j] = mixed[j] / (one if dv == zero else dv)
            if lam != one:
                for j in range(k):
                    mixed[j] = (mixed[j] * acc[j]) * lam + b[j]
            else:
                for j in range(k):
                    mixed[j] = mixed[j] * acc[j] + b[j]
            _raw.store_checked(mixed, out_all[s:e], chk)
        return _raw.all_finite(chk)

    @jit
    def patterns(b_at, m_at, lo, hi, kept, kept_n):  # pragma: no cover - compiled
        # Of each bracket c of model i (lo, hi: [models, 2]; an absent one is [0, 0)), the bit
        # patterns of |m_at[i] - b_at| inside [lo[i, c], hi[i, c]) into kept[2 i + c, :kept_n[i, c]]
        # (inputs in their stored dtype, m_at a tuple of rows; kept one entry longer than b_at).
        nm = len(m_at)
        listed = b_at.shape[0]
        b = np.empty(_CH, np.float32)
        m = np.empty(_CH, np.float32)
        mag = np.empty(_CH, np.float32)
        mag_bits = mag.view(np.uint32)
        for i in range(nm):
            if not (hi[i, 0] > np.float32(0.0) or hi[i, 1] > np.float32(0.0)):
                continue
            lo0 = lo[i, 0]
            hi0 = hi[i, 0]
            lo1 = lo[i, 1]
            hi1 = hi[i, 1]
            dst0 = kept[2 * i]
            dst1 = kept[2 * i + 1]
            n0 = 0
            n1 = 0
            for s in range(0, listed, _CH):
                e = min(listed, s + _CH)
                _raw.load(b_at[s:e], b)
                _raw.load(m_at[i][s:e], m)
                for j in range(e - s):
                    mag[j] = abs(m[j] - b[j])
                for j in range(e - s):  # branch-free: about a third of the entries are inside
                    a = mag[j]
                    dst0[n0] = mag_bits[j]
                    n0 += 1 if (a >= lo0) & (a < hi0) else 0
                    dst1[n1] = mag_bits[j]
                    n1 += 1 if (a >= lo1) & (a < hi1) else 0
            kept_n[i, 0] = n0
            kept_n[i, 1] = n1

    return SimpleNamespace(merge=merge, patterns=patterns)


def available() -> bool:
    return _kernels() is not None


@dataclass
class BlockArgs:
    """A tensor's constant arguments of the compiled merge, built once per
    tensor (:func:`ties_args`, :func:`dare_args`); ``quota`` changes as blocks
    are merged."""

    strict: np.ndarray       # per model, TIES hardshrink threshold of the sure keeps
    with_ties: np.ndarray    # ... and the threshold that also keeps the tied entries
    quota: np.ndarray        # int64: tied entries each model still keeps (updated in place)
    kinds: np.ndarray        # int8, DARE/DELLA: 0 keep all, 1 drop all, 2 draw, 3 keep bits (DELLA)
    dens: np.ndarray         # float32, DARE densities
    rescale: bool
    scales: np.ndarray       # float32, DELLA: each model's rescale factor (1 without)
    weights: np.ndarray      # float32
    mode: int                # 0 consensus by sum, 1 by count, 2 none (dare_linear)
    zero_sign: float
    normalize: bool
    total: np.float32        # dare_linear's divisor
    lam: np.float32
    drop: bool               # DARE (read the uniforms) rather than TIES' trim
    positive_weights: bool   # the disjoint mean may clamp its divisor instead of mapping 0 to 1


def ties_args(strict: np.ndarray, with_ties: np.ndarray, quota: np.ndarray, weights: np.ndarray, count_mode: bool,
              zero_sign: float, normalize: bool, lam: float) -> BlockArgs:
    """TIES: per model, the hardshrink thresholds without and with the tied
    entries, and how many tied entries each still keeps."""
    none = np.zeros(0, dtype=np.float32)
    return BlockArgs(strict, with_ties, quota, none.astype(np.int8), none, False, none, weights, 1 if count_mode else 0,
                     float(zero_sign), normalize, np.float32(1.0), np.float32(lam), drop=False,
                     positive_weights=bool((weights > 0).all()))


def dare_args(kinds: np.ndarray, densities: np.ndarray, rescale: bool, weights: np.ndarray, consensus: bool,
              normalize: bool, total: float, lam: float) -> BlockArgs:
    """DARE (``dare_ties`` with ``consensus``, else ``dare_linear``): model i
    keeps everything (``kinds[i] == 0``), nothing (1), or the entries where its
    uniform is below its density (2), divided by the density with ``rescale``;
    ``total``: the weights' sum for ``dare_linear``'s ``normalize``."""
    n = len(weights)
    return BlockArgs(np.full(n, -1.0, np.float32), np.full(n, -1.0, np.float32), np.zeros(n, np.int64), kinds,
                     densities, rescale, np.ones(n, np.float32), weights, 0 if consensus else 2, 1.0, normalize,
                     np.float32(total), np.float32(lam), drop=True, positive_weights=bool((weights > 0).all()))


def mask_args(kinds: np.ndarray, weights: np.ndarray, consensus: bool, normalize: bool, total: float, lam: float,
              scales: np.ndarray | None = None) -> BlockArgs:
    """Sparsifications decided outside the loop (``consensus``: elect signs by
    mass, else the weighted sum): model i keeps everything (``kinds[i] == 0``),
    nothing (1), the entries its keep bits mark (3, DELLA: the ``masks`` row of
    :func:`merge_raw`, times ``scales[i]``), or its magnitude band (4,
    breadcrumbs: ``band`` and ``band_quota`` of :func:`merge_raw`)."""
    n = len(weights)
    return BlockArgs(np.full(n, -1.0, np.float32), np.full(n, -1.0, np.float32), np.zeros(n, np.int64), kinds,
                     np.ones(n, np.float32), False, np.ones(n, np.float32) if scales is None else scales, weights,
                     0 if consensus else 2, 1.0, normalize, np.float32(total), np.float32(lam), drop=False,
                     positive_weights=bool((weights > 0).all()))


def merge_block(base: torch.Tensor, models: Sequence[torch.Tensor], args: BlockArgs, keys: Sequence[int] = (),
                offset: int = 0) -> torch.Tensor:
    """One block (float32, contiguous, CPU) merged into a new float32 tensor;
    DARE: ``keys`` are the models' uniform stream keys
    (:func:`surgeon.merge.rng.stream_key`), ``offset`` the block's flat
    index in the tensor."""
    out = torch.empty(base.numel(), dtype=torch.float32)
    merge_raw(_raw.flat_array(base), tuple(_raw.flat_array(m) for m in models), args, out.numpy(), keys, offset)
    return out


_NO_MASKS = np.zeros((0, 0), dtype=np.uint8)
_NO_BAND = np.zeros((0, 2), dtype=np.float32)
_NO_BAND_QUOTA = np.zeros((0, 2), dtype=np.int64)
_NO_BRACKETS = np.zeros((0, 2), dtype=np.float32)
_NO_COUNTS = np.zeros((0, 2), dtype=np.int64)
_NO_TIES = np.zeros((0, 2), dtype=np.int8)
_NO_INSIDE = np.zeros((0, 2, 0), dtype=np.int32)
_NO_POSITIONS = np.zeros(1, dtype=np.int64)


@dataclass
class Brackets:
    """A merge in one pass (:class:`surgeon.merge.kernels.one_pass.OnePassSelection`): per model,
    up to two ranges ``[lo, hi)`` of ``|delta|`` (``hi`` 0: none) that the merge counts around.
    Filled in by :func:`merge_raw`: ``below`` (entries under each range) and ``entries`` (the
    piece's entries inside any range)."""

    lo: np.ndarray         # float32 [models, 2]
    hi: np.ndarray         # float32 [models, 2]
    below: np.ndarray      # int64 [models, 2], added to
    entries: ListedEntries
    tie: np.ndarray        # int8 [models, 2]: 1 where the range holds one value (counted per chunk, not listed)
    per_chunk: np.ndarray  # int32 [models, 2, chunks]: a tie range's entries (at its value) per chunk of CHUNK entries

    @classmethod
    def empty(cls, lo: np.ndarray, hi: np.ndarray, capacity: int, base_dtype: np.dtype,
              model_dtype: np.dtype, n: int, tie: np.ndarray | None = None) -> Brackets:
        """Ranges for a piece of ``n`` entries (``tie``: the ranges counted per chunk instead of
        listed; none by default)."""
        nm = lo.shape[0]
        tie = np.zeros((nm, 2), np.int8) if tie is None else tie.astype(np.int8)
        return cls(lo.astype(np.float32), hi.astype(np.float32), np.zeros((nm, 2), np.int64),
                   ListedEntries.empty("bracketed", nm, capacity, base_dtype, model_dtype), tie,
                   thread_scratch("bracket counts", (nm, 2, -(-n // _CH)), np.int32))

    def inside(self) -> dict[tuple[int, int], np.ndarray]:
        """Per range ``(model, 0 or 1)`` but the tie ranges, the bit patterns (uint32) of its listed
        ``|delta|`` inside it."""
        _, b_at, m_at = self.entries.listed()
        nm = len(m_at)
        kept = thread_scratch("inside", (2 * nm, b_at.shape[0] + 1), np.uint32)  # + a slot for the last write
        kept_n = np.zeros((nm, 2), np.int64)
        wide = (self.hi > 0) & (self.tie == 0)
        _kernels().patterns(b_at, m_at, self.lo, np.where(wide, self.hi, np.float32(0.0)), kept, kept_n)
        return {(i, c): kept[2 * i + c, :int(kept_n[i, c])] for i in range(nm) for c in range(2) if wide[i, c]}


def merge_raw(base: np.ndarray, models: tuple[np.ndarray, ...], args: BlockArgs, out: np.ndarray,
              keys: Sequence[int] = (), offset: int = 0, masks: np.ndarray | None = None,
              band: np.ndarray | None = None, band_quota: np.ndarray | None = None,
              brackets: Brackets | None = None) -> bool:
    """Merge flat stored-dtype arrays (:func:`surgeon.merge.kernels._raw.raw_inputs`)
    into ``out`` (float32, or uint16 for bf16); returns whether every result
    was finite. ``masks`` (DELLA): uint8 ``[models, ceil(n / 8)]``, entry ``j``
    of the piece kept by model ``i`` when bit ``7 - j % 8`` of ``masks[i, j // 8]`` is set.
    ``band``, ``band_quota`` (breadcrumbs, ``kinds == 4``): float32 and int64
    ``[models, 2]``, each model's start and stop cut and how many entries equal
    to each cut its set still takes (updated in place). ``brackets`` (TIES'
    trim or breadcrumbs' band): counted and listed as :class:`Brackets` says."""
    ks = np.array([_random.signed_key(k) for k in keys] if args.drop else [], dtype=np.int64)
    br = brackets
    return bool(_kernels().merge(base, models, ks, offset, args.strict, args.with_ties, args.quota, args.kinds,
                                 args.dens, args.rescale, _NO_MASKS if masks is None else masks, args.scales,
                                 _NO_BAND if band is None else band,
                                 _NO_BAND_QUOTA if band_quota is None else band_quota, args.weights, args.mode,
                                 args.zero_sign, args.normalize, args.positive_weights, args.total, args.lam,
                                 _NO_BRACKETS if br is None else br.lo, _NO_BRACKETS if br is None else br.hi,
                                 _NO_TIES if br is None else br.tie, _NO_COUNTS if br is None else br.below,
                                 _NO_INSIDE if br is None else br.per_chunk,
                                 _NO_POSITIONS if br is None else br.entries.positions,
                                 base[:0] if br is None else br.entries.base,
                                 np.empty((len(models), 0), models[0].dtype) if br is None else br.entries.models,
                                 _NO_POSITIONS if br is None else br.entries.count, out))
