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
"""
from __future__ import annotations

import numpy as np
import torch

from ..select.stream import SelectionPasses, StreamSelector, pattern_value
from . import ties_compiled
from ._raw import based_inputs, raw_view
from .base import PieceInputs

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
                          brackets: ties_compiled.Brackets) -> bool:
        """Merge keeping and dropping what every bracket decides, counting around the brackets."""
        raise NotImplementedError

    def exact_merge(self, base: np.ndarray, models: tuple[np.ndarray, ...], out: np.ndarray) -> bool:
        """Merge with the finished selection (entries in flat order: tie quotas run down)."""
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
    def _brackets(self) -> tuple[np.ndarray, np.ndarray, int] | None:
        """The sampled brackets as ``[lo, hi)`` of ``|delta|`` (float32 ``[models, 2]``, ``hi``
        0: none) and room for the entries inside any; None when a selection has no bracket or
        the brackets would hold more than :data:`ONE_PASS_SHARE` of the tensor."""
        nm = len(self.meta.model_params)
        lo, hi = np.zeros((nm, 2), np.float32), np.zeros((nm, 2), np.float32)
        share = 0.0
        for series, (i, c) in self.bracket_slots().items():
            b = self.selector.bracket(series)
            if b is None or b[0] + b[1] >= 0x7F800000:  # no bracket, or one reaching inf and NaN
                return None
            lo[i, c], hi[i, c] = pattern_value(b[0]), pattern_value(b[0] + b[1])
            share += b[2]
        if share > ONE_PASS_SHARE:
            return None
        n = self.meta.numel
        return lo, hi, min(n, int(1.5 * share * n) + 4096)

    def _one_pass_merge(self, piece: PieceInputs, base: np.ndarray, models: tuple[np.ndarray, ...],
                        out: np.ndarray) -> bool:
        """The whole tensor merged in one pass over its inputs, equal to the two-pass merge."""
        lo, hi, room = self._brackets()  # type: ignore[misc]  # observe_raw checked it
        br = ties_compiled.Brackets.empty(lo, hi, room, base.dtype, models[0].dtype)
        finite = self.provisional_merge(base, models, out, br)
        slots = self.bracket_slots()
        if not br.entries.overflowed:
            inside = br.inside()
            if self.selector.settle({s: int(br.below[ic]) for s, ic in slots.items()},
                                    {s: inside[ic] for s, ic in slots.items()}):
                self.selection_done()
                return br.entries.merge_again(out, self.exact_merge, finite)
        sel = self.selector
        self.selector = StreamSelector(sel.ks, sel.n, sel.model_of)  # count with passes, unsampled
        self.selector.misses = sel.misses + 1
        self._select_with_passes(piece)
        return self.exact_merge(base, models, out)

    def _select_with_passes(self, piece: PieceInputs) -> None:
        """Count the selection with the selector's passes over ``piece`` (the whole tensor)."""
        self._one_pass = False
        for p in range(StreamSelector.passes):
            if self.selector.pass_needed(p):
                self.selector.observe(p, piece.base, piece.models)
                self.end_pass(p)
