"""The counting loop behind :mod:`surgeon.merge.select.stream`, compiled for CPU.

Why not ``torch.bincount``. The exact selection behind the TIES and
breadcrumbs trims counts the bit patterns of every ``|delta|``. On CPU,
``torch.bincount`` scans its input three times (minimum, maximum, then the
scalar counting loop) into a fresh histogram that must then be added to the
running one, after ``|m - b|`` has been computed into a fresh float32 block
from float32 copies of the bf16 inputs; on the 2-core development machine
that was ~40 % of a TIES merge. One numba loop (``nogil``, so the engine's
compute threads run it side by side) reads the stored inputs, widens them
chunk by chunk (:mod:`surgeon.merge.kernels._raw`), and counts each series' deltas
either by their top 16 bits or inside a window of bit patterns (plus how
many fall below it): measured in ``docs/merging.md``.

numba is imported on first use only (CPU merges that trim by magnitude), and
compiled functions are cached on disk (``cache=True``), so only the very first
run pays the compilation (~2 s). Set ``SURGEON_NO_NUMBA=1`` to count with
torch ops instead (same counts; tests check both).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..kernels import _raw
from ..kernels._jit import compiled
from ..kernels.scratch import thread_scratch

#: top-16-bit buckets of non-negative float32 (sign bit 0)
TOP_BINS = 1 << 15
#: count kinds of the counting loop, per series
SKIP, TOP16, WINDOW, COLLECT = 0, 1, 2, 3
#: the index of a uint64's only set bit ``b``: ``DEBRUIJN_INDEX[(b * DEBRUIJN_MAGIC) >> 58]``
#: (the top 6 bits of a de Bruijn sequence shifted left by the index are distinct)
DEBRUIJN_MAGIC = np.uint64(0x03F79D71B4CB0A89)
DEBRUIJN_INDEX = np.zeros(64, dtype=np.int64)
for _i in range(64):
    DEBRUIJN_INDEX[((int(DEBRUIJN_MAGIC) << _i) & ((1 << 64) - 1)) >> 58] = _i
del _i


@compiled
def _kernels(jit: Any) -> Any:
    """The counting loop."""
    _raw.register()
    ch = _raw.CHUNK

    @jit
    def delta_counts(b_all, ms, sel, kind, lo, width, below, top, fine, inside, kept):  # pragma: no cover - compiled
        # Per chunk: widen the base once, then per series |m - b| into a
        # scratch row and its bit patterns counted. Loops index chunk slices
        # from 0 so that LLVM vectorises them (see surgeon.merge.kernels.ties_compiled).
        # Brackets: one vectorised loop counts the entries below and flags those
        # inside (a byte each); only the 8-entry words with a flag set are then
        # visited one entry at a time (a bracket holds ~1-2 % of the entries:
        # a scalar, branchy loop over every entry cost more than the rest).
        n = b_all.shape[0]
        b = np.empty(ch, np.float32)
        m = np.empty(ch, np.float32)
        d = np.empty(ch, np.float32)
        du = d.view(np.uint32)
        flag = np.zeros(ch, np.uint8)
        words = flag.view(np.uint64)  # ch is a multiple of 8
        for s in range(0, n, ch):
            e = min(n, s + ch)
            k = e - s
            _raw.load(b_all[s:e], b)
            held = -1  # the model whose deltas d holds: consecutive series of one model (breadcrumbs' two cuts) share them
            for t in range(sel.shape[0]):
                if kind[t] == 0:
                    continue
                if sel[t] != held:
                    held = sel[t]
                    _raw.load(ms[held][s:e], m)
                    for j in range(k):
                        d[j] = abs(m[j] - b[j])
                if kind[t] == 1:
                    h = top[t]
                    for j in range(k):
                        # the mask keeps a NaN's pattern inside the histogram (no bounds checks here)
                        h[(du[j] >> np.uint32(16)) & np.uint32(0x7FFF)] += 1
                    continue
                lo_t = lo[t]
                w_t = width[t]
                cnt = 0
                for j in range(k):
                    x = du[j]
                    cnt += 1 if x < lo_t else 0
                    flag[j] = 1 if np.uint32(x - lo_t) < w_t else 0  # modulo 2^32: also 0 below lo_t
                for j in range(k, ch):  # the last chunk of a piece: no flags past its end
                    flag[j] = 0
                below[t] += cnt
                if kind[t] == 2:
                    f = fine[t]
                    for q in range(ch // 8):
                        if words[q] != 0:
                            for j in range(8 * q, 8 * q + 8):
                                if flag[j] != 0:
                                    f[du[j] - lo_t] += 1
                    continue
                # COLLECT: keep the patterns themselves while there is room (one spare
                # slot takes the writes past it, without a branch), count them all. Only
                # the flagged entries are visited: each set flag byte of an 8-entry word is
                # found by its lowest set bit (a de Bruijn multiply); visiting all 8 entries
                # of every word with a flag (12 % of words at a 1.8 % bracket) cost 2/3 of
                # the pass
                keep = kept[t]
                c = inside[t]
                last = keep.shape[0] - 1
                for q in range(ch // 8):
                    w = words[q]
                    while w != 0:
                        low = w & (~w + np.uint64(1))
                        j = 8 * q + (DEBRUIJN_INDEX[(low * DEBRUIJN_MAGIC) >> np.uint64(58)] >> 3)
                        keep[min(c, last)] = du[j]
                        c += 1
                        w ^= low
                inside[t] = c

    @jit
    def window_rank(patterns, rank, lo, width, counts, out):  # pragma: no cover - compiled
        # out = (the rank-th smallest pattern, entries below it, entries equal to it); patterns all
        # in [lo, lo + width), counts: scratch of at least width entries
        for j in range(width):
            counts[j] = 0
        for p in range(patterns.shape[0]):
            counts[np.int64(patterns[p]) - lo] += 1
        c = 0
        for j in range(width):
            nc = c + counts[j]
            if nc >= rank:
                out[0] = lo + j
                out[1] = c
                out[2] = counts[j]
                return
            c = nc

    @jit
    def select_patterns(patterns, ranks, out):  # pragma: no cover - compiled
        # out[q] = the ranks[q]-th smallest (0-based, in range) of the uint32 patterns, digit by
        # digit: one histogram of every pattern's top 11 bits (shared by all ranks), then per
        # rank the patterns of its bin gathered once and their next 11 and last 10 bits counted
        n = patterns.shape[0]
        top = np.zeros(2048, np.int64)
        for i in range(n):
            top[patterns[i] >> np.uint32(21)] += 1
        buf = np.empty(n, np.uint32)
        mid = np.empty(2048, np.int64)
        low = np.empty(1024, np.int64)
        for q in range(ranks.shape[0]):
            r = ranks[q]
            h = 0
            while r >= top[h]:
                r -= top[h]
                h += 1
            k = 0
            for i in range(n):  # branch-free gather of the bin's patterns
                p = patterns[i]
                buf[k] = p
                k += np.int64((p >> np.uint32(21)) == np.uint32(h))
            mid[:] = 0
            for i in range(k):
                mid[(buf[i] >> np.uint32(10)) & np.uint32(2047)] += 1
            g = 0
            while r >= mid[g]:
                r -= mid[g]
                g += 1
            low[:] = 0
            for i in range(k):
                p = buf[i]
                if ((p >> np.uint32(10)) & np.uint32(2047)) == np.uint32(g):
                    low[p & np.uint32(1023)] += 1
            j = 0
            while r >= low[j]:
                r -= low[j]
                j += 1
            out[q] = (np.uint32(h) << np.uint32(21)) | (np.uint32(g) << np.uint32(10)) | np.uint32(j)

    return SimpleNamespace(delta_counts=delta_counts, window_rank=window_rank, select_patterns=select_patterns)


def compiled_counts_available() -> bool:
    return _kernels() is not None


def count_deltas_compiled(base: np.ndarray, models: tuple[np.ndarray, ...], sel: np.ndarray, kind: np.ndarray,
                          lo: np.ndarray, width: np.ndarray, below: np.ndarray, top: np.ndarray,
                          fine: np.ndarray, inside: np.ndarray, kept: np.ndarray) -> None:
    """The compiled :func:`count_deltas_torch` on stored-dtype arrays
    (:func:`surgeon.merge.kernels._raw.raw_inputs`); ``lo``/``width`` uint32,
    ``below``/``inside`` int64, ``top`` int64 ``[series, TOP_BINS]`` (or
    ``[series, 0]`` when no series counts top bits), ``fine``
    ``[series, >= max WINDOW width]``, ``kept`` uint32 ``[series, capacity + 1]`` (the last
    column a spare slot the loop writes past the capacity into)."""
    _kernels().delta_counts(base, models, sel, kind, lo, width, below, top, fine, inside, kept)


def window_rank_compiled(patterns: np.ndarray, rank: int, lo: int, width: int) -> tuple[int, int, int]:
    """:func:`surgeon.merge.select.stream.rank_in_window` by a histogram in this thread's reused
    scratch memory (no fresh counts per call: a selection asks once per series and tensor)."""
    counts = thread_scratch("window counts", (width,), np.int64)
    out = np.zeros(3, np.int64)
    _kernels().window_rank(patterns, rank, lo, width, counts, out)
    return int(out[0]), int(out[1]), int(out[2])


def select_patterns_compiled(patterns: np.ndarray, ranks: list[int]) -> list[int]:
    """The values at ``ranks`` (0-based, each in range) of the uint32 ``patterns`` sorted
    ascending, by a compiled radix select (:func:`surgeon.merge.select.stream.order_statistics`)."""
    out = np.zeros(len(ranks), np.uint32)
    _kernels().select_patterns(np.ascontiguousarray(patterns), np.asarray(ranks, dtype=np.int64), out)
    return [int(x) for x in out]


def count_deltas_torch(base: torch.Tensor, models: list[torch.Tensor], sel: list[int], kind: list[int],
                       lo: list[int], width: list[int], below: torch.Tensor, top: torch.Tensor,
                       fine: torch.Tensor, inside: torch.Tensor, kept: list[list[torch.Tensor]]) -> None:
    """For each series ``t`` with ``kind[t] != SKIP``, the bit patterns ``v``
    of ``|models[sel[t]] - base|`` (float32): ``TOP16`` adds ``v >> 16`` to
    ``top[t]``; ``WINDOW`` and ``COLLECT`` add ``#(v < lo[t])`` to
    ``below[t]``; of the entries with ``lo[t] <= v < lo[t] + width[t]``,
    ``WINDOW`` histograms ``v - lo[t]`` into ``fine[t]``, ``COLLECT`` counts
    them into ``inside[t]`` and appends their patterns to ``kept[t]`` (the
    compiled loop keeps them up to its capacity). Torch ops, any device (the
    compiled loop's reference)."""
    b = base.reshape(-1).to(torch.float32)
    for t, (i, kd) in enumerate(zip(sel, kind)):
        if kd == SKIP:
            continue
        v = (models[i].reshape(-1).to(torch.float32) - b).abs_().view(torch.int32)
        if kd == TOP16:
            top[t].add_(torch.bincount(v >> 16, minlength=TOP_BINS))
            continue
        r = v.to(torch.int64) - lo[t]
        below[t] += int((r < 0).sum())
        mask = (r >= 0) & (r < width[t])
        if kd == WINDOW:
            fine[t, :width[t]].add_(torch.bincount(r[mask], minlength=width[t]).to(fine.dtype))
        else:
            inside[t] += int(mask.sum())
            kept[t].append(v[mask].to(torch.int64))
