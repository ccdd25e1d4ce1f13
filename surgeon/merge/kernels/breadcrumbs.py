"""Model Breadcrumbs' kernel: both rank cuts from the streamed selection, then the mix.

The definition is :func:`surgeon.merge.methods.breadcrumbs.breadcrumbs`.
With numba, the merge pass is the compiled TIES/DARE loop on whole pieces in
their stored dtype (:mod:`surgeon.merge.kernels.ties_compiled`, ``kinds == 4``:
each model's magnitude band, ties at either cut taken in flat order from the
cuts' running quotas; three banded models in one loop a chunk, ``_bands3``); the
torch block path below is the fallback and the definition that loop follows.
"""
from __future__ import annotations

import numpy as np
import torch

from ..arith import combine, weight_total
from ..select.stream import RankCut, StreamSelector, next_float
from ..tensor import TensorMerge
from . import ties_compiled
from .one_pass import OnePassSelection


class BreadcrumbsKernel(OnePassSelection):
    """Breadcrumbs streamed: the two rank boundaries of each task vector
    (``n_bot`` and ``n_bot + target`` smallest magnitudes) come from the same
    counting passes as TIES' selection; the merge pass keeps the entries
    between them, ties split by flat index exactly as :func:`breadcrumbs_mask`. A tensor in
    one piece on CPU is merged in one pass (:mod:`surgeon.merge.kernels.one_pass`; bracket 0
    of a model is its stop cut's, 1 its start cut's)."""

    def __init__(self, meta: TensorMerge, consensus: str | None):
        self.meta = meta
        self.compiled = meta.device.type == "cpu" and ties_compiled.available()
        self.consensus = consensus
        self.normalize = bool(meta.params["normalize"])
        self.lam = float(meta.params["lambda"])
        n = meta.numel
        self.ranges: dict[int, tuple[int, int]] = {}
        requests: dict[object, int] = {}
        for i, mp in enumerate(meta.model_params):
            density, gamma = float(mp["density"]), float(mp["gamma"])
            if density >= 1:
                continue
            target = int(density * n)
            n_bot = max(0, n - target - int(gamma * n))
            start, stop = n_bot, min(n_bot + target, n)
            self.ranges[i] = (start, stop)
            if 0 < stop < n:
                requests[(i, "stop")] = stop
            if 0 < start < stop:
                requests[(i, "start")] = start
        self.selector = StreamSelector(requests, n, {key: key[0] for key in requests})  # type: ignore[index]
        self.stat_passes = StreamSelector.passes if requests else 0
        self.row = n // meta.shape[0] if meta.shape and meta.shape[0] else 1
        self.cuts: dict[object, RankCut] = {}
        self.weights = [float(mp["weight"]) for mp in meta.model_params]
        self.n_models = len(meta.model_params)

    # -- the selection's cuts (OnePassSelection) ----------------------------------------------
    def bracket_slots(self) -> dict[object, tuple[int, int]]:
        return {key: (key[0], 0 if key[1] == "stop" else 1) for key in self.selector.ks}  # type: ignore[index]

    def selection_done(self) -> None:
        for key, sel in self.selector.result.items():
            self.cuts[key] = RankCut(sel, self.selector.ks[key])

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        deltas = []
        for i, m in enumerate(blk.models):
            d = m - blk.base
            if i in self.ranges:
                start, stop = self.ranges[i]
                if stop <= start:
                    d.zero_()
                else:
                    a = d.abs()
                    mask = self.cuts[(i, "stop")].keep(a) if (i, "stop") in self.cuts else torch.ones_like(a)
                    if (i, "start") in self.cuts:
                        mask.sub_(self.cuts[(i, "start")].keep(a))
                    d.mul_(mask)
            deltas.append(d)
        return combine(blk, deltas, consensus=self.consensus, normalize=self.normalize, lam=self.lam)

    def _band(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The compiled loop's per-model kinds, cuts and quotas, from the cuts'
        current state: no cut below is a cut at -1 (no magnitude under it); no
        cut above, +inf with every infinite entry inside."""
        kinds = np.zeros(self.n_models, np.int8)
        band = np.zeros((self.n_models, 2), np.float32)
        quota = np.zeros((self.n_models, 2), np.int64)
        for i, (start, stop) in self.ranges.items():
            if stop <= start:
                kinds[i] = 1
                continue
            kinds[i] = 4
            for c, (which, none) in enumerate((("start", (-1.0, 0)), ("stop", (float("inf"), 1 << 62)))):
                cut = self.cuts.get((i, which))
                band[i, c], quota[i, c] = (cut.t, max(cut.quota, 0)) if cut is not None else none
        return kinds, band, quota

    # -- the compiled merges (OnePassSelection.merge_raw) ----------------------------------------
    def _args(self, kinds: np.ndarray) -> ties_compiled.BlockArgs:
        return ties_compiled.mask_args(kinds, np.array(self.weights, np.float32), self.consensus is not None,
                                       self.normalize, weight_total(self.weights), self.lam)

    def provisional_merge(self, base: np.ndarray, models: tuple[np.ndarray, ...], out: np.ndarray,
                          brackets: ties_compiled.Brackets, quotas: dict[object, int]) -> bool:
        """Bands whose cuts are their brackets' far ends: the entries below the start bracket's top
        and those from the stop bracket's bottom up are out (those inside are merged again); a
        tie bracket's cut is its value, with the guessed quota."""
        kinds, band, quota = self._band()
        for series, (i, c) in self.bracket_slots().items():
            col = 1 if c == 0 else 0  # bracket 0 is the stop cut's, band column 1
            if series in quotas:
                band[i, col], quota[i, col] = brackets.lo[i, c], quotas[series]
            elif c == 0:
                band[i, 1], quota[i, 1] = brackets.lo[i, 0], 0
            else:
                band[i, 0], quota[i, 0] = brackets.hi[i, 1], 0
        return ties_compiled.merge_raw(base, models, self._args(kinds), out, band=band, band_quota=quota,
                                       brackets=brackets)

    def tie_quota(self, series: object, below: int, equal: int) -> int:
        return self.selector.ks[series] - below  # the set's entries equal to its cut (RankCut.quota)

    def fixed_state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._band()

    def fixed_merge(self, base: np.ndarray, models: tuple[np.ndarray, ...], out: np.ndarray,
                    groups: dict[object, bool], state: tuple[np.ndarray, np.ndarray, np.ndarray]) -> bool:
        kinds, band, quota = state
        band = band.copy()
        for (i, which), in_set in groups.items():  # type: ignore[misc]  # breadcrumbs' series: (model, cut)
            col = 0 if which == "start" else 1
            v = self.cuts[(i, which)].t
            band[i, col], quota[i, col] = (next_float(v, float("inf")) if in_set else v), 0
        return ties_compiled.merge_raw(base, models, self._args(kinds), out, band=band, band_quota=quota)

    def exact_merge(self, base: np.ndarray, models: tuple[np.ndarray, ...], out: np.ndarray) -> bool:
        kinds, band, quota = self._band()
        finite = ties_compiled.merge_raw(base, models, self._args(kinds), out, band=band, band_quota=quota)
        for i in self.ranges:  # the quotas the loop used up, back to the cuts (blocks may follow)
            for c, which in enumerate(("start", "stop")):
                cut = self.cuts.get((i, which))
                if cut is not None:
                    cut.quota = int(quota[i, c])
        return finite
