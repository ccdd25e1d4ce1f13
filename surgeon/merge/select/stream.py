"""Exact order statistics of a tensor streamed in pieces: usually one counting pass.

Kernels (:mod:`surgeon.merge.kernels`) that trim by magnitude need, per
model, the exact k-th smallest ``|delta|`` of the whole tensor and how ties at
that value are split, without sorting and without holding the tensor. For
non-negative float32 values the IEEE-754 bit patterns order like the values,
so counting patterns finds it:

- pass 0, *sampled window*: before the pass, an evenly spread sample of the
  tensor's ``|delta|`` (2^16 entries) brackets the k-th smallest by the
  sample's order statistics ``k/n * m -+ 3.5`` standard deviations; the pass
  counts the entries below the bracket and keeps the bit patterns inside it
  (then partitioned; a narrow bracket, or one that holds too many entries to
  keep, is histogrammed instead: at most 2^18 patterns). When the k-th
  smallest falls inside — always, unless the sample misrepresents the
  tensor — it is exact after this one pass.
- otherwise (a miss, or a bracket too wide for either): a pass counting the
  top 16 bits of every value finds the bucket that holds it, and a pass over
  that bucket's 2^16 patterns finds the value: the two-pass method this
  module used before (at most three passes in all).

Why the sample. Counting every value's top bits costs a scatter per entry
that cannot vectorise, and the second pass re-reads every input: the
bracket's pass counts "below" with a vectorised compare and scatters only the
few per cent of entries inside it (on the development CPU, one pass instead
of two cut TIES' selection by more than half; ``docs/merging.md``). The
result is exact whatever the sample: a bad sample only costs passes.

The counting loop is compiled for CPU (:mod:`surgeon.merge.select.counting`, reading bf16
inputs directly) and torch ops elsewhere. The same "stable order"
convention as :mod:`surgeon.merge.select.exact` settles ties: among equal values,
lower flat index first. :class:`RankCut` turns a selection into per-block
masks with a running quota of tied entries, so blocks must come in flat order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..kernels._raw import raw_inputs
from ..kernels.base import Kernel, PieceInputs
from ..tensor import TensorMerge
from .counting import (
    COLLECT,
    TOP16,
    TOP_BINS,
    WINDOW,
    compiled_counts_available,
    count_deltas_compiled,
    count_deltas_torch,
    select_patterns_compiled,
    window_rank_compiled,
)

_LO = 1 << 16        # patterns of one top-16 bucket
#: sampled entries per tensor (evenly spread) that bracket the k-th smallest
SAMPLE = 1 << 16
#: half-width of the bracket, in standard deviations of the sample's order
#: statistic (a miss, ~5e-4 for a random sample and less for an evenly
#: spread one, costs two more passes)
Z = 3.5
#: widest bracket, in bit patterns, that the first pass histograms
MAX_WINDOW = 1 << 18
#: brackets up to this wide are histogrammed rather than kept: the histogram
#: stays in the core's cache (a wide one took a cache miss per entry counted:
#: ~40 % of TIES' selection pass on bf16 fine-tunes, whose deltas fall on few
#: distinct values spread over ~10^5 patterns)
SMALL_WINDOW = 1 << 12
#: most entries of a wider bracket that the first pass keeps (per series; 16 MB)
MAX_KEPT = 1 << 22
_DONE = -1


@dataclass
class Selected:
    """The k-th smallest (1-based) value ``value``; ``below`` entries are
    smaller, ``equal`` entries equal to it."""

    value: float
    below: int
    equal: int


@dataclass
class _Counts:
    """One pass's accumulators for the series still open."""

    series: list[object]
    kind: list[int]
    lo: list[int]
    width: list[int]
    below: torch.Tensor
    top: torch.Tensor
    fine: torch.Tensor
    inside: torch.Tensor
    kept: torch.Tensor                                   # the compiled loop's COLLECT buffers (int32 bits)
    kept_parts: list[list[torch.Tensor]] = field(default_factory=list)  # the torch path's
    compiled: bool | None = None


