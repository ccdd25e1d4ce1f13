"""TIES' kernel: the exact per-tensor trim streamed, then the compiled (or torch) merge.

The definition is :func:`surgeon.merge.methods.ties.ties`; this kernel is
proven equal to it by tests/test_merge_conformance.py.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..arith import consensus_mix
from ..select.stream import SelectionPasses, StreamSelector, next_float, pattern_value
from ..tensor import TensorMerge
from . import ties_compiled
from ._raw import based_inputs, raw_view
from .base import PieceInputs


def resolve_zero_sign(params: dict[str, Any]) -> str:
    z = params.get("zero_sign", "auto")
    if z == "auto":
        return "majority" if params.get("trim_scope", "tensor") == "model" else "positive"
    return z


#: most of a tensor (the sampled share, summed over the models) that the one-pass merge's
#: brackets may hold; past it the selection is counted in a pass of its own
ONE_PASS_SHARE = 0.25


def _all_finite(raw: np.ndarray) -> bool:
    """Whether every stored value (float32, or bf16 bits as uint16) is finite."""
    if raw.dtype == np.uint16:
        return bool(((raw & np.uint16(0x7F80)) != np.uint16(0x7F80)).all())
    return bool(np.isfinite(raw).all())


def _below(x: float) -> float:
    """The largest float32 below ``x`` (>= 0): ``hardshrink(d, _below(t))`` keeps ``|d| >= t``."""
    return next_float(x, 0.0)


class TiesKernel(SelectionPasses):
    """TIES, block by block, with the same trim as :func:`surgeon.merge.methods.ties.magnitude_trim`.

    Tensor scope: each trimmed model's exact k-th largest ``|delta|`` comes
    from counting passes over the tensor (one, unless a sampled bracket
    misses: :class:`surgeon.merge.select.stream.StreamSelector`), without
    sorting or holding the tensor. The merge pass keeps ``|delta| > t`` (``hardshrink``)
    and, of the entries equal to ``t``, the first ``k - #(> t)`` in flat order
    (a running quota; blocks come in flat order) — exactly mergekit's k
    entries, ties to the lowest indices. Model scope: thresholds come from the
    whole-model pre-pass and every ``|delta| >= t`` is kept (the reference's
    rule); no passes.

    A tensor that comes in one piece on CPU is merged in one pass over its inputs
    (:meth:`_one_pass_merge`): the sampled brackets decide every entry outside them, the
    merge counts around them, and the entries inside are merged again once the selection
    is exact. Measured on the 1.1B family: 1.1 CPU-s and ~0.5 s of wall less for a TIES
    merge of three models (docs/merging.md).
    """

    def __init__(self, meta: TensorMerge):
        p = meta.params
        self.meta = meta
        self.weights = [float(mp["weight"]) for mp in meta.model_params]
        self.consensus = p["consensus"]
        self.normalize = p["normalize"] and p["mixing"] == "mean"
        self.lam = float(p["lambda"])
        n = meta.numel
        self.keep_ge: list[float | None] = []   # keep |d| >= value (None: keep all)
        self.ks: list[int | None] = []           # tensor scope: entries to keep (None: all, 0: none)
        if p["trim_scope"] == "model":
            st = meta.state
            self.keep_ge = [None if thr is None else float(thr) for thr in st["thresholds"]]
            self.ks = [None] * len(self.keep_ge)
            self.zero_sign = float(st.get("zero_sign", 1.0)) if resolve_zero_sign(p) == "majority" else 1.0
        else:
            for mp in meta.model_params:
                d = float(mp["density"])
                self.ks.append(None if d >= 1 else (0 if d <= 0 or n == 0 else max(1, int(d * n))))
            self.keep_ge = [None] * len(self.ks)
            self.zero_sign = 1.0
        # the k-th largest is the (n - k + 1)-th smallest
        self.selector = StreamSelector({i: n - k + 1 for i, k in enumerate(self.ks) if k}, n)
        self.stat_passes = StreamSelector.passes if self.selector.ks else 0
        self.row = n // meta.shape[0] if meta.shape and meta.shape[0] else 1
        self._thr: dict[int, float] = {}
        self._quota: dict[int, int] = {}       # tied entries still to keep (partial ties)
        self._next = 0
        self._fused = meta.device.type == "cpu" and ties_compiled.available()
        self._fused_args: ties_compiled.BlockArgs | None = None
        self._one_pass = False  # the tensor is one piece: its selection is counted by the merge

    # -- statistic passes (observe, observe_raw, pass_needed: SelectionPasses) --
    def pass_needed(self, pass_no: int) -> bool | None:
        if self._one_pass:
            return False  # counted by the merge itself
        return super().pass_needed(pass_no)

    def observe_raw(self, pass_no: int, piece: PieceInputs) -> bool:
        if pass_no == 0 and piece.start == 0 and piece.numel == self.meta.numel and self._fused:
            # the whole tensor in one piece: count around the sampled brackets while merging it
            self.selector.sample(piece.base, piece.models, self.row)
            self._one_pass = self._brackets() is not None and based_inputs(piece.base, piece.models, True) is not None
            if self._one_pass:
                return True
        return super().observe_raw(pass_no, piece)

    def end_pass(self, pass_no: int) -> None:
        if self._one_pass:
            return
        self.selector.end_pass(pass_no)
        if self.selector.done:
            self._settle_thresholds()

    def _settle_thresholds(self) -> None:
        """The trim's thresholds and tie quotas from the finished selection."""
        n = self.meta.numel
        for i, sel in self.selector.result.items():
            quota = self.ks[i] - (n - sel.below - sel.equal)  # tied entries among the k largest
            if quota >= sel.equal:
                self.keep_ge[i] = sel.value
            else:
                self._thr[i] = sel.value
                self._quota[i] = quota

    # -- merge pass -----------------------------------------------------------
    def _trim(self, i: int, d: torch.Tensor) -> torch.Tensor:
        k = self.ks[i]
        if k == 0:
            return d.zero_()
        thr = self.keep_ge[i]
        if thr is not None:
            if thr == float("inf"):
                return d.zero_()
            return d if thr <= 0 else torch.nn.functional.hardshrink(d, _below(thr))
        if i not in self._thr:
            return d  # keep all
        t = self._thr[i]
        out = torch.nn.functional.hardshrink(d, t)  # strictly above the threshold
        quota = self._quota[i]
        if quota > 0:
            # the tied entries' values: (|d| >= t) minus (|d| > t), in float ops (t > 0 here)
            with_ties = torch.nn.functional.hardshrink(d, _below(t))
            tied_values = with_ties - out
            tied = int(torch.count_nonzero(tied_values))
            if tied <= quota:  # every tied entry of this block belongs
                self._quota[i] = quota - tied
                return with_ties
            idx = torch.nonzero(tied_values.reshape(-1)).squeeze(1)[:quota]
            flat_out, flat_d = out.reshape(-1), d.reshape(-1)
            flat_out[idx] = flat_d[idx]
            self._quota[i] = 0
        return out

    def _trim_thresholds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per model, :meth:`_trim` as hardshrink thresholds for the compiled
        merge: (sure keeps, keeps with ties, tied entries still to keep)."""
        strict, with_ties, quota = [], [], []
        for i, k in enumerate(self.ks):
            thr = self.keep_ge[i]
            if k == 0 or thr == float("inf"):
                t = tt = float("inf")       # drop everything
            elif thr is not None:
                t = tt = -1.0 if thr <= 0 else _below(thr)
            elif i in self._thr:
                t, tt = self._thr[i], _below(self._thr[i])
            else:
                t = tt = -1.0               # keep everything
            strict.append(t)
            with_ties.append(tt)
            quota.append(self._quota.get(i, 0) if i in self._thr else 0)
        return (np.array(strict, dtype=np.float32), np.array(with_ties, dtype=np.float32),
                np.array(quota, dtype=np.int64))

    def _in_order(self, offset: int, numel: int) -> None:
        if offset != self._next:
            raise RuntimeError(f"tensor {self.meta.name!r}: ties blocks out of order ({offset} != {self._next})")
        self._next = offset + numel

    def _compiled_args(self) -> ties_compiled.BlockArgs:
        if self._fused_args is None:  # thresholds are final once the passes are done
            self._fused_args = ties_compiled.ties_args(*self._trim_thresholds(), np.array(self.weights, dtype=np.float32),
                                                     self.consensus == "count", self.zero_sign, self.normalize,
                                                     self.lam)
        return self._fused_args

    # -- one pass: merge around the sampled brackets, then redo the entries inside them --------
    def _brackets(self) -> tuple[np.ndarray, np.ndarray, int] | None:
        """Per model, the sampled bracket of its selection as ``[lo, hi)`` arrays of ``|delta|``
        (float32; ``hi`` 0: not selected), and room for the entries inside any of them; None
        when a selection has no bracket or the brackets would hold more than
        :data:`ONE_PASS_SHARE` of the tensor."""
        nm = len(self.ks)
        lo, hi = np.zeros(nm, np.float32), np.zeros(nm, np.float32)
        share = 0.0
        for i in self.selector.ks:
            b = self.selector.bracket(i)
            if b is None or b[0] + b[1] >= 0x7F800000:  # no bracket, or one reaching inf and NaN
                return None
            lo[i], hi[i] = pattern_value(b[0]), pattern_value(b[0] + b[1])
            share += b[2]
        if share > ONE_PASS_SHARE:
            return None
        n = self.meta.numel
        return lo, hi, min(n, int(1.5 * share * n) + 4096)

    def _one_pass_merge(self, piece: PieceInputs, base: np.ndarray, models: tuple[np.ndarray, ...],
                        out: np.ndarray) -> bool:
        """The whole tensor merged in one pass over its inputs, equal to the two-pass merge.

        Each selected model keeps the entries above its bracket and drops those below it (their
        trim is the same whatever the exact threshold inside the bracket) while the merge counts
        the entries below each bracket and lists those inside any: the counts settle every
        selection (:meth:`StreamSelector.settle`), and the listed entries (every entry whose
        trim a bracket left open, so all entries tied at a threshold, in flat order) are
        gathered and merged again with the exact trim, their tie quotas counted in flat order
        as in the two-pass merge. Where a bracket misses (or holds more entries than sampled),
        the selection is counted with passes over the piece and the tensor merged again."""
        lo, hi, room = self._brackets()  # type: ignore[misc]  # observe_raw checked it
        strict, with_ties, quota = self._trim_thresholds()  # the models not selected
        args = ties_compiled.ties_args(strict, with_ties, quota, np.array(self.weights, dtype=np.float32),
                                       self.consensus == "count", self.zero_sign, self.normalize, self.lam)
        br = ties_compiled.Brackets.empty(lo, hi, room, base.dtype, models[0].dtype)
        finite = ties_compiled.merge_raw(base, models, args, out, brackets=br)
        if not br.overflowed and self.selector.settle({i: int(br.below[i]) for i in self.selector.ks}, br.inside()):
            self._settle_thresholds()
            pos, b_at, m_at = br.listed()
            redone = ties_compiled.thread_scratch("redone", pos.shape, out.dtype)
            finite_at = ties_compiled.merge_raw(b_at, m_at, self._compiled_args(), redone)
            out[pos] = redone
            if not finite:  # the first merge's check also saw the entries merged again
                finite = _all_finite(out)
            return finite and finite_at
        missed = StreamSelector(self.selector.ks, self.meta.numel)  # count with passes, unsampled
        missed.misses = self.selector.misses + 1
        self.selector = missed
        self._select_with_passes(piece)
        return ties_compiled.merge_raw(base, models, self._compiled_args(), out)

    def _select_with_passes(self, piece: PieceInputs) -> None:
        """Count the selection with the selector's passes over ``piece`` (the whole tensor)."""
        self._one_pass = False
        for p in range(StreamSelector.passes):
            if self.selector.pass_needed(p):
                self.selector.observe(p, piece.base, piece.models)
                self.end_pass(p)

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        """The whole piece through the compiled merge, from and to the stored
        dtypes (None: these inputs need float32 blocks)."""
        raw, o = based_inputs(piece.base, piece.models, self._fused), raw_view(out)
        if self._one_pass and (raw is None or o is None):  # blocks need the thresholds: count them now
            self._select_with_passes(piece)
        if raw is None or o is None:
            return None
        self._in_order(piece.start, piece.numel)
        if self._one_pass:
            return self._one_pass_merge(piece, raw[0], raw[1], o)
        return ties_compiled.merge_raw(raw[0], raw[1], self._compiled_args(), o)

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        self._in_order(blk.offset, blk.base.numel())
        if self._fused:
            return ties_compiled.merge_block(blk.base, blk.models, self._compiled_args()).reshape(blk.base.shape)
        deltas = []
        for i, (m, w) in enumerate(zip(blk.models, self.weights)):
            d = self._trim(i, m - blk.base)
            if w != 1.0:
                d.mul_(w)
            deltas.append(d)
        mixed = consensus_mix(deltas, self.weights, self.consensus, self.normalize, self.zero_sign)
        if self.lam != 1.0:
            mixed.mul_(self.lam)
        return mixed.add_(blk.base)
