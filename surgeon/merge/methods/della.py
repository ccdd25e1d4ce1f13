"""DELLA: magnitude-based random pruning (MagPrune) of task vectors.

Deep, Bhardwaj, Poria, 2024, "DELLA-Merging: Reducing Interference in Model
Merging through Magnitude-Based Sampling" (arXiv 2406.11617). Semantics of
mergekit's ``della`` / ``della_linear`` (sparsification ``della_magprune``):

Within each row of a task vector (along dim 1; a 1-D tensor is one row),
entries are ranked by magnitude; the rank is normalised to ``[0, 1]`` and an
entry is kept with probability ``density - epsilon + 2 * epsilon * rank``
(smallest magnitudes ``density - epsilon``, largest ``density + epsilon``).
``density +- epsilon`` must lie strictly inside ``(0, 1)`` unless
``density >= 1`` (nothing pruned) or ``density <= 0`` (everything pruned).
With ``rescale`` (default) the pruned task vector is scaled back to its
original L1 norm (mergekit; the paper instead divides each survivor by its
own keep probability). ``della`` then elects signs (mass, a zero sum counts
as positive) and takes the weighted disjoint mean (``normalize`` true);
``della_linear`` adds the weighted task vectors (``normalize`` false).

Differences from mergekit: ranks are 0..n-1 in (magnitude, index) order
(mergekit double-argsorts, unstable, so equal magnitudes rank arbitrarily); a row of
length 1 gets rank 0.5 (keep probability ``density``; mergekit computes 0/0);
each entry's keep decision has the same probability as mergekit's but is drawn
without ranking the row: a uniform decides it outside ``[density - epsilon,
density + epsilon)``, inside it the entry is kept when it outranks a random
partner from its row (:func:`surgeon.merge.kernels.della.magprune_keep`);
the numbers are counter-based, per tensor and model
(:class:`surgeon.merge.kernels.della.DellaDraws`: any piece, block or device
draws the same numbers; mergekit draws from torch's global generator); the
rescale's L1 norms are summed in float64
(mergekit: in the tensor's dtype), so that the block kernel
(:mod:`surgeon.merge.kernels.della`), which sums them block by block, agrees.
"""
from __future__ import annotations

import torch

from ...errors import InvalidInputError
from ..arith import combine
from ..kernels.della import (
    DellaDraws,
    DellaKernel,
    della_params_ok,
    l1_scale,
    l1_sum,
    magprune_keep,
    rows_view,
)
from ..method import merge_method
from ..params import Param
from ..tensor import TensorMerge
from .common import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    check_inputs,
    normalize_param,
    rescale_param,
)

EPSILON = Param("epsilon", float, default=0.15, min=0.0, max=0.5, per_model=True,
                help="half-width of the keep-probability range around density")
_RESCALE = rescale_param(True, "rescale each pruned task vector to its original L1 norm (mergekit's rescale)")
_PAPER = "Deep et al. 2024, DELLA-Merging (arXiv 2406.11617)"


def _params(normalize: bool) -> tuple[Param, ...]:
    """Both variants' parameters; only normalize's default differs (mergekit: della true, della_linear false)."""
    return (WEIGHT, DENSITY, EPSILON, LAMBDA, normalize_param(normalize), _RESCALE)


def magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: bool, draws: DellaDraws,
             start: int, where: str) -> torch.Tensor:
    """MagPrune a task vector (returns a new or the same tensor) whose first entry is the
    tensor's flat index ``start`` (0: the whole tensor), with ``draws``, its model's
    streams over the tensor (used only when something is drawn)."""
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    if not della_params_ok(density, epsilon):
        raise InvalidInputError(
            f"{where}: della needs density - epsilon > 0 and density + epsilon < 1, "
            f"got density {density} and epsilon {epsilon}"
        )
    rows = rows_view(delta, tuple(delta.shape))
    pruned = rows * magprune_keep(rows, density, epsilon, draws, start)
    if rescale:
        scale = l1_scale(l1_sum(rows), l1_sum(pruned))
        if scale is not None:
            pruned.mul_(scale)
    return pruned.reshape(delta.shape)


def _pruned(t: TensorMerge) -> list[torch.Tensor]:
    out = []
    for i, (m, mp) in enumerate(zip(t.models, t.model_params)):
        out.append(magprune(m - t.base, float(mp["density"]), float(mp["epsilon"]), t.params["rescale"],
                            DellaDraws.of(t.seed, t.name, i), t.offset, f"tensor {t.name!r}, model {i}"))
    return out


def della_kernel(meta: TensorMerge, consensus: str | None) -> DellaKernel | None:
    """The block kernel (CPU), or None where the whole-tensor path must run: no
    base, parameters MagPrune rejects (the reference raises the clear error),
    an empty tensor, or another device (the kernel keeps its keep masks in host
    memory; the whole-tensor path draws the same numbers there)."""
    if not meta.has_base or len(meta.model_params) < 1 or meta.numel == 0 or meta.device.type != "cpu":
        return None
    if not all(della_params_ok(float(mp["density"]), float(mp["epsilon"])) for mp in meta.model_params):
        return None
    return DellaKernel(meta, consensus)


@merge_method(
    "della",
    params=_params(normalize=True),
    needs_base=True,
    min_models=1,
    paper=_PAPER,
    randomized=True,
    mergekit_name="della",
    kernel=lambda meta: della_kernel(meta, "sum"),
)
def della(t: TensorMerge) -> torch.Tensor:
    """DELLA: MagPrune each task vector, elect signs, weighted disjoint mean, base + lambda * merged."""
    check_inputs(t, "della")
    p = t.params
    return combine(t, _pruned(t), consensus="sum", normalize=p["normalize"], lam=p["lambda"])


@merge_method(
    "della_linear",
    params=_params(normalize=False),
    needs_base=True,
    min_models=1,
    paper=_PAPER,
    randomized=True,
    mergekit_name="della_linear",
    kernel=lambda meta: della_kernel(meta, None),
)
def della_linear(t: TensorMerge) -> torch.Tensor:
    """DELLA without sign election: MagPrune each task vector, then base + lambda * sum w_i delta_i."""
    check_inputs(t, "della_linear")
    p = t.params
    return combine(t, _pruned(t), consensus=None, normalize=p["normalize"], lam=p["lambda"])


METHODS = (della, della_linear)
