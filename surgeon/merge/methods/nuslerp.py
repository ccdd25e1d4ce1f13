"""NuSLERP: SLERP between two models with weights, row-wise or whole-tensor,
optionally of task vectors.

Semantics of mergekit 0.1.5's ``nuslerp`` (``merge_methods/nuslerp.py``):

- exactly two models besides the (optional) base, each with a ``weight``;
  the interpolation factor is ``t = w_1 / (w_0 + w_1)`` (``t = 0`` gives the
  first model, 1 the second);
- with a base, the two *task vectors* ``v_i = w_i - base`` are interpolated
  and the base added back; without one, the models themselves;
- ``nuslerp_flatten: true`` (mergekit's default) treats each tensor as one
  vector; ``false`` interpolates vectors along the last dimension (rows of a
  2-D weight), or, with ``nuslerp_row_wise: true``, along the first dimension
  (columns of a 2-D weight: mergekit transposes dim 0 to the end). A 1-D
  tensor is one vector either way;
- per vector, with ``cos`` the cosine between ``v_0`` and ``v_1`` (each norm
  clamped below at 1e-7, the cosine to [-1, 1]): if ``1 - cos^2 <= 1e-16``
  (colinear) the result is ``(1 - t) v_0 + t v_1``; otherwise, with ``theta =
  acos(cos)``, ``(sin((1 - t) theta) v_0 + sin(t theta) v_1) / sin(theta)``.

One deliberate difference: mergekit silently uses ``t = 0.5`` when the two
weights sum to (nearly, ``|w_0 + w_1| < 1e-6``) zero, which ignores the
weights the user wrote; surgeon refuses such weights with a message naming
them.

Norms and dot products are summed in float64 (mergekit: in float32 after
normalising), so the kernel (:class:`~surgeon.merge.kernels.nuslerp.NuslerpKernel`)
and this whole-tensor definition agree to float64 rounding.
"""
from __future__ import annotations

from typing import Any

import torch

from ...errors import InvalidInputError
from ..kernels.nuslerp import (
    NuslerpKernel,
    nuslerp_coefficients,
    nuslerp_combine,
    nuslerp_layout,
    nuslerp_sums,
)
from ..method import merge_method
from ..params import Param
from ..tensor import TensorMerge


def nuslerp_t(w0: float, w1: float, where: str) -> float:
    """The interpolation factor ``w1 / (w0 + w1)``; weights summing to zero are refused."""
    total = w0 + w1
    if abs(total) < 1e-6:
        raise InvalidInputError(
            f"{where}: nuslerp weights {w0:g} and {w1:g} sum to zero, so they define no interpolation "
            "factor t = w1 / (w0 + w1) (mergekit silently uses t = 0.5 here); give weights with a non-zero "
            "sum, e.g. equal weights for the midpoint"
        )
    return w1 / total


def nuslerp_tensors(t: float, m0: torch.Tensor, m1: torch.Tensor, base: torch.Tensor | None = None, *,
                    flatten: bool = True, row_wise: bool = False) -> torch.Tensor:
    """NuSLERP of two same-shaped tensors (of their task vectors when ``base``
    is given), float32."""
    shape = tuple(m0.shape)
    f32 = torch.float32
    base32 = None if base is None else base.to(f32)
    v0 = m0.to(f32) - base32 if base32 is not None else m0.to(f32)
    v1 = m1.to(f32) - base32 if base32 is not None else m1.to(f32)
    if v0.numel() == 0:
        return v0.clone()
    kind, n = nuslerp_layout(shape, flatten, row_wise)
    if kind == "flat":
        a, b = v0.reshape(-1), v1.reshape(-1)
        bb = None if base32 is None else base32.reshape(-1)
        c0, c1 = nuslerp_coefficients(t, *nuslerp_sums(a, b, None))
    else:
        a, b = v0.reshape(-1, n), v1.reshape(-1, n)
        bb = None if base32 is None else base32.reshape(-1, n)
        if kind == "rows":
            c0, c1 = (c.unsqueeze(-1) for c in nuslerp_coefficients(t, *nuslerp_sums(a, b, -1)))
        else:
            c0, c1 = (c.unsqueeze(0) for c in nuslerp_coefficients(t, *nuslerp_sums(a, b, 0)))
    return nuslerp_combine(c0, c1, a, b, bb).reshape(shape)


def _weights_t(name: str, model_params: list[dict[str, Any]]) -> float:
    return nuslerp_t(float(model_params[0]["weight"]), float(model_params[1]["weight"]), f"tensor {name!r}")


def nuslerp_kernel(meta: TensorMerge) -> NuslerpKernel | None:
    if len(meta.model_params) != 2 or meta.numel == 0:
        return None  # the whole-tensor path gives the clear error / the empty result
    return NuslerpKernel(meta, _weights_t(meta.name, meta.model_params))


@merge_method(
    "nuslerp",
    params=[
        Param("weight", float, per_model=True,
              help="the model's weight; t = w1 / (w0 + w1) (the two must not sum to zero)"),
        Param("nuslerp_flatten", bool, default=True,
              help="interpolate each tensor as one vector (false: one vector per row, or per column)"),
        Param("nuslerp_row_wise", bool, default=False,
              help="with nuslerp_flatten false: vectors along the first dimension (columns) instead of rows"),
    ],
    needs_base=False,
    min_models=2,
    max_models=2,
    paper="mergekit's nuslerp (SLERP: Shoemake 1985)",
    mergekit_name="nuslerp",
    kernel=nuslerp_kernel,
)
def nuslerp(t: TensorMerge) -> torch.Tensor:
    """Spherical interpolation of two models (or their task vectors, with a base) at t = w1 / (w0 + w1)."""
    if len(t.models) != 2:
        raise InvalidInputError(f"tensor {t.name!r}: nuslerp merges exactly 2 models besides the base, "
                                f"got {len(t.models)}")
    ref = t.models[0]
    for x in (t.models[1], t.base):
        if x is not None and x.shape != ref.shape:
            raise InvalidInputError(
                f"tensor {t.name!r}: nuslerp: shapes differ: {tuple(ref.shape)} vs {tuple(x.shape)}")
    return nuslerp_tensors(_weights_t(t.name, t.model_params), t.models[0], t.models[1], t.base,
                           flatten=bool(t.params["nuslerp_flatten"]), row_wise=bool(t.params["nuslerp_row_wise"]))


METHODS = (nuslerp,)
