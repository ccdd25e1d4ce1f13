"""Karcher mean: the Riemannian (Fréchet) mean of the models' directions on the
hypersphere, scaled to their mean norm.

Karcher, 1977, "Riemannian center of mass and mollifier smoothing"; for model
merging arXiv 2603.04972 (mergekit's reference). Semantics of mergekit
0.1.5's ``karcher`` (``merge_methods/karcher.py``):

Every model counts with the same weight ``1 / k``. mergekit ignores the
base role for this method and merges its base as one more input (at its
place among the models, or last); surgeon merges the ``models`` and treats a
``base`` as a template only (as ``linear`` does), and the import of a
mergekit config lists the base among the models, in mergekit's order.
Each tensor is one vector per model, ``x_i``, with norm ``n_i`` and unit
vector ``u_i``. Models with ``n_i <= tol`` are left out of the direction
(all of them: the result is zero).
Starting from the normalised Euclidean mean of the units (the first unit if
that mean is shorter than ``tol``), up to ``max_iter`` gradient steps:
``theta_i = acos(<m, u_i>)``, the tangent ``T = sum_i alpha_i theta_i /
sin(theta_i) (u_i - <m, u_i> m)`` over inputs with ``theta_i >= tol``; stop
when ``|T| < tol``; else ``m <- cos|T| m + sin|T| T / |T|``, renormalised.
The result is ``m`` times the mean norm ``sum_i n_i / k`` (all models,
including those left out of the direction).

This reference iterates on the vectors in float64 (mergekit: float32). The
kernel (:class:`~surgeon.merge.kernels.karcher.KarcherKernel`) runs the same
iteration on coefficients from one pass of Gram-matrix sums; the two agree
to float64 rounding.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ...errors import InvalidInputError
from ..kernels.karcher import KarcherKernel, karcher_inputs
from ..method import merge_method
from ..params import Param
from ..tensor import TensorMerge

F64 = torch.float64


def karcher_vectors(xs: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The Karcher mean of whole tensors, iterated on the vectors in float64; float32 result."""
    shape = xs[0].shape
    if len(xs) == 1:
        return xs[0].to(torch.float32, copy=True)
    vs = [x.reshape(-1).to(F64) for x in xs]
    norms = [float(torch.linalg.vector_norm(v)) for v in vs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros(shape, dtype=torch.float32, device=xs[0].device)
    alpha = 1.0 / len(valid)
    units = [vs[i] / norms[i] for i in valid]
    mean = sum(alpha * u for u in units)
    mn = float(torch.linalg.vector_norm(mean))
    mean = units[0].clone() if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            dot = min(max(float(mean @ u), -1.0), 1.0)
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += (alpha * theta / math.sin(theta)) * (u - dot * mean)
        tn = float(torch.linalg.vector_norm(tangent))
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        un = float(torch.linalg.vector_norm(mean))
        if un > tol:
            mean = mean / un
    scale = sum(norms) / len(xs)
    return (scale * mean).to(torch.float32).reshape(shape)


def karcher_kernel(meta: TensorMerge) -> KarcherKernel | None:
    if len(meta.model_params) < 2 or meta.numel == 0:
        return None  # one input is returned as it is
    return KarcherKernel(meta)


@merge_method(
    "karcher",
    params=[
        Param("max_iter", int, default=10, min=0, help="most gradient steps of the mean on the sphere"),
        Param("tol", float, default=1e-5, min=0.0,
              help="stop when the tangent step is shorter; inputs with a smaller norm are left out of the direction"),
    ],
    needs_base=False,
    min_models=1,
    paper="Karcher 1977, Riemannian center of mass; arXiv 2603.04972; mergekit's karcher",
    mergekit_name="karcher",
    kernel=karcher_kernel,
)
def karcher(t: TensorMerge) -> torch.Tensor:
    """Equal-weight Karcher mean of the models on the sphere, scaled to their mean norm (a base is a template)."""
    xs = karcher_inputs(t)
    if not xs:
        raise InvalidInputError(f"tensor {t.name!r}: karcher needs at least one model")
    for x in xs[1:]:
        if x.shape != xs[0].shape:
            raise InvalidInputError(
                f"tensor {t.name!r}: karcher: shapes differ: {tuple(xs[0].shape)} vs {tuple(x.shape)}")
    return karcher_vectors(xs, int(t.params["max_iter"]), float(t.params["tol"]))


METHODS = (karcher,)
