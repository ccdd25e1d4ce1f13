"""SLERP: spherical linear interpolation between two models.

Shoemake, 1985, "Animating rotation with quaternion curves" (SIGGRAPH);
popularised for model merging by mergekit. Semantics of mergekit's
``slerp``:

Each tensor is flattened to one vector per model; ``v0`` is the base (the
``t = 0`` end) and ``v1`` the other model. With ``dot`` the cosine between
them (each norm below 1e-8 treated as 1, the dot clamped to [-1, 1]), if
``|dot| > 0.9995`` (nearly colinear or antipodal) the result is the linear
interpolation ``(1 - t) v0 + t v1``; otherwise, with ``theta = acos(dot)``,
``sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1``.
The un-normalised vectors are interpolated, so norms interpolate too. Norms
and the dot product are summed in float64 (mergekit: in the tensor's dtype),
so the engine's streamed computation (:class:`SlerpKernel`) and a
whole-tensor one agree to float64 rounding.

Exactly two models: the base and one other (per tensor ``t`` may follow
layer gradients or name filters, as in mergekit).
"""
from __future__ import annotations

import torch

from ...errors import InvalidInputError
from ..arith import slerp_coefficients, slerp_sums
from ..kernels.slerp import SlerpKernel
from ..method import merge_method
from ..params import Param
from ..tensor import TensorMerge


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """SLERP of two same-shaped float tensors as whole vectors (float32)."""
    a = v0.reshape(-1).float()
    b = v1.reshape(-1).float()
    if a.numel() == 0:
        return v0.float().clone()
    ca, cb = slerp_coefficients(t, *slerp_sums(a, b))
    out = torch.mul(a, ca)
    out.add_(b, alpha=cb)
    return out.reshape(v0.shape)


def slerp_kernel(meta: TensorMerge) -> SlerpKernel | None:
    if not meta.has_base or len(meta.model_params) != 1 or meta.numel == 0:
        return None  # the whole-tensor path gives the clear error / the empty result
    return SlerpKernel(meta)


@merge_method(
    "slerp",
    params=[Param("t", float, min=0.0, max=1.0, help="interpolation factor: 0 gives the base, 1 the other model")],
    needs_base=True,
    min_models=1,
    max_models=1,
    paper="Shoemake 1985, Animating rotation with quaternion curves; mergekit's slerp",
    mergekit_name="slerp",
    kernel=slerp_kernel,
)
def slerp(t: TensorMerge) -> torch.Tensor:
    """Spherical interpolation from the base (t=0) to the one other model (t=1); lerp when nearly colinear."""
    n = len(t.models) + (1 if t.base is not None else 0)
    if t.base is None or len(t.models) != 1:
        raise InvalidInputError(
            f"tensor {t.name!r}: slerp merges exactly 2 models (the base, at t=0, and one other), got {n}"
            + ("" if t.base is not None else " and no base")
        )
    if t.models[0].shape != t.base.shape:
        raise InvalidInputError(
            f"tensor {t.name!r}: slerp: shapes differ: {tuple(t.base.shape)} vs {tuple(t.models[0].shape)}"
        )
    return slerp_tensors(float(t.params["t"]), t.base, t.models[0])


METHODS = (slerp,)