def pattern_value(bits: int) -> float:
    """The float32 whose bit pattern is ``bits``."""
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def order_statistics(patterns: np.ndarray, ranks: list[int]) -> dict[int, int]:
    """The values at ``ranks`` (0-based, each in range) of the uint32 ``patterns`` sorted
    ascending. With numba by a radix select (:func:`select_patterns_compiled`: ~0.2 ms for
    two ranks of a 2^16 sample of a 1.1B model's deltas on the development VM), else by one
    partition at all the ranks (numpy's uint32 partition is vectorised: ~0.45 ms there,
    against ~0.7 ms for one partition per rank and 1.3 ms for a sort; 0.2-0.35 CPU-s of a
    1.1B TIES or breadcrumbs merge). For the samples this serves, whose values spread over
    thousands of patterns; a few distinct values repeated throughout is
    :func:`rank_in_window`'s case. ``patterns`` is not changed."""
    wanted = sorted(set(ranks))
    if not wanted:
        return {}
    if compiled_counts_available():
        return dict(zip(wanted, select_patterns_compiled(patterns, wanted)))
    part = np.partition(patterns, wanted)
    return {r: int(part[r]) for r in wanted}


#: widest range of patterns :func:`rank_in_window` counts in a histogram (8 MiB of int64 counts)
HISTOGRAM_WIDTH = 1 << 20


def rank_in_window(patterns: np.ndarray, rank: int, lo: int, width: int) -> tuple[int, int, int]:
    """The ``rank``-th smallest (1-based, in range) of the uint32 ``patterns``, all in
    ``[lo, lo + width)``: ``(pattern, entries below it, entries equal to it)``.

    By a histogram of the window (``width`` up to :data:`HISTOGRAM_WIDTH`; compiled, in reused
    memory, where numba is: a fresh one took ~1 ms a call, 0.7 CPU-s of a 1.1B TIES merge), else a sort;
    never ``np.partition``, whose introselect fell back to a slow sort on the entries a
    selection pass keeps from bf16 fine-tunes (165,000 entries of ~150 distinct values:
    15 ms against 0.5 ms for the histogram; 1.3 of a 1.1B TIES merge's 14 CPU-s). A window of
    one pattern is answered without reading ``patterns`` (every one is ``lo``): a one-pass
    merge's tie brackets, whose entries it counts rather than lists, pass a stand-in of the
    right length (``np.broadcast_to``)."""
    if width == 1:
        return lo, 0, int(patterns.shape[0])
    if width <= HISTOGRAM_WIDTH and compiled_counts_available():
        return window_rank_compiled(patterns, rank, lo, width)
    if width <= HISTOGRAM_WIDTH:
        counts = np.bincount(patterns - np.uint32(lo), minlength=width)
        cum = np.cumsum(counts)
        j = int(np.searchsorted(cum, rank))  # the first pattern with `rank` entries at or below it
        return lo + j, int(cum[j] - counts[j]), int(counts[j])
    ordered = np.sort(patterns)
    v = ordered[rank - 1]
    below = int(np.searchsorted(ordered, v, "left"))
    return int(v), below, int(np.searchsorted(ordered, v, "right")) - below


