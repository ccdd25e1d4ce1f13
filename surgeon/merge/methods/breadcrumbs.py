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

import torch

from ..arith import combine, l1_rescale
from ..kernels.breadcrumbs import BreadcrumbsKernel
from ..method import merge_method
from ..params import Param
from ..select.exact import rank_range_mask
from ..tensor import TensorMerge
from .common import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    check_inputs,
    normalize_param,
    rescale_param,
)

GAMMA = Param("gamma", float, default=0.01, min=0.0, max=1.0, per_model=True,
              help="fraction of the largest-magnitude entries removed as outliers")
_RESCALE = rescale_param(False, "rescale each sparsified task vector to its original L1 norm (mergekit's rescale)")
_PAPER = "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv 2312.06795)"
#: both variants take the same parameters, with mergekit's defaults (no normalize)
_PARAMS = (WEIGHT, DENSITY, GAMMA, LAMBDA, normalize_param(False), _RESCALE)


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


def _kernel(consensus: str | None):
    def factory(meta: TensorMerge) -> BreadcrumbsKernel | None:
        if not meta.has_base or meta.params.get("rescale") or not meta.model_params or meta.numel == 0:
            return None  # L1 rescale needs whole-tensor sums after trimming
        return BreadcrumbsKernel(meta, consensus)
    return factory


@merge_method(
    "breadcrumbs",
    params=_PARAMS,
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
    params=_PARAMS,
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


METHODS = (breadcrumbs, breadcrumbs_ties)
