"""SCE's arithmetic and kernel: the variance selection and the weights streamed.

The definition is :func:`surgeon.merge.methods.sce.sce`;
tests/test_merge_conformance.py proves this kernel equal to it.

Statistic passes (each over every block of the tensor, in flat order), with
``0 < select_topk < 1``. The selection keeps ``var > t``, ``t`` the k-th largest
variance (``k`` = entries of non-zero variance times ``select_topk``), and of the
entries equal to ``t`` the first ones in flat order (a running quota), as
:func:`surgeon.merge.select.exact.largest_mask` does on the whole tensor; the
weights are each model's squared selected task vector summed in float64. Non-negative
floats order like their bit patterns, so counting patterns finds ``t``. Each pass
is a stage, chosen when the one before it closes:

- :data:`WINDOW` (compiled loops, first pass): an evenly spread sample of the
  first piece (2^16 entries) brackets ``t``'s pattern, give or take 3.5 standard
  deviations of the order statistic and of the non-zero share. The pass counts the
  non-zero entries and those above the window, sums the squares above it, and
  gathers each entry inside (~0.4 % of the 1.1B family's tensors) with its
  squares, in flat order. When ``t`` falls inside, that settles ``t``, the quota
  and the weights: one pass (every tensor of the 1.1B family). A miss costs the
  next two stages.
- :data:`TOP16`: histograms the top 16 bits of every pattern, which gives the
  bucket holding ``t``; then a window pass over that bucket (compiled, up to
  :data:`MAX_RECORDS` entries) or
- :data:`LOW`: histograms the low 16 bits inside the bucket, which gives ``t``;
  the compiled loop also sums the squares above the bucket and inside it by the
  low bits, which are the weights unless the quota splits the entries at ``t``;
- :data:`WEIGHTS`: sums the squares of the selection, where nothing before did.

Through torch (no numba): :data:`TOP16`, :data:`LOW`, :data:`WEIGHTS`. Then the
merge pass selects again and mixes.

Memory: a few blocks, two histograms of 2^16 counts, and a window's entries
(at most :data:`MAX_RECORDS`), whatever the tensor's size.

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
from ..select.stream import SAMPLE, Z, order_statistics, rank_in_window, sample_stride
from ..tensor import TensorMerge
from . import sce_compiled
from ._raw import based_inputs, raw_view
from .base import Kernel, PieceInputs

_BUCKETS = 1 << 16
#: the stages of SCE's statistic passes (:class:`SceKernel`)
WINDOW, TOP16, LOW, WEIGHTS = "window", "top16", "low", "weights"
#: most entries a window pass gathers (a pattern and each model's square apiece: 32 MB for three models)
MAX_RECORDS = 1 << 21


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
    """SCE block by block: exact variance selection, float64 weight sums, then the merge.

    The statistic passes are stages (:data:`WINDOW`, :data:`TOP16`, :data:`LOW`, :data:`WEIGHTS`),
    each chosen when the one before it closes: see the module docstring."""

    def __init__(self, meta: TensorMerge):
        self.meta = meta
        self.n = meta.numel
        shape = tuple(meta.shape)
        self.row = meta.numel // shape[0] if len(shape) > 1 and shape[0] else meta.numel
        topk = float(meta.params["select_topk"])
        self.topk = topk
        self.selects = 0 < topk < 1
        # at most: a sampled window that misses, the top-16 pass, the bucket's pass, the weights
        self.stat_passes = 4 if self.selects else 1
        self._stage: str | None = TOP16 if self.selects else WEIGHTS  # the open or next pass's work; None: settled
        self._ended = 0
        self._compiled = False     # whether the open pass took whole pieces through the compiled loops
        # histograms (0.5 MB each) exist only during their pass: the engine makes every
        # tensor's kernel before it merges any
        self._top = torch.zeros(0, dtype=torch.int64)
        self._low = torch.zeros(0, dtype=torch.int64)
        self._nonzero = 0
        self.k = 0                 # entries kept (when selecting)
        self._bucket = 0           # top-16 bucket of the k-th largest
        self._bucket_count = 0     # entries in it
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
        # a window pass: its patterns [lo, lo + span], the entries it may keep, and what it gathers
        self._window: tuple[int, int, int] | None = None
        self._wcounts = np.zeros(3, dtype=np.int64)
        self._sq_above_w = np.zeros(0, dtype=np.float64)
        self._rec_bits = np.zeros(0, dtype=np.uint32)
        self._rec_sq = np.zeros((0, 0), dtype=np.float32)
        self.misses = 0            # sampled windows that missed (statistics for tests and docs)

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

    # -- the stages -------------------------------------------------------------------------------
    def pass_needed(self, pass_no: int) -> bool | None:
        if self._stage is None or pass_no < self._ended:
            return False
        return True if pass_no == self._ended else None

    def _start(self, pass_no: int, first: bool, compiled: bool) -> str:
        """The open pass's stage, checked against ``pass_no``; resets its sums on its first piece or block."""
        if self._stage is None or pass_no != self._ended:
            raise RuntimeError(f"tensor {self.meta.name!r}: sce statistic pass {pass_no} is not the open one "
                               f"({self._ended}, {self._stage})")
        if first:
            self._compiled = compiled
            if self._stage in (WINDOW, TOP16):
                self._nonzero = 0
        elif compiled != self._compiled:  # pragma: no cover - device and numba are fixed per run
            raise RuntimeError("an sce statistic pass mixed compiled and torch loops")
        return self._stage

    def observe(self, pass_no: int, blk: TensorMerge) -> None:
        stage = self._start(pass_no, blk.offset == 0, False)
        if stage == WEIGHTS:
            for i, d in enumerate(self._selected(blk)):
                self._sq[i] += sq_sum(d)
            return
        if stage == WINDOW:  # pragma: no cover - windows are chosen for compiled pieces only
            raise RuntimeError(f"tensor {self.meta.name!r}: an sce window pass got float32 blocks")
        var = variance(self._deltas(blk))
        bits = _bits(var)
        if stage == TOP16:
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
        stage = self._stage
        self._ended += 1
        if stage == WEIGHTS:
            self.weights = sce_weights(self._sq, self.n)
            self._stage = None
        elif stage == WINDOW:
            self._stage = self._end_window()
        elif stage == TOP16:
            self._stage = self._end_top16()
        elif stage == LOW:
            self._stage = self._end_low()

    def _settle(self, t_bits: int | None, quota0: int = 0, sq: list[float] | None = None) -> str | None:
        """Fix the selection (``t_bits`` None: keep nothing) and, when ``sq`` is given, the weights:
        the next stage (None: settled, or :data:`WEIGHTS`)."""
        if t_bits is not None:
            self.t = float(np.array([t_bits], dtype=np.uint32).view(np.float32)[0])
            self._quota0 = quota0
        if t_bits is None:  # nothing is selected: every weight's sum is 0
            sq = [0.0] * len(self._sq)
        if sq is None:
            return WEIGHTS
        self.weights = sce_weights(sq, self.n)
        return None

    def _end_window(self) -> str | None:
        """Close a window pass: settled when the k-th largest fell inside the window
        (:meth:`_bracket`), else the top-16 pass runs next."""
        lo, span, cap = self._window if self._window is not None else (0, 0, 0)
        nonzero, above, inside = (int(x) for x in self._wcounts)
        bits, sq = self._rec_bits[:inside], self._rec_sq[:, :inside]
        self._window, self._rec_bits, self._rec_sq = None, np.zeros(0, np.uint32), np.zeros((0, 0), np.float32)
        from_top = span == _BUCKETS - 1  # a top-16 bucket's window: it must hold the k-th largest
        if not from_top:
            self.k = int(nonzero * self.topk)
        if self.k <= 0:
            return self._settle(None)
        if inside <= cap and above < self.k <= above + inside:
            r = self.k - above  # the k-th largest is the r-th largest inside the window
            t_bits = rank_in_window(bits, inside - r + 1, lo, span + 1)[0]  # the window holds every pattern
            greater = bits > t_bits
            tied = np.flatnonzero(bits == t_bits)[:self.k - above - int(greater.sum())]
            sums = self._sq_above_w + sq[:, greater].sum(axis=1, dtype=np.float64) \
                + sq[:, tied].sum(axis=1, dtype=np.float64)
            return self._settle(t_bits, len(tied), sums.tolist())
        if from_top:
            raise RuntimeError(f"tensor {self.meta.name!r}: sce statistic passes saw different data")
        self.misses += 1
        return TOP16

    def _end_top16(self) -> str | None:
        """Close the top-16 pass: the bucket of the k-th largest is known; its entries are
        gathered next (a window pass) when the compiled loops run and they are few enough,
        else histogrammed by their low 16 bits (:data:`LOW`)."""
        top, self._top = self._top, torch.zeros(0, dtype=torch.int64)
        self.k = int(self._nonzero * self.topk)
        if self.k <= 0:
            return self._settle(None)
        if self.k >= self.n:
            self.keep_all = True
            return WEIGHTS
        r = self.n - self.k + 1  # the k-th largest is the r-th smallest
        cum = torch.cumsum(top, 0)
        self._bucket = int(torch.searchsorted(cum, torch.tensor(r, dtype=cum.dtype)))
        self._bucket_count = int(top[self._bucket])
        if self._compiled and self._bucket_count <= MAX_RECORDS:
            self._window = (self._bucket << 16, _BUCKETS - 1, self._bucket_count)
            return WINDOW
        return LOW

    def _end_low(self) -> str | None:
        """Close the low-16 pass: ``t`` exactly; the weights too unless the tie quota splits the entries at it."""
        r = self.n - self.k + 1 - self._below_bucket  # rank inside the bucket
        cum = torch.cumsum(self._low, 0)
        j = int(torch.searchsorted(cum, torch.tensor(r, dtype=cum.dtype)))
        below = self._below_bucket + (int(cum[j - 1]) if j > 0 else 0)
        equal = int(self._low[j])
        greater = self.n - below - equal
        self._low = torch.zeros(0, dtype=torch.int64)
        above, inside, self._sq_above, self._sq_low = self._sq_above, self._sq_low, None, None
        sq = None
        if above is not None and inside is not None and self.k - greater == equal:  # every entry at t is kept
            sq = (above + inside[:, j:].sum(axis=1)).tolist()
        return self._settle((self._bucket << 16) | j, self.k - greater, sq)

    def _bracket(self, piece: PieceInputs) -> None:
        """Choose a window of variance patterns that holds the k-th largest, from an evenly
        spread sample of this first piece (:data:`surgeon.merge.select.stream.SAMPLE` entries): the
        first pass is then a window pass, which usually settles the selection and the weights.
        No window when the sample cannot bound it or the window would hold too many entries."""
        stride = sample_stride(piece.numel, self.row)

        def strided(t: torch.Tensor) -> torch.Tensor:  # a strided view: no index tensor, no gather
            return t.reshape(-1)[stride // 2::stride][:SAMPLE].to(torch.float32)

        if piece.base is None:
            return
        b = strided(piece.base)
        pattern = variance([strided(m_) - b for m_ in piece.models]).numpy().view(np.uint32)
        m = pattern.shape[0]
        if m == 0:
            return
        p_nz = float(np.count_nonzero(pattern & np.uint32(0x7FFFFFFF))) / m
        # the k-th largest is the r-th smallest, r = n - k + 1, k ~ nonzero * topk: its place in the
        # sample, give or take Z standard deviations of the order statistic and of the nonzero share
        p = min(1.0, max(0.0, 1.0 - p_nz * self.topk + 0.5 / self.n))
        spread = Z * (math.sqrt(m * p * (1 - p)) + self.topk * math.sqrt(m * p_nz * (1 - p_nz))) + 2
        lo_i, hi_i = math.floor(p * m - spread), math.ceil(p * m + spread)
        at = order_statistics(pattern, [i for i in (lo_i, hi_i) if 0 <= i < m])
        lo = max(1, at[lo_i]) if lo_i >= 0 else 1  # k <= nonzero entries: the k-th largest is not 0
        hi = at[hi_i] if hi_i < m else 0xFFFFFFFF
        if hi < lo:
            return
        share = float(((pattern >= lo) & (pattern <= hi)).sum()) / m
        cap = min(self.n, int(1.5 * share * self.n) + 4096)
        if cap > MAX_RECORDS:
            return
        self._window = (lo, hi - lo, cap)
        self._stage = WINDOW

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
        first = piece.start == 0
        if raw is not None and first and pass_no == 0 and self._stage == TOP16:
            self._bracket(piece)
        if raw is None:
            return False
        base, models = raw
        stage = self._start(pass_no, first, True)
        if stage == WEIGHTS:
            self._in_order(piece.start, piece.numel)
            keep_all, t = self._selection()
            sq = np.zeros(len(models), dtype=np.float64)
            self._quota = sce_compiled.square_sums(base, models, keep_all, t, self._quota, sq)
            for i, v in enumerate(sq.tolist()):
                self._sq[i] += v
            return True
        if stage == WINDOW:
            if self._window is None:  # pragma: no cover - set with the stage
                raise RuntimeError(f"tensor {self.meta.name!r}: an sce window pass without a window")
            lo, span, cap = self._window
            if first:
                self._wcounts = np.zeros(3, dtype=np.int64)
                self._sq_above_w = np.zeros(len(models), dtype=np.float64)
                self._rec_bits = np.empty(cap + 1, dtype=np.uint32)
                self._rec_sq = np.empty((len(models), cap + 1), dtype=np.float32)
            sce_compiled.window_pass(base, models, lo, span, self._wcounts, self._sq_above_w,
                                     self._rec_bits, self._rec_sq)
            return True
        counts = np.zeros(2, dtype=np.int64)
        if stage == TOP16:
            if first:
                self._top = torch.zeros(_BUCKETS, dtype=torch.int64)
            sce_compiled.histograms(base, models, False, 0, self._top.numpy(), counts)
            self._nonzero += int(counts[0])
        else:
            if first:
                self._low = torch.zeros(_BUCKETS, dtype=torch.int64)
                self._sq_above = np.zeros(len(models), dtype=np.float64)
                self._sq_low = np.zeros((len(models), _BUCKETS), dtype=np.float64)
            if self._sq_above is None or self._sq_low is None:  # pieces of this pass went through torch
                return False
            sce_compiled.histograms(base, models, True, self._bucket, self._low.numpy(), counts,
                                    self._sq_above, self._sq_low)
            self._below_bucket += int(counts[1])
        return True

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        return erase_mix(blk.base, self._selected(blk), self.weights)

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        raw, o = self._raw(piece), raw_view(out)
        if raw is None or o is None:
            return None
        self._in_order(piece.start, piece.numel)
        keep_all, t = self._selection()
        finite, self._quota = sce_compiled.erase_mix(raw[0], raw[1], keep_all, t, self._quota,
                                                     np.asarray(self.weights, dtype=np.float32), o)
        return finite
