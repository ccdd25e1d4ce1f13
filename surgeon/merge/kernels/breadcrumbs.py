"""Model Breadcrumbs' kernel: both rank cuts from the streamed selection, then the mix.

The definition is :func:`surgeon.merge.methods.breadcrumbs.breadcrumbs`.
"""
from __future__ import annotations

import torch

from ..arith import combine
from ..select.stream import RankCut, SelectionPasses, StreamSelector
from ..tensor import TensorMerge


class BreadcrumbsKernel(SelectionPasses):
    """Breadcrumbs streamed: the two rank boundaries of each task vector
    (``n_bot`` and ``n_bot + target`` smallest magnitudes) come from the same
    counting passes as TIES' selection; the merge pass keeps the entries
    between them, ties split by flat index exactly as :func:`breadcrumbs_mask`."""

    def __init__(self, meta: TensorMerge, consensus: str | None):
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

    def end_pass(self, pass_no: int) -> None:
        self.selector.end_pass(pass_no)
        if self.selector.done:
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
