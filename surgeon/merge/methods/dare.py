"""DARE: Drop And REscale task vectors, then task arithmetic or TIES.

Yu, Yu, Yu, Huang, Li, 2023, "Language Models are Super Mario: Absorbing
Abilities from Homologous Models as a Free Lunch" (ICML 2024,
arXiv 2311.03099).

Each entry of each task vector is dropped with probability ``1 - density``
and, with ``rescale`` (default), the survivors are multiplied by
``1 / density`` as in the paper, so the task vector is unchanged in
expectation. mergekit's ``rescale`` instead scales the survivors so the
sparse task vector has the original L1 norm (about the same factor, but
data-dependent); that is the one deliberate difference from mergekit's
``dare_linear`` / ``dare_ties``.

Randomness comes from :meth:`TensorMerge.uniform`, seeded from the recipe
seed, the tensor name, the model's position in the step (``salt =
"dare:<i>"``) and the entry's fixed segment of the tensor, so a tensor's masks
are the same whichever process computes it, in whatever order, whole or block
by block (the methods are elementwise and run in cache-sized blocks); ``dare_linear`` and ``dare_ties`` draw the
same masks for the same seed. ``density >= 1`` draws nothing and keeps the
task vector as is; ``density == 0`` drops everything.
"""
from __future__ import annotations

import torch

from ..arith import combine
from ..kernels import ties_compiled
from ..kernels.dare import DareKernel
from ..method import merge_method
from ..tensor import TensorMerge
from .common import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    check_inputs,
    normalize_param,
    rescale_param,
)

_RESCALE = rescale_param(True, "multiply the surviving entries by 1/density (the paper's rescale)")
_PAPER = "Yu et al. 2023, Language Models are Super Mario (DARE) (arXiv 2311.03099)"
#: both variants take the same parameters, with mergekit's defaults (no normalize)
_PARAMS = (WEIGHT, DENSITY, LAMBDA, normalize_param(False), _RESCALE)


def dare_drop(delta: torch.Tensor, density: float, rescale: bool, uniform: torch.Tensor) -> torch.Tensor:
    """Keep each entry where ``uniform < density`` (in place; ``uniform`` is
    one U[0, 1) draw per entry), then rescale the survivors by ``1/density``."""
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    # keep = [u < density] as a float: sign(relu(density - u)) (float ops; bool masks are slow on CPU)
    keep = uniform.neg_().add_(density).relu_().sign_()
    delta.mul_(keep)
    if rescale:
        delta.div_(density)
    return delta


def _dare_kernel(consensus: bool):
    def factory(meta: TensorMerge) -> DareKernel | None:
        if meta.device.type != "cpu" or not meta.has_base or not ties_compiled.available():
            return None  # the elementwise fn serves the blocks
        return DareKernel(meta, consensus)

    return factory


def _dropped_deltas(t: TensorMerge) -> list[torch.Tensor]:
    deltas = []
    for i, (m, mp) in enumerate(zip(t.models, t.model_params)):
        d = m - t.base
        density = float(mp["density"])
        u = t.uniform(f"dare:{i}") if 0 < density < 1 else None
        deltas.append(dare_drop(d, density, t.params["rescale"], u))
    return deltas


@merge_method(
    "dare_linear",
    params=_PARAMS,
    needs_base=True,
    min_models=1,
    paper=_PAPER,
    randomized=True,
    mergekit_name="dare_linear",
    elementwise=True,
    kernel=_dare_kernel(consensus=False),
)
def dare_linear(t: TensorMerge) -> torch.Tensor:
    """DARE + task arithmetic: base + lambda * sum_i w_i * drop_rescale(model_i - base)."""
    check_inputs(t, "dare_linear")
    p = t.params
    return combine(t, _dropped_deltas(t), consensus=None, normalize=p["normalize"], lam=p["lambda"])


@merge_method(
    "dare_ties",
    params=_PARAMS,
    needs_base=True,
    min_models=1,
    paper=_PAPER,
    randomized=True,
    mergekit_name="dare_ties",
    elementwise=True,
    kernel=_dare_kernel(consensus=True),
)
def dare_ties(t: TensorMerge) -> torch.Tensor:
    """DARE + TIES sign consensus: drop and rescale, elect signs (mass), merge the agreeing entries.

    A zero elected sum counts as positive (mergekit). ``normalize`` (default
    false, as in mergekit) divides by the agreeing models' summed weights.
    """
    check_inputs(t, "dare_ties")
    p = t.params
    return combine(t, _dropped_deltas(t), consensus="sum", normalize=p["normalize"], lam=p["lambda"])


METHODS = (dare_linear, dare_ties)
