"""SCE's passes compiled: variance histograms, weight sums and the erase-and-mix, from stored dtypes.

Why. Through torch, each of SCE's four passes over a tensor casts every
block of every input to float32 and recomputes the task vectors and their
variance in some twenty op dispatches over 1 MiB temporaries; on the 1.1B
family a three-model SCE took 51-59 s, ten times the whole job's floor. Here
each pass is one numba call per piece: a 512-entry chunk of every input is
widened in L1 (:mod:`surgeon.merge.kernels._raw`), its task vectors and
variance computed once, and the pass's work done on them. Three models'
erase-and-mix runs as one loop over each chunk that keeps every entry in
registers (:func:`_kernels` ``erase_mix``; about twenty loops over the chunk
otherwise, which still take a chunk where tied variances meet the tie quota).

Exactness. Every float32 operation is the one :class:`surgeon.merge.kernels.sce.SceKernel`
does with torch, in the same order: the mean as a running sum divided by the
model count, the variance as a running sum of squared differences divided
by it, the selection ``var > t`` plus the first tied entries in flat order
(the quota carried from piece to piece), the elected sign of the summed
selected task vectors (zero: positive), and the mix as fused multiply-adds
(torch's vectorised ``add_(x, alpha=w)``), then ``/ max(wsum, 1e-6) + base``.
The weight sums add float32 squares in float64 in 512 running lanes, where
torch sums a block at a time: equal to float64 rounding, and bit-identical
where those sums are exact (tests/test_merge_conformance.py; the 1.1B
family's SCE output too).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

from . import _raw
from ._jit import compiled, numba_module

_CH = _raw.CHUNK


@compiled
def _kernels(jit: Any) -> Any:
    """SCE's statistic and merge loops."""
    global _scratch, _variance3, _variance_chunk, _select_chunk  # helpers are globals, not closure cells: see _jit.py
    _raw.register()
    inline = numba_module().njit(inline="always", nogil=True, boundscheck=False, error_model="numpy")

    @inline
    def _scratch(nm):  # pragma: no cover - compiled
        # a chunk's rows: base, one model (then the mean), the task vectors, their variance
        return (np.empty(_CH, np.float32), np.empty(_CH, np.float32), np.empty((nm, _CH), np.float32),
                np.empty(_CH, np.float32))

    @inline
    def _variance3(y0, y1, y2, n):  # pragma: no cover - compiled
        # three task-vector entries' population variance (n: 3.0), as the loops of
        # _variance_chunk round it: a running mean, then a running sum of squared differences
        mu = ((y0 + y1) + y2) / n
        z0 = y0 - mu
        z1 = y1 - mu
        z2 = y2 - mu
        return (((np.float32(0.0) + z0 * z0) + z1 * z1) + z2 * z2) / n

    @inline
    def _variance_chunk(b_all, ms, s, e, b, m, d, var):  # pragma: no cover - compiled
        # d[i] = m_i - b; var = population variance over the models, as torch's ops round it
        nm = len(ms)
        k = e - s
        _raw.load(b_all[s:e], b)
        n = np.float32(nm)
        if nm == 3:  # one loop over the chunk, the same float ops in the same order as the loops below
            for i in range(3):  # a runtime index: ms may hold fewer models when this never runs
                _raw.load(ms[i][s:e], d[i])
            r0 = d[0]
            r1 = d[1]
            r2 = d[2]
            for j in range(k):
                bj = b[j]
                y0 = r0[j] - bj
                y1 = r1[j] - bj
                y2 = r2[j] - bj
                r0[j] = y0
                r1[j] = y1
                r2[j] = y2
                var[j] = _variance3(y0, y1, y2, n)
            return
        for i in range(nm):
            _raw.load(ms[i][s:e], m)
            row = d[i]
            for j in range(k):
                row[j] = m[j] - b[j]
        mean = m  # the scratch row is free again
        row = d[0]
        for j in range(k):
            mean[j] = row[j]
        for i in range(1, nm):
            row = d[i]
            for j in range(k):
                mean[j] = mean[j] + row[j]
        for j in range(k):
            mean[j] = mean[j] / n
            var[j] = np.float32(0.0)
        for i in range(nm):
            row = d[i]
            for j in range(k):
                x = row[j] - mean[j]
                var[j] = var[j] + x * x
        for j in range(k):
            var[j] = var[j] / n

    @inline
    def _select_chunk(k, var, d, keep, t, quota):  # pragma: no cover - compiled
        # zero the task-vector entries the selection drops (var > t, and the first ``quota`` entries
        # equal to t in flat order); returns the quota left
        one = np.float32(1.0)
        zero = np.float32(0.0)
        ties = 0
        for j in range(k):
            x = var[j]
            keep[j] = one if x > t else zero
            ties += 1 if x == t else 0
        if ties > 0 and quota > 0:  # the chunk where tied entries are kept: in flat order
            for j in range(k):
                if quota > 0 and var[j] == t:
                    keep[j] = one
                    quota -= 1
        for i in range(d.shape[0]):
            row = d[i]
            for j in range(k):
                row[j] = row[j] * keep[j]  # as torch's d * mask: 0 * NaN or inf stays NaN
        return quota

    @jit
    def histograms(b_all, ms, low_pass, bucket, hist, counts, sq_above, sq_low):  # pragma: no cover - compiled
        # pass 0 (low_pass False): counts[0] += entries of non-zero variance, hist[top 16 bits] += 1;
        # pass 1: counts[1] += entries whose top 16 bits are below ``bucket``, hist[low 16 bits] += 1
        # for those inside it, and each model's float32 squares summed in float64: sq_above[i] over
        # the entries above the bucket, sq_low[i, low 16 bits] over those inside it (the weights
        # then need no pass of their own). Four interleaved histograms: neighbouring variances
        # mostly share a bucket, and one histogram made every increment wait for the one before.
        nm = len(ms)
        n = b_all.shape[0]
        b, m, d, var = _scratch(nm)
        bits = var.view(np.uint32)
        parts = np.zeros((4, hist.shape[0]), np.int64)
        lanes = np.zeros((nm, _CH), np.float64)
        zero = np.float32(0.0)
        nonzero = 0
        below = 0
        for s in range(0, n, _CH):
            e = min(n, s + _CH)
            k = e - s
            _variance_chunk(b_all, ms, s, e, b, m, d, var)
            if low_pass:
                for j in range(k):
                    below += 1 if (bits[j] >> np.uint32(16)) < bucket else 0
                for i in range(nm):
                    row = d[i]
                    lane = lanes[i]
                    for j in range(k):
                        x = row[j] * row[j]
                        lane[j] += np.float64(x) if (bits[j] >> np.uint32(16)) > bucket else np.float64(0.0)
                for j in range(k):
                    if (bits[j] >> np.uint32(16)) == bucket:
                        low = bits[j] & np.uint32(0xFFFF)
                        parts[j & 3, low] += 1
                        for i in range(nm):
                            x = d[i, j] * d[i, j]
                            sq_low[i, low] += np.float64(x)
            else:
                for j in range(k):
                    nonzero += 1 if var[j] != zero else 0
                for j in range(k):
                    parts[j & 3, bits[j] >> np.uint32(16)] += 1
        for q in range(4):
            for v in range(hist.shape[0]):
                hist[v] += parts[q, v]
        counts[0] += nonzero
        counts[1] += below
        if low_pass:
            for i in range(nm):
                sq_above[i] += lanes[i].sum()

    @jit
    def window_pass(b_all, ms, lo, span, counts, sq_above, rec_bits, rec_sq):  # pragma: no cover - compiled
        # counts[0] += entries of non-zero variance; counts[1] += entries whose variance's pattern is
        # above the window [lo, lo + span] (uint32 patterns order like the non-negative variances),
        # and sq_above[i] += model i's float32 squares of those, in float64 (one running sum per
        # chunk lane); each entry inside the window appends its pattern and every model's square
        # at slot counts[2], in flat order (past the last slot they overwrite it, while counts[2]
        # goes on counting: the caller sees the overflow). Inside entries are ~1 % of the tensor:
        # flags in a vectorised loop, then only the 8-entry words with a flag are visited.
        nm = len(ms)
        n = b_all.shape[0]
        b, m, d, var = _scratch(nm)
        bits = var.view(np.uint32)
        flag = np.zeros(_CH, np.uint8)
        words = flag.view(np.uint64)  # _CH is a multiple of 8
        lanes = np.zeros((nm, _CH), np.float64)
        zero = np.float32(0.0)
        hi = lo + span
        nonzero = 0
        above = 0
        c = counts[2]
        last = rec_bits.shape[0] - 1
        for s in range(0, n, _CH):
            e = min(n, s + _CH)
            k = e - s
            _variance_chunk(b_all, ms, s, e, b, m, d, var)
            for j in range(k):
                x = bits[j]
                nonzero += 1 if var[j] != zero else 0
                above += 1 if x > hi else 0
                flag[j] = 1 if np.uint32(x - lo) <= span else 0  # modulo 2^32: also 0 below lo
            for j in range(k, _CH):  # the last chunk of a piece: no flags past its end
                flag[j] = 0
            for i in range(nm):
                row = d[i]
                lane = lanes[i]
                for j in range(k):
                    x = row[j] * row[j]
                    lane[j] += np.float64(x) if bits[j] > hi else np.float64(0.0)
            for q in range(_CH // 8):
                if words[q] != 0:
                    for j in range(8 * q, 8 * q + 8):
                        slot = min(c, last)
                        rec_bits[slot] = bits[j]
                        for i in range(nm):
                            rec_sq[i, slot] = d[i, j] * d[i, j]
                        c += flag[j]
        counts[0] += nonzero
        counts[1] += above
        counts[2] = c
        for i in range(nm):
            sq_above[i] += lanes[i].sum()

    @jit
    def square_sums(b_all, ms, keep_all, t, quota, sq):  # pragma: no cover - compiled
        # sq[i] += sum of the float32 squares of model i's selected task vector, in float64 (one
        # running sum per chunk lane, added up at the end); returns the tie quota left
        nm = len(ms)
        n = b_all.shape[0]
        b, m, d, var = _scratch(nm)
        keep = np.empty(_CH, np.float32)
        lanes = np.zeros((nm, _CH), np.float64)
        for s in range(0, n, _CH):
            e = min(n, s + _CH)
            k = e - s
            _variance_chunk(b_all, ms, s, e, b, m, d, var)
            if not keep_all:
                quota = _select_chunk(k, var, d, keep, t, quota)
            for i in range(nm):
                row = d[i]
                lane = lanes[i]
                for j in range(k):
                    x = row[j] * row[j]
                    lane[j] += np.float64(x)
        for i in range(nm):
            sq[i] += lanes[i].sum()
        return quota

    @jit
    def erase_mix(b_all, ms, keep_all, t, quota, w, out_all, state):  # pragma: no cover - compiled
        # base + sum_i w_i [agree_i] d_i / max(sum_i w_i [agree_i], 1e-6), the elected sign being
        # that of the summed selected task vectors (zero: +1). state[0]: the tie quota left;
        # returns whether every result was finite
        nm = len(ms)
        n = b_all.shape[0]
        b, m, d, var = _scratch(nm)
        keep = np.empty(_CH, np.float32)
        acc = np.empty(_CH, np.float32)
        merged = np.empty(_CH, np.float32)
        wsum = np.empty(_CH, np.float32)
        chk = np.zeros(_CH, np.float32)
        zero = np.float32(0.0)
        one = np.float32(1.0)
        floor = np.float32(1e-6)
        res = np.empty(_CH, np.float32)
        for s in range(0, n, _CH):
            e = min(n, s + _CH)
            k = e - s
            _variance_chunk(b_all, ms, s, e, b, m, d, var)
            if nm == 3:
                # three models: after the variance loop, one loop keeps each entry in registers
                # (about 20 loops over the chunk below), the same float ops in the same order; a
                # chunk holding entries tied at the threshold while the tie quota lasts is done by
                # the loops below
                r0 = d[0]
                r1 = d[1]
                r2 = d[2]
                w0 = w[0]
                w1 = w[1]
                w2 = w[2]
                for j in range(k):
                    v = var[j]
                    sel = one if (keep_all or v > t) else zero
                    y0 = r0[j] * sel
                    y1 = r1[j] * sel
                    y2 = r2[j] * sel
                    a = ((zero + y0) + y1) + y2
                    sg = -one if a < zero else (one if a >= zero else a)
                    g0 = one if (one if y0 > zero else (-one if y0 < zero else zero)) == sg else zero
                    g1 = one if (one if y1 > zero else (-one if y1 < zero else zero)) == sg else zero
                    g2 = one if (one if y2 > zero else (-one if y2 < zero else zero)) == sg else zero
                    mx = _raw.fma(w2, y2 * g2, _raw.fma(w1, y1 * g1, _raw.fma(w0, y0 * g0, zero)))
                    ws = _raw.fma(w2, g2, _raw.fma(w1, g1, _raw.fma(w0, g0, zero)))
                    res[j] = mx / (floor if ws < floor else ws) + b[j]  # noqa: FURB136 - NaN stays NaN
                ties = 0
                if not keep_all and quota > 0:
                    for j in range(k):
                        ties += 1 if var[j] == t else 0
                if ties == 0:
                    _raw.store_checked(res[:k], out_all[s:e], chk)
                    continue
            if not keep_all:
                quota = _select_chunk(k, var, d, keep, t, quota)
            for j in range(k):
                acc[j] = zero
                merged[j] = zero
                wsum[j] = zero
            for i in range(nm):
                row = d[i]
                for j in range(k):
                    acc[j] = acc[j] + row[j]
            for j in range(k):  # the elected sign (NaN stays NaN: agrees with nothing)
                a = acc[j]
                acc[j] = -one if a < zero else (one if a >= zero else a)
            for i in range(nm):
                row = d[i]
                wi = w[i]
                for j in range(k):
                    x = row[j]
                    sg = one if x > zero else (-one if x < zero else zero)
                    agree = one if sg == acc[j] else zero
                    merged[j] = _raw.fma(wi, x * agree, merged[j])
                    wsum[j] = _raw.fma(wi, agree, wsum[j])
            for j in range(k):
                v = wsum[j]
                merged[j] = merged[j] / (floor if v < floor else v) + b[j]  # noqa: FURB136 - NaN stays NaN
            _raw.store_checked(merged, out_all[s:e], chk)
        state[0] = quota
        return _raw.all_finite(chk)

    return SimpleNamespace(histograms=histograms, window_pass=window_pass, square_sums=square_sums,
                           erase_mix=erase_mix)


def available() -> bool:
    """Whether the compiled loops can run (numba present and on)."""
    return _kernels() is not None


def histograms(base: np.ndarray, models: tuple[np.ndarray, ...], low_pass: bool, bucket: int,
               hist: np.ndarray, counts: np.ndarray, sq_above: np.ndarray | None = None,
               sq_low: np.ndarray | None = None) -> None:
    """Pass 0 or 1 of the variance selection over one piece (see :class:`surgeon.merge.kernels.sce.SceKernel`);
    pass 1 also adds the squared task vectors above and inside ``bucket`` to ``sq_above`` (models) and
    ``sq_low`` (models x 2^16, by the low 16 bits of the variance)."""
    if sq_above is None or sq_low is None:
        sq_above, sq_low = np.zeros(len(models)), np.zeros((len(models), 1))
    _kernels().histograms(base, models, low_pass, np.uint32(bucket), hist, counts, sq_above, sq_low)


def window_pass(base: np.ndarray, models: tuple[np.ndarray, ...], lo: int, span: int, counts: np.ndarray,
                sq_above: np.ndarray, rec_bits: np.ndarray, rec_sq: np.ndarray) -> None:
    """One piece of a window pass (:class:`surgeon.merge.kernels.sce.SceKernel`): ``counts`` (int64 [3])
    gets the entries of non-zero variance, those above the window of patterns ``[lo, lo + span]``
    and the running count of those inside; ``sq_above`` (float64 [models]) each model's squares
    above the window; ``rec_bits`` (uint32 [capacity + 1]) and ``rec_sq`` (float32
    [models, capacity + 1]) the inside entries' patterns and squares, in flat order (the last
    slot is a spare that writes past the capacity go to)."""
    _kernels().window_pass(base, models, np.uint32(lo), np.uint32(span), counts, sq_above, rec_bits, rec_sq)


def square_sums(base: np.ndarray, models: tuple[np.ndarray, ...], keep_all: bool, t: float, quota: int,
                sq: np.ndarray) -> int:
    """Add each model's selected squared task vector of one piece to ``sq`` (float64); returns the quota left."""
    return int(_kernels().square_sums(base, models, keep_all, np.float32(t), np.int64(quota), sq))


def erase_mix(base: np.ndarray, models: tuple[np.ndarray, ...], keep_all: bool, t: float, quota: int,
              weights: np.ndarray, out: np.ndarray) -> tuple[bool, int]:
    """The merge pass over one piece into ``out``; returns (every result finite, quota left)."""
    state = np.zeros(1, np.int64)
    finite = _kernels().erase_mix(base, models, keep_all, np.float32(t), np.int64(quota), weights, out, state)
    return bool(finite), int(state[0])
