"""Selection kernels merged in one pass: a tensor in one piece is read once, not twice.

TIES' trim and breadcrumbs' band keep each task vector's entries by the exact rank of
their magnitude in the tensor, which a counting pass over the tensor settles
(:class:`surgeon.merge.select.stream.StreamSelector`) before the merge pass reads every
input again. When the whole tensor comes in one piece (on the 1.1B family every
tensor but the embedding and the head: 90 % of the entries), the merge does the
counting: before it, an evenly spread sample brackets each selection (the pass's first
step anyway); whatever the exact cut inside a bracket, the entries above and below it
are decided, so the merge runs with those decisions while it counts the entries below
each bracket and lists those inside any (copying their inputs while they are in cache).
The counts and the listed magnitudes settle every selection as the pass would
(:meth:`StreamSelector.settle`); then only the listed entries (every entry tied at a cut
among them, in flat order) are merged again with the exact selection and written over
the provisional results. A bracket that misses, or lists more entries than its sample
promised, falls back to the counting passes over the piece and a second merge: exact
whatever the sample. Brackets that would hold more than :data:`ONE_PASS_SHARE` of the
tensor (deltas of a few bf16 steps, a fifth of them tied at one value) keep the
counting pass from the start.

Tie brackets. A bracket the sample narrowed to one value ``v`` (bf16 deltas: breadcrumbs'
start cut sits in the group of entries one bf16 step apart, ~10 % of a 1.1B model's
entries) already knows its cut, ``v``; only how many of the entries equal to ``v`` the cut
takes (its quota, first in flat order) waits for the count below ``v``. Listing those
entries cost ~10 ns each; instead the merge decides them with a quota guessed from the
sample and counts them per chunk, and once the exact quota is known only the entries
between the guessed and the exact one (a flat range: ties are taken in flat order) are
merged again. The listed entries of the other brackets are merged again in flat segments
split where each tie quota runs out, each segment with every tie cut's entries all in or
all out of its quota: the merge a second pass would make.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..select.stream import SelectionPasses, StreamSelector, pattern_value
from . import ties_compiled
from ._raw import CHUNK, based_inputs, raw_view
from .base import PieceInputs
from .scratch import stored_finite

#: most of a tensor (the sampled shares of all brackets, summed) that a one-pass merge may
#: list; past it the selection is counted in a pass of its own
ONE_PASS_SHARE = 0.25


class OnePassSelection(SelectionPasses):
    """Base of the compiled selection kernels (``self.selector``, ``self.row``, ``self.meta``)
    that merge a one-piece tensor in one pass.

    A subclass says where each selection's bracket goes (:meth:`bracket_slots`), merges
    with the decisions a set of brackets leaves (:meth:`provisional_merge`) and with the
    exact selection (:meth:`exact_merge`), and turns a finished selection into its cuts
    (:meth:`selection_done`). ``compiled``: whether the compiled loops run here.
    """

    compiled: bool
    _one_pass: bool = False  # this tensor's selection is counted by its merge

    # -- what a subclass provides -------------------------------------------------------------
    def bracket_slots(self) -> dict[object, tuple[int, int]]:
        """Each selection series' bracket place: (model, 0 or 1)."""
        raise NotImplementedError

    def provisional_merge(self, base: np.ndarray, models: tuple[np.ndarray, ...], out: np.ndarray,
                          brackets: ties_compiled.Brackets, quotas: dict[object, int]) -> bool:
        """Merge keeping and dropping what every bracket decides, counting around the brackets;
        a tie bracket's series (in ``quotas``) is cut at its bracket's value with that quota."""
        raise NotImplementedError

    def exact_merge(self, base: np.ndarray, models: tuple[np.ndarray, ...], out: np.ndarray) -> bool:
        """Merge with the finished selection (entries in flat order: tie quotas run down)."""
        raise NotImplementedError

    def tie_quota(self, series: object, below: int, equal: int) -> int:
        """The quota (entries equal to the cut that its quota takes, first in flat order) of
        ``series`` cut at a value with ``below`` entries under it and ``equal`` at it."""
        raise NotImplementedError

    def fixed_state(self) -> Any:
        """The running state of :meth:`fixed_merge` calls that follow each other in flat order."""
        raise NotImplementedError

    def fixed_merge(self, base: np.ndarray, models: tuple[np.ndarray, ...], out: np.ndarray,
                    groups: dict[object, bool], state: Any) -> bool:
        """Merge with the finished selection, every entry equal to the cut of a series in
        ``groups`` taken by its quota (True) or not (False); the other cuts' quotas run down in
        ``state`` (:meth:`fixed_state`)."""
        raise NotImplementedError

    def selection_done(self) -> None:
        """The selection is finished (``self.selector.result``): set the cuts."""
        raise NotImplementedError

    # -- the kernel contract --------------------------------------------------------------------
    def pass_needed(self, pass_no: int) -> bool | None:
        if self._one_pass:
            return False  # counted by the merge itself
        return super().pass_needed(pass_no)

    def observe_raw(self, pass_no: int, piece: PieceInputs) -> bool:
        if pass_no == 0 and piece.start == 0 and piece.numel == self.meta.numel and self.compiled:
            self.selector.sample(piece.base, piece.models, self.row)
            self._one_pass = self._brackets() is not None and based_inputs(piece.base, piece.models) is not None
            if self._one_pass:
                return True
        return super().observe_raw(pass_no, piece)

    def end_pass(self, pass_no: int) -> None:
        if self._one_pass:
            return
        self.selector.end_pass(pass_no)
        if self.selector.done:
            self.selection_done()

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        """The whole piece through the compiled merge, from and to the stored dtypes (None:
        these inputs need float32 blocks, which then get the selection counted by passes)."""
        raw, o = based_inputs(piece.base, piece.models, self.compiled), raw_view(out)
        if self._one_pass and (raw is None or o is None):
            self._select_with_passes(piece)
        if raw is None or o is None:
            return None
        self.merging(piece)
        if self._one_pass:
            return self._one_pass_merge(piece, raw[0], raw[1], o)
        return self.exact_merge(raw[0], raw[1], o)

    def merging(self, piece: PieceInputs) -> None:
        """Called before each piece's compiled merge (a subclass may check their order)."""

    # -- one pass -------------------------------------------------------------------------------
    def _brackets(self) -> tuple[np.ndarray, np.ndarray, int, np.ndarray] | None:
        """The sampled brackets as ``[lo, hi)`` of ``|delta|`` (float32 ``[models, 2]``, ``hi``
        0: none), room for the entries inside any but the tie brackets, and which are tie
        brackets (one value: int8 ``[models, 2]``); None when a selection has no bracket or the
        listed brackets would hold more than :data:`ONE_PASS_SHARE` of the tensor."""
        nm = len(self.meta.model_params)
        lo, hi = np.zeros((nm, 2), np.float32), np.zeros((nm, 2), np.float32)
        tie = np.zeros((nm, 2), np.int8)
        share = 0.0
        for series, (i, c) in self.bracket_slots().items():
            b = self.selector.bracket(series)
            if b is None or b[0] + b[1] >= 0x7F800000:  # no bracket, or one reaching inf and NaN
                return None
            lo[i, c], hi[i, c] = pattern_value(b[0]), pattern_value(b[0] + b[1])
            if b[1] == 1:
                tie[i, c] = 1
            else:
                share += b[2]
        if share > ONE_PASS_SHARE:
            return None
        n = self.meta.numel
        return lo, hi, min(n, int(1.5 * share * n) + 4096), tie

    def _guessed_quota(self, series: object) -> int:
        """A tie bracket's quota as the sample predicts it."""
        n = self.meta.numel
        _, _, share = self.selector.bracket(series)  # type: ignore[misc]  # a tie bracket has one
        below = round(self.selector.sampled_below(series) * n)
        return max(0, self.tie_quota(series, below, max(1, round(share * n))))

    def _one_pass_merge(self, piece: PieceInputs, base: np.ndarray, models: tuple[np.ndarray, ...],
                        out: np.ndarray) -> bool:
        """The whole tensor merged in one pass over its inputs, equal to the two-pass merge."""
        lo, hi, room, tie = self._brackets()  # type: ignore[misc]  # observe_raw checked it
        n = base.shape[0]
        # a tie bracket flags nothing: [v, v) (the kernel counts its entries at v per chunk)
        br = ties_compiled.Brackets.empty(lo, np.where(tie > 0, lo, hi), room, base.dtype, models[0].dtype, n, tie)
        slots = self.bracket_slots()
        ties = {s: ic for s, ic in slots.items() if tie[ic]}
        guess = {s: self._guessed_quota(s) for s in ties}
        finite = self.provisional_merge(base, models, out, br, guess)
        if not br.entries.overflowed:
            inside = br.inside()
            for s, (i, c) in ties.items():  # every entry inside is the bracket's value (a view: no copies)
                inside[i, c] = np.broadcast_to(np.float32(lo[i, c]).view(np.uint32), (int(br.per_chunk[i, c].sum()),))
            if self.selector.settle({s: int(br.below[ic]) for s, ic in slots.items()},
                                    {s: inside[ic] for s, ic in slots.items()}):
                self.selection_done()
                if not ties:
                    return br.entries.merge_again(out, self.exact_merge, finite)
                return self._settle_ties(base, models, out, br, ties, guess, finite)
        sel = self.selector
        self.selector = StreamSelector(sel.ks, sel.n, sel.model_of)  # count with passes, unsampled
        self.selector.misses = sel.misses + 1
        self._select_with_passes(piece)
        return self.exact_merge(base, models, out)

    def _settle_ties(self, base: np.ndarray, models: tuple[np.ndarray, ...], out: np.ndarray,
                     br: ties_compiled.Brackets, ties: dict[object, tuple[int, int]], guess: dict[object, int],
                     finite: bool) -> bool:
        """After a one-pass merge with tie brackets: the entries a guessed quota decided wrongly,
        then the listed entries, merged again as the exact selection decides them."""
        sel = self.selector.result
        counts = {s: np.cumsum(br.per_chunk[ic], dtype=np.int64) for s, ic in ties.items()}
        value = {s: np.float32(br.lo[ic]) for s, ic in ties.items()}

        def position(s: object, rank: int) -> int:  # where the tie of this rank (0-based, flat order) is
            return _tie_position(base, models[ties[s][0]], value[s], counts[s], rank)

        exact = {s: self.tie_quota(s, sel[s].below, sel[s].equal) for s in ties}
        ends = {s: position(s, exact[s]) for s in ties}  # each quota's first entry left out (n: none)
        wrong = []
        for s in ties:
            total = int(counts[s][-1]) if counts[s].size else 0
            a, b = sorted((min(guess[s], total), min(exact[s], total)))
            if a < b:
                wrong.append((position(s, a), position(s, b - 1) + 1))
        redone_finite = True
        for a, b in _union(wrong):  # the ties between the guessed and the exact quota, in flat order
            state = self.fixed_state()
            for p0, p1 in _segments(a, b, ends.values()):
                groups = {s: p0 < end for s, end in ends.items()}
                redone_finite &= self.fixed_merge(base[p0:p1], tuple(m[p0:p1] for m in models), out[p0:p1],
                                                  groups, state)
        pos = br.entries.listed()[0]

        def merge_listed(b_at: np.ndarray, m_at: tuple[np.ndarray, ...], into: np.ndarray) -> bool:
            state = self.fixed_state()
            ok = True
            for e0, e1 in _segments(0, pos.shape[0], [int(np.searchsorted(pos, e)) for e in ends.values()]):
                groups = {s: int(pos[e0]) < end for s, end in ends.items()}
                ok &= self.fixed_merge(b_at[e0:e1], tuple(m[e0:e1] for m in m_at), into[e0:e1], groups, state)
            return ok

        finite = br.entries.merge_again(out, merge_listed, finite)
        if not redone_finite:  # a range merged again may hold a listed entry merged once more since
            finite = finite and all(stored_finite(out[a:b]) for a, b in _union(wrong))
        return finite

    def _select_with_passes(self, piece: PieceInputs) -> None:
        """Count the selection with the selector's passes over ``piece`` (the whole tensor)."""
        self._one_pass = False
        for p in range(StreamSelector.passes):
            if self.selector.pass_needed(p):
                self.selector.observe(p, piece.base, piece.models)
                self.end_pass(p)


