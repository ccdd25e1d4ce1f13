"""SCE: Select (by variance), Calculate (weights), Erase (minority signs).

Wan, Zhong, Yang, Chen, Quan, 2024, "FuseChat: Knowledge Fusion of Chat
Models" (FuseChat-2.0, arXiv 2408.07990). Semantics of mergekit's upstream
``sce``:

1. Select: with ``select_topk < 1``, the variance across models (population,
   per entry) of the task vectors ``tau_i = w_i - base`` is computed; of the
   entries with non-zero variance, the ``k = int(count * select_topk)`` with
   the largest variance are kept in every task vector, the rest zeroed
   (ties at the boundary: lowest flat index).
2. Calculate: each model's weight is the mean of its (selected) squared task
   vector over the tensor (summed in float64, so that the block kernel,
   :mod:`surgeon.merge.kernels.sce`, agrees; mergekit sums in the tensor's
   dtype), normalised to sum 1; uniform ``1/N`` when that sum is below 1e-6.
3. Erase: the elected sign is the sign of the summed (selected) task vectors
   (zero sum: positive); only agreeing entries contribute.
   ``merged = sum_i w_i [agree_i] tau_i / max(sum_i w_i [agree_i], 1e-6)``,
   and the result is ``base + merged``.

There is no per-model weight: SCE computes its own. With a single model and
``select_topk < 1`` every variance is zero, nothing is selected and the base
comes back (as in mergekit).

FuseChat's own mergekit fork (FuseChat/mergekit, ``sce_merging.py``) differs:
the variance mask is used only to compute the weights, and the full,
unmasked task vectors are then erased and merged; uniform weights only when
their sum is exactly 0; entries where no model agrees divide by 1 instead of
clamping the weight sum at 1e-6. We follow mergekit upstream.
"""
from __future__ import annotations

import torch

from ..kernels.sce import SceKernel, erase_mix, sce_weights, sq_sum, variance
from ..method import merge_method
from ..params import Param
from ..select.exact import largest_mask
from ..tensor import TensorMerge
from .common import check_inputs


def variance_mask(deltas: list[torch.Tensor], select_topk: float) -> torch.Tensor | None:
    """Keep-mask of the highest-variance entries (None: keep all)."""
    if select_topk >= 1:
        return None
    if select_topk <= 0:
        return torch.zeros(deltas[0].shape, dtype=torch.bool, device=deltas[0].device)
    var = variance(deltas)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    return largest_mask(var, k)


def sce_kernel(meta: TensorMerge) -> SceKernel | None:
    """The block kernel, or None where the whole-tensor path runs (no base, no model, an empty tensor)."""
    if not meta.has_base or len(meta.model_params) < 1 or meta.numel == 0:
        return None
    return SceKernel(meta)


@merge_method(
    "sce",
    params=[Param("select_topk", float, default=1.0, min=0.0, max=1.0,
                  help="fraction of the non-zero-variance entries kept (highest variance across models)")],
    needs_base=True,
    min_models=1,
    paper="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (arXiv 2408.07990)",
    mergekit_name="sce",
    kernel=sce_kernel,
)
def sce(t: TensorMerge) -> torch.Tensor:
    """SCE: keep high-variance entries, weight models by mean squared task vector, erase minority signs."""
    check_inputs(t, "sce")
    base = t.base
    assert base is not None
    deltas = [m - base for m in t.models]
    mask = variance_mask(deltas, float(t.params["select_topk"]))
    if mask is not None:
        for d in deltas:
            d.mul_(mask)
        del mask
    weights = sce_weights([sq_sum(d) for d in deltas], base.numel())
    return erase_mix(base, deltas, weights)


METHODS = (sce,)
