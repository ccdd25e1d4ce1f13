"""SCE's arithmetic and kernel: the variance selection and the weights streamed.

The definition is :func:`surgeon.merge.methods.sce.sce`;
tests/test_merge_conformance.py proves this kernel equal to it.

Statistic passes (each over every block of the tensor, in flat order):

- with ``0 < select_topk < 1``: pass 0 counts the entries of non-zero
  variance (which fixes ``k``) and histograms the top 16 bits of every
  variance's float32 bit pattern (non-negative floats order like their
  patterns); pass 1 histograms the low 16 bits inside the bucket that holds
  the k-th largest, which gives its exact value ``t`` and how many entries
  lie below and at it. The selection keeps ``var > t`` and, of the entries
  equal to ``t``, the first ones in flat order (a running quota), as
  :func:`surgeon.merge.select.exact.largest_mask` does on the whole tensor;
- then one pass sums each model's squared selected task vector (float64),
  which gives the weights; the merge pass selects again and mixes. The
  compiled pass 1 also sums the squares above the k-th largest's bucket and,
  inside it, by the low 16 bits: once ``t`` is known that is the weights'
  sum, unless the quota keeps only some of the entries equal to ``t`` (then
  the weights pass runs: :meth:`SceKernel.pass_needed`). That saves the pass
  for float32 inputs; bf16 inputs have few distinct variances and their ties
  at ``t`` are usually split (196 of the 201 tensors of the 1.1B family).

Memory: a few blocks and two histograms of 2^16 counts, whatever the tensor's size.

With numba, every pass takes whole pieces in their stored dtype
(:meth:`SceKernel.observe_raw`, :meth:`SceKernel.merge_raw`:
:mod:`surgeon.merge.kernels.sce_compiled`); the torch block path below is the
fallback and the definition those loops follow.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..arith import elect_sign
from ..tensor import TensorMerge
from . import sce_compiled
from ._raw import based_inputs, raw_view
from .base import Kernel, PieceInputs

_BUCKETS = 1 << 16


def variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Per entry, the population variance of the task vectors across models (float32)."""
    n = len(deltas)
    mean = deltas[0].clone()
    for d in deltas[1:]:
        mean.add_(d)
    mean.div_(n)
    var = torch.zeros_like(mean)
    for d in deltas:
        var.add_((d - mean).square_())
    return var.div_(n)


def sce_weights(sq_sums: list[float], numel: int) -> list[float]:
    """Each model's weight: the mean of its squared (selected) task vector, from
    float64 sums, normalised to sum 1; uniform where that sum is below 1e-6."""
    raw = [s / numel if numel else 0.0 for s in sq_sums]
    total = sum(raw)
    return [1.0 / len(raw)] * len(raw) if abs(total) < 1e-6 else [w / total for w in raw]


def sq_sum(d: torch.Tensor) -> float:
    """``sum d^2`` accumulated in float64."""
    return float(d.square().sum(dtype=torch.float64))