def _f32(raw: np.ndarray) -> np.ndarray:
    """Stored values (float32, or bf16 bits as uint16) as float32."""
    return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32) if raw.dtype == np.uint16 else raw


def _tie_position(base: np.ndarray, model: np.ndarray, value: np.float32, counts: np.ndarray, rank: int) -> int:
    """The flat index of the entry of ``rank`` (0-based, flat order) among those with
    ``|model - base| == value`` (float32, as the compiled loop computes it), given their
    running counts per chunk of :data:`CHUNK` entries; the number of entries when there are
    not that many."""
    if counts.size == 0 or rank >= int(counts[-1]):
        return base.shape[0]
    c = int(np.searchsorted(counts, rank, side="right"))
    s = c * CHUNK
    e = min(base.shape[0], s + CHUNK)
    at = np.flatnonzero(np.abs(_f32(model[s:e]) - _f32(base[s:e])) == value)
    return s + int(at[rank - (int(counts[c - 1]) if c else 0)])


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping ``[a, b)`` ranges joined, in order."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _segments(a: int, b: int, cuts: Any) -> list[tuple[int, int]]:
    """``[a, b)`` split at every cut strictly inside it (non-empty parts, in order)."""
    edges = [a, *sorted({int(c) for c in cuts if a < c < b}), b]
    return [(p, q) for p, q in zip(edges, edges[1:]) if p < q]
