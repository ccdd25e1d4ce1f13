"""Exact order-statistic selection without sorting whole tensors.

mergekit's TIES spends most of its time in ``torch.argsort`` over every
tensor. Selecting the k largest entries only needs the k-th value
(``torch.kthvalue``, a linear-time selection) plus comparisons, and ties at
the boundary can be broken deterministically with one cumulative sum over the
(usually few) tied entries.

Conventions shared by every mask here: an entry's *stable rank* orders by
value and, among equal values, by flat (row-major) index. ``smallest_mask(v,
k)`` keeps the first ``k`` entries in ascending stable order;
``largest_mask(v, k)`` the first ``k`` in descending value order, ties again
going to the lowest flat index. NaN inputs are not supported.

:func:`stream_kth_smallest` finds the exact k-th smallest value of a
non-negative float32 sequence that is too large to hold (a whole model's task
vector) in two streaming passes over 16-bit histograms of the IEEE-754 bit
patterns, which order like the values for non-negative floats.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = [
    "kth_smallest",
    "largest_mask",
    "rank_range_mask",
    "smallest_mask",
    "stream_kth_smallest",
]


def kth_smallest(flat: torch.Tensor, k: int, how: str | None = None) -> torch.Tensor:
    """The k-th smallest (1-based) entry of a 1-D tensor, as a 0-d tensor.

    CPU: ``torch.kthvalue`` (linear-time selection, several times faster than a
    sort). Other devices: ``torch.topk`` of the smaller side — CUDA's
    ``kthvalue`` was measured at 0.41 s on 58M floats on an H200, against
    2.7 ms for ``topk``. ``how`` forces ``"kthvalue"`` or ``"topk"``.
    """
    n = flat.numel()
    how = how or ("kthvalue" if flat.device.type == "cpu" else "topk")
    if how == "kthvalue":
        return torch.kthvalue(flat, k).values
    if k <= n - k + 1:
        return torch.topk(flat, k, largest=False, sorted=False).values.max()
    return torch.topk(flat, n - k + 1, largest=True, sorted=False).values.min()


def _boundary_mask(flat: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    # the k-th largest is the (n - k + 1)-th smallest
    thr = kth_smallest(flat, n - k + 1 if largest else k)
    keep = flat >= thr if largest else flat <= thr
    excess = int(torch.count_nonzero(keep)) - k
    if excess > 0:
        # more entries equal the threshold than fit: drop the tied entries
        # with the highest flat indices (the lowest ones win)
        tied = torch.nonzero(flat == thr).squeeze(1)
        keep[tied[tied.numel() - excess:]] = False
    return keep


def smallest_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (shape of ``values``) of the ``k`` smallest entries.

    Exactly ``min(max(k, 0), numel)`` entries are selected; among entries
    equal to the k-th smallest value, the lowest flat indices win.
    """
    flat = values.reshape(-1)
    return _boundary_mask(flat, int(k), largest=False).reshape(values.shape)


def largest_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries (ties: lowest flat index)."""
    flat = values.reshape(-1)
    return _boundary_mask(flat, int(k), largest=True).reshape(values.shape)


def rank_range_mask(values: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Entries whose stable ascending rank (0-based) lies in ``[start, stop)``.

    Equivalent to ``argsort(values.flatten(), stable=True)[start:stop]`` as a
    mask, computed with two selections instead of a sort.
    """
    start = max(int(start), 0)
    stop = min(int(stop), values.numel())
    if stop <= start:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    mask = smallest_mask(values, stop)
    if start > 0:
        mask &= ~smallest_mask(values, start)
    return mask


# ---------------------------------------------------------------------------
# Streaming exact selection over a whole model.

_HI_BUCKETS = 1 << 15  # sign bit is 0 for non-negative floats: top 16 bits < 2**15
_LO_BUCKETS = 1 << 16


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.float32:
        t = t.float()
    return t.contiguous().reshape(-1).view(torch.int32)


def _reduce_hists(hists: list[torch.Tensor | None], totals: list[int], n: int, buckets: int,
                  reduce: Callable[[torch.Tensor], torch.Tensor]) -> tuple[list[torch.Tensor | None], list[int]]:
    """Sum per-series histograms and counts over processes (missing series count as empty)."""
    stacked = torch.zeros(n + 1, buckets, dtype=torch.int64)
    for i, h in enumerate(hists[:n]):
        if h is not None:
            stacked[i] = h
    stacked[n, :n] = torch.tensor((list(totals) + [0] * n)[:n], dtype=torch.int64)
    reduce(stacked)
    counts = [int(c) for c in stacked[n, :n]]
    out = [stacked[i] if int(stacked[i].sum()) > 0 else None for i in range(n)]
    return out, counts


