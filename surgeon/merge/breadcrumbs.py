"""Model Breadcrumbs: drop the largest outliers and the smallest entries.

Davari & Belilovsky, 2023, "Model Breadcrumbs: Scaling Multi-Task Model
Merging with Sparse Masks" (arXiv 2312.06795). Semantics of mergekit's
``breadcrumbs`` / ``breadcrumbs_ties`` (sparsification
``magnitude_outliers``):

Per tensor, with ``n`` entries, ``target = int(density * n)`` entries are
kept: after removing the ``n_top = int(gamma * n)`` largest magnitudes and
the ``n_bot = max(0, n - target - n_top)`` smallest, i.e. the entries whose
ascending magnitude rank is in ``[n_bot, n_bot + target)``. When
``target + n_top > n`` fewer outliers are removed so that ``target`` entries
remain (mergekit's rule). ``density >= 1`` keeps everything (``gamma`` is then
ignored, as in mergekit). Ranks among equal magnitudes follow the flat index
(mergekit's sort leaves it unspecified). The selection uses two k-th value
selections (:func:`surgeon.merge._select.rank_range_mask`), not a sort; the
engine streams it (:class:`BreadcrumbsKernel`: counting passes, as TIES).

Defaults as mergekit: ``density`` 1.0, ``gamma`` 0.01, ``weight`` 1.0,
``lambda`` 1.0, ``normalize`` false, ``rescale`` false (true: restore each
sparsified task vector's L1 norm).
"""
from __future__ import annotations

from typing import Any

import torch

from ._common import DENSITY, LAMBDA, WEIGHT, check_inputs, combine, l1_rescale, normalize_param, rescale_param
from ._select import rank_range_mask
from ._streamselect import RankCut, SelectionPasses, StreamSelector
from .registry import Param, TensorMerge, merge_method

GAMMA = Param("gamma", float, default=0.01, min=0.0, max=1.0, per_model=True,
              help="fraction of the largest-magnitude entries removed as outliers")
_RESCALE = rescale_param(False, "rescale each sparsified task vector to its original L1 norm (mergekit's rescale)")
_PAPER = "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv 2312.06795)"


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """Boolean keep-mask of mergekit's magnitude_outliers; None keeps all."""
    if density >= 1:
        return None
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    return rank_range_mask(delta.abs(), n_bot, n_bot + target)


def _sparsified(t: TensorMerge) -> list[torch.Tensor]:
    out = []
    for m, mp in zip(t.models, t.model_params):
        d = m - t.base
        mask = breadcrumbs_mask(d, float(mp["density"]), float(mp["gamma"]))
        if mask is not None:
            original = d.clone() if t.params["rescale"] else None
            d.mul_(mask)
            if original is not None:
                l1_rescale(original, d)
        out.append(d)
    return out


class BreadcrumbsKernel(SelectionPasses):
    """Breadcrumbs streamed: the two rank boundaries of each task vector
    (``n_bot`` and ``n_bot + target`` smallest magnitudes) come from the same
    counting passes as TIES' selection; the merge pass keeps the entries
    between them, ties split by flat index exactly as :func:`breadcrumbs_mask`."""

    def __init__(self, meta: Any, consensus: str | None):
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


def _kernel(consensus: str | None):
    def factory(meta: Any) -> BreadcrumbsKernel | None:
        if not meta.has_base or meta.params.get("rescale") or not meta.model_params or meta.numel == 0:
            return None  # L1 rescale needs whole-tensor sums after trimming
        return BreadcrumbsKernel(meta, consensus)
    return factory


@merge_method(
    "breadcrumbs",
    params=[WEIGHT, DENSITY, GAMMA, LAMBDA, normalize_param(False), _RESCALE],
    needs_base=True,
    min_models=1,
    paper=_PAPER,
    mergekit_name="breadcrumbs",
    kernel=_kernel(None),
)
def breadcrumbs(t: TensorMerge) -> torch.Tensor:
    """Breadcrumbs + task arithmetic: drop outliers and small entries, then base + lambda * sum w_i delta_i."""
    check_inputs(t, "breadcrumbs")
    p = t.params
    return combine(t, _sparsified(t), consensus=None, normalize=p["normalize"], lam=p["lambda"])


@merge_method(
    "breadcrumbs_ties",
    params=[WEIGHT, DENSITY, GAMMA, LAMBDA, normalize_param(False), _RESCALE],
    needs_base=True,
    min_models=1,
    paper=_PAPER,
    mergekit_name="breadcrumbs_ties",
    kernel=_kernel("sum"),
)
def breadcrumbs_ties(t: TensorMerge) -> torch.Tensor:
    """Breadcrumbs + TIES sign consensus (mass election, a zero sum counts as positive)."""
    check_inputs(t, "breadcrumbs_ties")
    p = t.params
    return combine(t, _sparsified(t), consensus="sum", normalize=p["normalize"], lam=p["lambda"])