def erase_mix(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``base + sum_i w_i [agree_i] d_i / max(sum_i w_i [agree_i], 1e-6)``, the
    elected sign being that of the summed task vectors (zero: positive)."""
    elected = elect_sign(deltas, "sum", 1.0)
    merged = torch.zeros_like(base)
    wsum = torch.zeros_like(base)
    for d, w in zip(deltas, weights):
        agree = (torch.sign(d) == elected).to(base.dtype)
        merged.add_(d * agree, alpha=w)
        wsum.add_(agree, alpha=w)
    return merged.div_(wsum.clamp_(min=1e-6)).add_(base)


def _bits(var: torch.Tensor) -> torch.Tensor:
    return var.contiguous().reshape(-1).view(torch.int32).to(torch.int64)


class SceKernel(Kernel):
    """SCE block by block: exact variance selection, float64 weight sums, then the merge."""

    def __init__(self, meta: TensorMerge):
        self.meta = meta
        self.n = meta.numel
        topk = float(meta.params["select_topk"])
        self.topk = topk
        self.selects = 0 < topk < 1
        self.stat_passes = 3 if self.selects else 1
        self._weights_pass = self.stat_passes - 1
        # histograms (0.5 MB each) exist only during their pass: the engine makes every
        # tensor's kernel before it merges any
        self._top = torch.zeros(0, dtype=torch.int64)
        self._low = torch.zeros(0, dtype=torch.int64)
        self._nonzero = 0
        self.k = 0                 # entries kept (when selecting)
        self._bucket = 0           # top-16 bucket of the k-th largest
        self._below_bucket = 0     # entries in lower buckets
        self.t: float | None = None  # the k-th largest variance (None: keep all or none, see keep_all)
        self.keep_all = topk >= 1
        self._quota0 = 0           # entries equal to t that are kept (the first in flat order)
        self._quota = 0
        self._sq = [0.0] * len(meta.model_params)
        self.weights: list[float] = []
        self._next = 0
        # the compiled pass 1 sums the squared task vectors above and inside the bucket as well,
        # so the weights pass is needed only where the tie quota splits the entries at t
        self._sq_above: np.ndarray | None = None
        self._sq_low: np.ndarray | None = None

    def _deltas(self, blk: TensorMerge) -> list[torch.Tensor]:
        return [m - blk.base for m in blk.models]

    def _in_order(self, offset: int, numel: int) -> None:
        if offset == 0:
            self._next = 0
            self._quota = self._quota0
        if offset != self._next:
            raise RuntimeError(f"tensor {self.meta.name!r}: sce blocks out of order ({offset} != {self._next})")
        self._next = offset + numel

    def _mask(self, deltas: list[torch.Tensor]) -> torch.Tensor | None:
        """This block's selection (bool; None: keep all), in place of ``variance_mask``."""
        if self.keep_all:
            return None
        var = variance(deltas)
        if self.t is None:  # k == 0 or select_topk <= 0: nothing
            return torch.zeros(var.shape, dtype=torch.bool, device=var.device)
        keep = var > self.t
        if self._quota > 0:
            tied = torch.nonzero(var.reshape(-1) == self.t).squeeze(1)[:self._quota]
            keep.reshape(-1)[tied] = True
            self._quota -= tied.numel()
        return keep

    def _selected(self, blk: TensorMerge) -> list[torch.Tensor]:
        self._in_order(blk.offset, blk.base.numel())
        deltas = self._deltas(blk)
        mask = self._mask(deltas)
        if mask is not None:
            for d in deltas:
                d.mul_(mask)
        return deltas

    def observe(self, pass_no: int, blk: TensorMerge) -> None:
        if pass_no == self._weights_pass:
            for i, d in enumerate(self._selected(blk)):
                self._sq[i] += sq_sum(d)
            return
        if pass_no == 1 and (self.k <= 0 or self.keep_all):
            return  # pass 0 settled it: keep nothing or everything
        var = variance(self._deltas(blk))
        bits = _bits(var)
        if pass_no == 0:
            if blk.offset == 0:
                self._top = torch.zeros(_BUCKETS, dtype=torch.int64)
            self._nonzero += int(torch.count_nonzero(var))
            self._top += torch.bincount(bits >> 16, minlength=_BUCKETS).cpu()
        else:
            if blk.offset == 0:
                self._low = torch.zeros(_BUCKETS, dtype=torch.int64)
            self._sq_above = self._sq_low = None  # the weights pass sums them
            top = bits >> 16
            self._below_bucket += int((top < self._bucket).sum())
            inside = bits[top == self._bucket] & 0xFFFF
            self._low += torch.bincount(inside, minlength=_BUCKETS).cpu()

    def end_pass(self, pass_no: int) -> None:
        if pass_no == self._weights_pass:
            self.weights = sce_weights(self._sq, self.n)
            return
        if pass_no == 0:
            top, self._top = self._top, torch.zeros(0, dtype=torch.int64)
            self.k = int(self._nonzero * self.topk)
            if self.k <= 0:
                return  # keep nothing: t stays None
            if self.k >= self.n:
                self.keep_all = True
                return
            r = self.n - self.k + 1  # the k-th largest is the r-th smallest
            cum = torch.cumsum(top, 0)
            self._bucket = int(torch.searchsorted(cum, torch.tensor(r, dtype=cum.dtype)))
            return
        if self.k <= 0 or self.keep_all:
            return
        r = self.n - self.k + 1 - self._below_bucket  # rank inside the bucket
        cum = torch.cumsum(self._low, 0)
        j = int(torch.searchsorted(cum, torch.tensor(r, dtype=cum.dtype)))
        below = self._below_bucket + (int(cum[j - 1]) if j > 0 else 0)
        equal = int(self._low[j])
        value = torch.tensor([(self._bucket << 16) | j], dtype=torch.int32).view(torch.float32)
        self.t = float(value[0])
        greater = self.n - below - equal
        self._quota0 = self.k - greater
        self._low = torch.zeros(0, dtype=torch.int64)
        above, inside, self._sq_above, self._sq_low = self._sq_above, self._sq_low, None, None
        if above is not None and inside is not None and self._quota0 == equal:  # every entry at t is kept
            self.weights = sce_weights((above + inside[:, j:].sum(axis=1)).tolist(), self.n)

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        return erase_mix(blk.base, self._selected(blk), self.weights)

    # -- the compiled loops, on whole pieces in their stored dtype ------------------------------
    def _raw(self, piece: PieceInputs) -> tuple[np.ndarray, tuple[np.ndarray, ...]] | None:
        return based_inputs(piece.base, piece.models, sce_compiled.available())

    def _selection(self) -> tuple[bool, float]:
        """(keep everything, threshold) for the compiled loops; keeping nothing is ``var > inf``."""
        if self.keep_all:
            return True, 0.0
        return False, (math.inf if self.t is None else self.t)

    def observe_raw(self, pass_no: int, piece: PieceInputs) -> bool:
        raw = self._raw(piece)
        if raw is None:
            return False
        base, models = raw
        if pass_no == self._weights_pass:
            self._in_order(piece.start, piece.numel)
            keep_all, t = self._selection()
            sq = np.zeros(len(models), dtype=np.float64)
            self._quota = sce_compiled.square_sums(base, models, keep_all, t, self._quota, sq)
            for i, v in enumerate(sq.tolist()):
                self._sq[i] += v
            return True
        if pass_no == 1 and (self.k <= 0 or self.keep_all):
            return True
        counts = np.zeros(2, dtype=np.int64)
        if pass_no == 0:
            if piece.start == 0:
                self._top = torch.zeros(_BUCKETS, dtype=torch.int64)
            sce_compiled.histograms(base, models, False, 0, self._top.numpy(), counts)
            self._nonzero += int(counts[0])
        else:
            if piece.start == 0:
                self._low = torch.zeros(_BUCKETS, dtype=torch.int64)
                self._sq_above = np.zeros(len(models), dtype=np.float64)
                self._sq_low = np.zeros((len(models), _BUCKETS), dtype=np.float64)
            if self._sq_above is None or self._sq_low is None:  # pieces of this pass went through torch
                return False
            sce_compiled.histograms(base, models, True, self._bucket, self._low.numpy(), counts,
                                    self._sq_above, self._sq_low)
            self._below_bucket += int(counts[1])
        return True

    def pass_needed(self, pass_no: int) -> bool | None:
        return not (pass_no == self._weights_pass and self.weights)

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        raw, o = self._raw(piece), raw_view(out)
        if raw is None or o is None:
            return None
        self._in_order(piece.start, piece.numel)
        keep_all, t = self._selection()
        finite, self._quota = sce_compiled.erase_mix(raw[0], raw[1], keep_all, t, self._quota,
                                                     np.asarray(self.weights, dtype=np.float32), o)
        return finite