def sample_stride(numel: int, row: int, size: int = SAMPLE) -> int:
    """The step of an evenly spread sample of ``size`` entries out of
    ``numel`` (1: take everything), coprime to the row length so that the
    sample visits every column, not a few."""
    stride = max(1, numel // size)
    while stride > 1 and math.gcd(stride, max(1, row)) != 1:
        stride -= 1
    return stride


class StreamSelector:
    """k-th smallest (1-based, ``1 <= k <= n``) of ``|models[i] - base|`` for each series.

    ``ks`` maps each series to its k; ``model_of`` maps it to the model whose
    deltas it ranks (default: the series itself is the model index). Before
    the first pass, :meth:`sample` (optional) brackets each series; then
    ``observe(pass_no, base, models)`` sees every piece or block of the pass
    in any dtype, and ``end_pass(pass_no)`` closes it, while
    :meth:`pass_needed` says so. Then :attr:`result` maps series to :class:`Selected`.
    """

    passes = 3

    def __init__(self, ks: dict[object, int], n: int, model_of: dict[object, int] | None = None):
        self.ks, self.n = dict(ks), n
        self.model_of = dict(model_of) if model_of is not None else {s: int(s) for s in ks}  # type: ignore[call-overload]
        self._kind: dict[object, int] = {s: TOP16 for s in self.ks}
        self._lo: dict[object, int] = {}
        self._width: dict[object, int] = {}
        self._cap: dict[object, int] = {}     # COLLECT: entries the compiled loop keeps
        self._from_top: set[object] = set()   # windows that are a top-16 bucket: they must hold the k-th
        self._share: dict[object, float] = {}  # the sampled share of entries inside each bracket
        self._below_share: dict[object, float] = {}  # ... and below it
        self._counts: _Counts | None = None
        self._ended = 0                       # passes closed so far
        self.sampled = False
        self.misses = 0                       # sampled brackets that missed (statistics for tests and docs)
        self.result: dict[object, Selected] = {}

    @property
    def done(self) -> bool:
        return len(self.result) == len(self.ks)

    def pass_needed(self, pass_no: int) -> bool | None:
        """Whether statistic pass ``pass_no`` must run: None while it cannot
        be known yet (the previous pass is still open)."""
        if self.done or pass_no < self._ended:
            return False
        return True if pass_no == self._ended else None

    # -- the sampled bracket ----------------------------------------------------
    def sample(self, base: torch.Tensor, models: list[torch.Tensor], row: int) -> None:
        """Bracket each series' k-th smallest from an evenly spread sample of
        these inputs (flat, any dtype and device): the tensor, or its first
        piece. Only before the first pass; later calls are ignored."""
        if self.sampled or self._ended or self._counts is not None:
            return
        self.sampled = True
        stride = sample_stride(base.numel(), row)

        def strided(t: torch.Tensor) -> torch.Tensor:  # a strided view: no index tensor, no gather
            return t.reshape(-1)[stride // 2::stride][:SAMPLE].to(torch.float32)

        b = strided(base)
        seen: dict[int, np.ndarray] = {}
        for s, k in self.ks.items():
            i = self.model_of[s]
            if i not in seen:
                seen[i] = (strided(models[i]) - b).abs_().cpu().numpy()
            self._bracket(s, k, seen[i])

    def _bracket(self, series: object, k: int, values: np.ndarray) -> None:
        m = values.shape[0]
        if m == 0:
            return
        if m == self.n:  # the whole tensor: its k-th smallest itself
            lo_i = hi_i = k - 1
        else:
            p = (k - 0.5) / self.n
            spread = Z * math.sqrt(m * p * (1 - p)) + 2
            lo_i, hi_i = math.floor(p * m - spread), math.ceil(p * m + spread)
        if hi_i >= m:
            return  # the k-th smallest may lie above every sampled value
        at = order_statistics(values.view(np.uint32), [hi_i] if lo_i < 0 else [lo_i, hi_i])  # |d| >= 0: patterns order alike
        lo_bits = 0 if lo_i < 0 else at[lo_i]
        hi_bits = at[hi_i]
        width = hi_bits - lo_bits + 1
        kind = WINDOW
        vb = values.view(np.uint32)
        share = self._share[series] = float(((vb >= lo_bits) & (vb <= hi_bits)).sum()) / m
        self._below_share[series] = float((vb < lo_bits).sum()) / m
        if width > SMALL_WINDOW:  # keep the entries inside if they are few enough, else histogram them
            cap = min(self.n, int(1.5 * share * self.n) + 4096)
            if cap <= MAX_KEPT:
                kind = COLLECT
                self._cap[series] = cap
            elif width > MAX_WINDOW:
                return  # count top bits instead
        self._kind[series] = kind
        self._lo[series], self._width[series] = lo_bits, width

    def bracket(self, series: object) -> tuple[int, int, float] | None:
        """The sampled bracket of ``series`` before the first pass: (lowest bit pattern,
        width in patterns, sampled share of entries inside), or None without one."""
        if self._ended or self._kind[series] not in (WINDOW, COLLECT) or series not in self._share:
            return None
        return self._lo[series], self._width[series], self._share[series]

    def sampled_below(self, series: object) -> float:
        """The sampled share of entries below :meth:`bracket` (call when it is not None)."""
        return self._below_share[series]

    def settle(self, below: dict[object, int], inside: dict[object, np.ndarray]) -> bool:
        """Close the first pass from counts made outside it (a merge that counted around the
        brackets while it merged: :class:`surgeon.merge.kernels.one_pass.OnePassSelection`):
        per series, the entries below its :meth:`bracket` and the bit patterns (uint32) of
        those inside it. True when every k-th smallest lies inside its bracket (:attr:`result`
        then holds them all); False changes nothing (count with passes instead)."""
        if self._ended or self._counts is not None:
            raise RuntimeError("settle() closes the first pass, which is already under way")
        result = {}
        for s, k in self.ks.items():
            rank, kept = k - below[s], inside[s]
            if self.bracket(s) is None or not 1 <= rank <= kept.shape[0]:
                return False
            v, under, equal = rank_in_window(kept, rank, self._lo[s], self._width[s])
            result[s] = Selected(pattern_value(v), below[s] + under, equal)
        self.result.update(result)
        for s in result:
            self._kind[s] = _DONE
        self._ended = 1
        return True

    # -- counting ---------------------------------------------------------------
    def _counts_for(self, device: torch.device) -> _Counts:
        c = self._counts
        if c is None:
            series = [s for s in self.ks if self._kind[s] != _DONE]
            kind = [self._kind[s] for s in series]
            lo = [self._lo.get(s, 0) if kd != TOP16 else 0 for s, kd in zip(series, kind)]
            width = [self._width.get(s, 0) if kd != TOP16 else 0 for s, kd in zip(series, kind)]
            ns = len(series)
            fine_width = max((w for w, kd in zip(width, kind) if kd == WINDOW), default=0)
            cap = max((self._cap[s] for s, kd in zip(series, kind) if kd == COLLECT), default=0)
            c = self._counts = _Counts(
                series, kind, lo, width,
                below=torch.zeros(ns, dtype=torch.int64, device=device),
                top=torch.zeros((ns, TOP_BINS if TOP16 in kind else 0), dtype=torch.int64, device=device),
                fine=torch.zeros((ns, fine_width), dtype=torch.int32 if self.n < 2**31 else torch.int64, device=device),
                inside=torch.zeros(ns, dtype=torch.int64, device=device),
                kept=torch.empty((ns, cap + 1), dtype=torch.int32),  # + the compiled loop's spare slot
                kept_parts=[[] for _ in series])
        return c

    def observe(self, pass_no: int, base: torch.Tensor, models: list[torch.Tensor]) -> None:
        """Count one piece or block (flat, the same range of every input)."""
        if pass_no != self._ended:
            raise RuntimeError(f"selection pass {pass_no} observed while pass {self._ended} is open")
        c = self._counts_for(base.device)
        if not c.series:
            return
        sel = [self.model_of[s] for s in c.series]
        raw = raw_inputs(base, list(models)) if base.device.type == "cpu" and compiled_counts_available() else None
        compiled = raw is not None and raw[0] is not None
        if c.compiled is not None and c.compiled != compiled:  # pragma: no cover - device and numba are fixed per run
            raise RuntimeError("a selection pass mixed compiled and torch counting")
        c.compiled = compiled
        if compiled:
            count_deltas_compiled(raw[0], raw[1], np.array(sel, dtype=np.int64),  # type: ignore[index]
                                  np.array(c.kind, dtype=np.int8), np.array(c.lo, dtype=np.uint32),
                                  np.array(c.width, dtype=np.uint32), c.below.numpy(), c.top.numpy(), c.fine.numpy(),
                                  c.inside.numpy(), c.kept.numpy().view(np.uint32))
        else:
            count_deltas_torch(base, list(models), sel, c.kind, c.lo, c.width, c.below, c.top, c.fine, c.inside,
                               c.kept_parts)

    def _kept(self, c: _Counts, t: int) -> np.ndarray | None:
        """A COLLECT series' kept patterns (uint32), or None when they overflowed."""
        total = int(c.inside[t])
        if total > c.kept.shape[1] - 1:  # more than the sample promised: as the compiled loop, treat as a miss
            return None
        if c.compiled:
            return c.kept[t, :total].numpy().view(np.uint32)
        parts = c.kept_parts[t]
        return torch.cat(parts).cpu().numpy().astype(np.uint32) if parts else np.zeros(0, dtype=np.uint32)

    def end_pass(self, pass_no: int) -> None:
        if pass_no != self._ended:
            raise RuntimeError(f"selection pass {pass_no} closed while pass {self._ended} is open")
        self._ended += 1
        c = self._counts if self._counts is not None else self._counts_for(torch.device("cpu"))
        self._counts = None
        below_all = c.below.cpu()
        for t, s in enumerate(c.series):
            k = self.ks[s]
            if c.kind[t] == TOP16:
                cum = torch.cumsum(c.top[t].cpu(), 0)
                b = int(torch.searchsorted(cum, torch.tensor(k, dtype=cum.dtype)))
                if b >= TOP_BINS:
                    raise RuntimeError(f"order statistic {k} out of range (saw {int(cum[-1])} values)")
                self._kind[s], self._lo[s], self._width[s] = WINDOW, b << 16, _LO
                self._from_top.add(s)
                continue
            below = int(below_all[t])
            rank = k - below
            if c.kind[t] == WINDOW:
                fine = c.fine[t, :c.width[t]].cpu().to(torch.int64)
                cum = torch.cumsum(fine, 0)
                if 1 <= rank <= (int(cum[-1]) if cum.numel() else 0):
                    j = int(torch.searchsorted(cum, torch.tensor(rank, dtype=cum.dtype)))
                    self.result[s] = Selected(pattern_value(c.lo[t] + j), below + (int(cum[j - 1]) if j > 0 else 0),
                                              int(fine[j]))
                    self._kind[s] = _DONE
                    continue
            else:
                kept = self._kept(c, t)
                if kept is not None and 1 <= rank <= kept.shape[0]:
                    v, under, equal = rank_in_window(kept, rank, c.lo[t], c.width[t])
                    self.result[s] = Selected(pattern_value(v), below + under, equal)
                    self._kind[s] = _DONE
                    continue
            if s in self._from_top:
                raise RuntimeError("selection passes saw different data")
            self.misses += 1  # the sampled bracket missed (or overflowed): count top bits next
            self._kind[s] = TOP16


class SelectionPasses(Kernel):
    """Base of kernels whose statistic passes are a :class:`StreamSelector`'s
    (``self.selector``; ``self.row``: the tensor's row length, for the sample).

    The engine offers each piece first to ``observe_raw``: the first piece of
    pass 0 is sampled to bracket the selections, and on CPU with the compiled
    loop the whole piece is counted from its stored dtype; otherwise the
    engine falls back to float32 blocks through ``observe``."""

    selector: StreamSelector
    row: int

    def pass_needed(self, pass_no: int) -> bool | None:
        return self.selector.pass_needed(pass_no)

    def observe_raw(self, pass_no: int, piece: PieceInputs) -> bool:
        if pass_no == 0 and piece.start == 0:
            self.selector.sample(piece.base, piece.models, self.row)
        if piece.models[0].device.type == "cpu":
            raw = raw_inputs(piece.base, piece.models) if compiled_counts_available() else None
            if raw is None or raw[0] is None:
                return False  # torch ops on a whole piece would need piece-sized temporaries: go block by block
        self.selector.observe(pass_no, piece.base, piece.models)
        return True

    def observe(self, pass_no: int, blk: TensorMerge) -> None:
        self.selector.observe(pass_no, blk.base, blk.models)


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
