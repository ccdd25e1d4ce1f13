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

Randomness comes from :meth:`TensorMerge.generator`, seeded from the recipe
seed, the tensor name and the model's position in the step
(``salt = "dare:<i>"``), so a tensor's masks are the same whichever process
computes it and in whatever order; ``dare_linear`` and ``dare_ties`` draw the
same masks for the same seed. ``density >= 1`` draws nothing and keeps the
task vector as is; ``density == 0`` drops everything.
"""
from __future__ import annotations

import torch

from ._common import DENSITY, LAMBDA, WEIGHT, check_inputs, combine, normalize_param, rescale_param
from .registry import TensorMerge, merge_method

_RESCALE = rescale_param(True, "multiply the surviving entries by 1/density (the paper's rescale)")
_PAPER = "Yu et al. 2023, Language Models are Super Mario (DARE) (arXiv 2311.03099)"


def dare_drop(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """Randomly keep each entry with probability ``density`` (in place)."""
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    u = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32)
    delta.mul_(u < density)
    if rescale:
        delta.div_(density)
    return delta


def _dropped_deltas(t: TensorMerge) -> list[torch.Tensor]:
    deltas = []
    for i, (m, mp) in enumerate(zip(t.models, t.model_params)):
        d = m - t.base
        deltas.append(dare_drop(d, float(mp["density"]), t.params["rescale"], t.generator(f"dare:{i}")))
    return deltas


@merge_method(
    "dare_linear",
    params=[WEIGHT, DENSITY, LAMBDA, normalize_param(False), _RESCALE],
    needs_base=True,
    min_models=1,
    paper=_PAPER,
    randomized=True,
    mergekit_name="dare_linear",
)
def dare_linear(t: TensorMerge) -> torch.Tensor:
    """DARE + task arithmetic: base + lambda * sum_i w_i * drop_rescale(model_i - base)."""
    check_inputs(t, "dare_linear")
    p = t.params
    return combine(t, _dropped_deltas(t), consensus=None, normalize=p["normalize"], lam=p["lambda"])


@merge_method(
    "dare_ties",
    params=[WEIGHT, DENSITY, LAMBDA, normalize_param(False), _RESCALE],
    needs_base=True,
    min_models=1,
    paper=_PAPER,
    randomized=True,
    mergekit_name="dare_ties",
)
def dare_ties(t: TensorMerge) -> torch.Tensor:
    """DARE + TIES sign consensus: drop and rescale, elect signs (mass), merge the agreeing entries.

    A zero elected sum counts as positive (mergekit). ``normalize`` (default
    false, as in mergekit) divides by the agreeing models' summed weights.
    """
    check_inputs(t, "dare_ties")
    p = t.params
    return combine(t, _dropped_deltas(t), consensus="sum", normalize=p["normalize"], lam=p["lambda"])
