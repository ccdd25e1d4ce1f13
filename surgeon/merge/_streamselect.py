"""Exact order statistics of a tensor streamed in blocks (two histogram passes).

Block kernels (:mod:`surgeon.merge.blocks`) that trim by magnitude need, per
model, the exact k-th smallest ``|delta|`` of the whole tensor and how ties at
that value are split, without sorting and without holding the tensor. For
non-negative float32 values the IEEE-754 bit patterns order like the values,
so:

- pass 0: a histogram of the top 16 bits of every value -> the bucket that
  holds the k-th smallest and its rank inside the bucket;
- pass 1: a histogram of the low 16 bits of the values inside that bucket ->
  the exact value ``t``, the number of entries below it and equal to it.

Both are counting loops over cache-resident blocks (:mod:`surgeon.merge._hist`:
compiled with numba on CPU, ``bincount`` elsewhere; ~0.1-0.2 and 0.1-0.35 ms
per 2^18 entries on the development CPU, the second depending on how crowded
the bucket is), against ``torch.kthvalue``'s ~4 ms on the
same block and a copy of the whole tensor. The same "stable order" convention as
:mod:`surgeon.merge._select` settles ties: among equal values, lower flat
index first. :class:`RankCut` turns a selection into per-block masks with a
running quota of tied entries, so blocks must come in flat order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._hist import bucket_counts, bucket_hist, count_bucket, count_top16

_HI = 1 << 15       # top-16-bit buckets of non-negative float32 (sign bit 0)
_LO = 1 << 16       # entries of one bucket, by their low 16 bits


@dataclass
class Selected:
    """The k-th smallest (1-based) value ``value``; ``below`` entries are
    smaller, ``equal`` entries equal to it."""

    value: float
    below: int
    equal: int


class StreamSelector:
    """k-th smallest (1-based, ``1 <= k <= n``) of each series of a streamed tensor.

    ``observe(pass_no, series, values)`` takes one block of one series
    (non-negative float32, any shape); call ``end_pass(pass_no)`` after each of
    the two passes; then :attr:`result` maps series to :class:`Selected`.
    """

    passes = 2

    def __init__(self, ks: dict[object, int], n: int):
        self.ks, self.n = dict(ks), n
        self._hist: dict[object, torch.Tensor] = {}
        self._bucket: dict[object, int] = {}
        self._share: dict[object, float] = {}  # fraction of the tensor in the bucket
        self._rank: dict[object, int] = {}
        self._below_bucket: dict[object, int] = {}
        self.result: dict[object, Selected] = {}

    def _hist_for(self, pass_no: int, series: object, device: torch.device) -> torch.Tensor:
        h = self._hist.get(series)
        if h is None:
            h = self._hist[series] = (torch.zeros(_HI, dtype=torch.int64, device=device) if pass_no == 0
                                      else bucket_hist(device))
        return h

    def observe(self, pass_no: int, series: object, values: torch.Tensor) -> None:
        if series not in self.ks:
            return
        h = self._hist_for(pass_no, series, values.device)
        if pass_no == 0:
            count_top16(values, h)
        else:  # the bucket's entries at full resolution (the counts below it come from pass 0)
            count_bucket(values, self._bucket[series], h, self._share[series])

    def end_pass(self, pass_no: int) -> None:
        for series, k in self.ks.items():
            h = self._hist.pop(series, None)
            if h is not None and pass_no == 1:
                h = bucket_counts(h)
            h = h.cpu() if h is not None else torch.zeros(_HI if pass_no == 0 else _LO, dtype=torch.int64)
            cum = torch.cumsum(h, 0)
            if pass_no == 0:
                b = int(torch.searchsorted(cum, torch.tensor(k, dtype=cum.dtype)))
                if b >= _HI:
                    raise RuntimeError(f"order statistic {k} out of range (saw {int(cum[-1])} values)")
                self._bucket[series] = b
                self._share[series] = float(h[b]) / max(1, self.n)
                self._below_bucket[series] = int(cum[b - 1]) if b > 0 else 0
                self._rank[series] = k - self._below_bucket[series]
            else:
                j = int(torch.searchsorted(cum, torch.tensor(self._rank[series], dtype=cum.dtype)))
                if j >= _LO:
                    raise RuntimeError("selection passes saw different data")
                pattern = torch.tensor([(self._bucket[series] << 16) | j], dtype=torch.int32)
                below = self._below_bucket[series] + (int(cum[j - 1]) if j > 0 else 0)
                self.result[series] = Selected(float(pattern.view(torch.float32)[0]), below, int(h[j]))


def next_float(x: float, toward: float) -> float:
    """The float32 next to ``x`` in the direction of ``toward``."""
    import numpy as np

    return float(np.nextafter(np.float32(x), np.float32(toward)))


class RankCut:
    """Mask of the entries of a streamed non-negative tensor whose stable rank
    is among the ``count`` smallest; ties go to lower flat indices. (TIES'
    k-largest trim works on the signed deltas with ``hardshrink`` instead.)

    Built from the :class:`Selected` boundary value; :meth:`keep` returns a
    float 0/1 mask per block (blocks in flat order: tied entries are counted
    off a running quota).
    """

    def __init__(self, sel: Selected, count: int):
        self.t = sel.value
        self.quota = count - sel.below    # tied entries that belong, first in flat order
        self.all_tied = self.quota >= sel.equal

    def keep(self, values: torch.Tensor) -> torch.Tensor:
        """Float mask (1 keep, 0 drop) for one block of the series (float ops: no bool tensors)."""
        t = self.t
        # [v < c] with c = t, or just above t when every tied entry belongs
        c = next_float(t, float("inf")) if self.all_tied else t
        mask = (c - values).relu_().sign_()
        if not self.all_tied and self.quota > 0:
            idx = torch.nonzero((values == t).reshape(-1)).squeeze(1)
            if idx.numel():
                idx = idx[:self.quota]
                mask.reshape(-1)[idx] = 1.0
                self.quota -= idx.numel()
        return mask