def stream_kth_smallest(
    passes: Callable[[], Iterable[Sequence[torch.Tensor | None]]],
    ks: Sequence[int | None] | Callable[[list[int]], Sequence[int | None]],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    n_series: int | None = None,
) -> list[float | None]:
    """Exact k-th smallest (1-based) of several non-negative streamed sequences.

    ``passes()`` returns a fresh iterable; each item is a sequence with one
    chunk (any shape, non-negative float32) per series, ``None`` to skip. The
    series are the concatenations of their chunks. ``ks[i]`` is the order
    statistic wanted for series ``i`` (``None``: not wanted). ``passes`` is
    called twice: a histogram of the top 16 bits of each value's float32 bit
    pattern finds the bucket holding the k-th value, then a histogram of the
    low 16 bits inside that bucket pins the exact value. Memory: two small
    histograms per series, whatever the series' length.

    ``reduce`` (with ``n_series``) sums the histograms and counts in place
    across processes after each pass, so ranks that each stream a part of
    the model find the same exact whole-model order statistics.
    """
    hists: list[torch.Tensor | None] = []
    totals: list[int] = []
    fixed = None if callable(ks) else list(ks)
    for chunks in passes():
        while len(hists) < len(chunks):
            hists.append(None)
            totals.append(0)
        for i, c in enumerate(chunks):
            if c is None or c.numel() == 0 or (fixed is not None and (i >= len(fixed) or fixed[i] is None)):
                continue
            hi = _bits(c) >> 16
            h = torch.bincount(hi, minlength=_HI_BUCKETS).cpu()
            hists[i] = h if hists[i] is None else hists[i].add_(h)
            totals[i] += c.numel()
    if reduce is not None:
        hists, totals = _reduce_hists(hists, totals, n_series or len(hists), _HI_BUCKETS, reduce)
    ks = list(ks(list(totals))) if callable(ks) else list(ks)
    n = len(ks)
    hists += [None] * (n - len(hists))
    totals += [0] * (n - len(totals))
    buckets: list[int | None] = [None] * n
    rem: list[int] = [0] * n
    for i, k in enumerate(ks):
        if k is None or hists[i] is None:
            continue
        if not 1 <= k <= totals[i]:
            raise ValueError(f"order statistic {k} out of range 1..{totals[i]}")
        cum = torch.cumsum(hists[i], 0)
        b = int(torch.searchsorted(cum, torch.tensor(k, dtype=cum.dtype)))
        buckets[i] = b
        rem[i] = k - (int(cum[b - 1]) if b > 0 else 0)
    if all(b is None for b in buckets):
        return [None] * n
    lo_hists: list[torch.Tensor | None] = [None] * n
    for chunks in passes():
        for i, c in enumerate(chunks):
            if buckets[i] is None or c is None or c.numel() == 0:
                continue
            bits = _bits(c)
            sel = bits[(bits >> 16) == buckets[i]] & 0xFFFF
            if sel.numel() == 0:
                continue
            h = torch.bincount(sel, minlength=_LO_BUCKETS).cpu()
            lo_hists[i] = h if lo_hists[i] is None else lo_hists[i].add_(h)
    if reduce is not None:
        lo_hists, _ = _reduce_hists(lo_hists, [0] * n, n, _LO_BUCKETS, reduce)
    out: list[float | None] = [None] * n
    for i in range(n):
        if buckets[i] is None:
            continue
        h = lo_hists[i]
        if h is None:  # the stream changed between passes
            raise RuntimeError("stream_kth_smallest: the second pass saw different data")
        cum = torch.cumsum(h, 0)
        j = int(torch.searchsorted(cum, torch.tensor(rem[i], dtype=cum.dtype)))
        if j >= _LO_BUCKETS:
            raise RuntimeError("stream_kth_smallest: the second pass saw different data")
        pattern = torch.tensor([(buckets[i] << 16) | j], dtype=torch.int32)
        out[i] = float(pattern.view(torch.float32)[0])
    return out

