"""Multi-SLERP: barycentric interpolation of any number of models on the hypersphere.

Charles Goddard, "Multi-SLERP" (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea);
semantics of mergekit 0.1.5's ``multislerp`` (``merge_methods/multislerp.py``):

Each tensor is one vector per model, ``x_i`` (the task vector ``w_i - base``
when a base is given, the model itself otherwise), with norm ``n_i`` and
weight ``w_i`` (divided by their sum when ``normalize_weights``, the
default). The unit vectors ``u_i = x_i / (n_i + eps)`` are averaged,
``mean = sum_i w_i u_i``, and the result is ``mean / |mean|`` (the direction
of the weighted Euclidean mean) scaled to the weighted mean norm ``sum_i w_i
n_i``; the base is added back. With one model its tensor is returned as it
is (even with a base).

mergekit then projects the unit vectors onto the tangent space at ``m = mean
/ |mean|``, averages them there with the same weights and maps the average
back with the exponential map. That tangent average is exactly zero
(``sum_i w_i (u_i - <u_i, m> m) = mean - <mean, m> m = 0``), so the map
returns ``m``; mergekit computes it in float32 and gets rounding noise there,
surgeon uses the exact value. The results agree to float32 rounding (see
tests/test_merge_parity_methods.py).

When ``|mean| < eps`` (antipodal inputs whose weights cancel) there is no
direction: with two models mergekit falls back to ``w_0 x_0 + w_1 x_1``
(plus base), and so does surgeon; with more it is refused (mergekit raises
too). Weights summing to zero with ``normalize_weights`` are refused
(mergekit divides by zero).

Streaming (:class:`~surgeon.merge.kernels.multislerp.MultislerpKernel`): one
pass sums the Gram matrix ``<x_i, x_j>`` (float64); the result is ``sum_i
c_i x_i`` (+ base).
"""
from __future__ import annotations

import torch

from ...errors import InvalidInputError
from ..kernels.multislerp import (
    MultislerpKernel,
    combination,
    gram,
    multislerp_coefficients,
    multislerp_vectors,
)
from ..method import merge_method
from ..params import Param
from ..tensor import TensorMerge


def multislerp_kernel(meta: TensorMerge) -> MultislerpKernel | None:
    if len(meta.model_params) < 2 or meta.numel == 0:
        return None  # one model: returned as it is, by the whole-tensor path
    return MultislerpKernel(meta)


@merge_method(
    "multislerp",
    params=[
        Param("weight", float, per_model=True, help="the model's weight in the barycentre"),
        Param("normalize_weights", bool, default=True, help="divide the weights by their sum"),
        Param("eps", float, default=1e-8, min=0.0, help="added to norms before dividing (numerical guard)"),
    ],
    needs_base=False,
    min_models=1,
    paper="Goddard, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea); mergekit's multislerp",
    mergekit_name="multislerp",
    kernel=multislerp_kernel,
)
def multislerp(t: TensorMerge) -> torch.Tensor:
    """Weighted mean direction of the models (task vectors, with a base) on the sphere, at their weighted mean norm."""
    if not t.models:
        raise InvalidInputError(f"tensor {t.name!r}: multislerp needs at least one model besides the base")
    ref = t.models[0]
    for x in [*t.models[1:], t.base]:
        if x is not None and x.shape != ref.shape:
            raise InvalidInputError(
                f"tensor {t.name!r}: multislerp: shapes differ: {tuple(ref.shape)} vs {tuple(x.shape)}")
    if len(t.models) == 1:
        return t.models[0].to(torch.float32, copy=True)
    xs = multislerp_vectors(t)
    coef = multislerp_coefficients(gram(xs), t.weights(), bool(t.params["normalize_weights"]),
                                   float(t.params["eps"]), f"tensor {t.name!r}")
    return combination(coef, xs, None if t.base is None else t.base.to(torch.float32))


METHODS = (multislerp,)
