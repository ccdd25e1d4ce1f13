"""NuSLERP's arithmetic and kernel: per-vector coefficients from float64 sums.

The definition is :func:`surgeon.merge.methods.nuslerp.nuslerp`. A tensor is
cut into vectors one of three ways (:func:`nuslerp_layout`): one flat vector
(one pass summing ``|v_0|^2, |v_1|^2, <v_0, v_1>``), rows along the last
dimension (no pass: blocks hold whole rows), or columns along the first
dimension (one pass summing per column). With numba, a flat vector's pass
and mix take whole pieces in their stored dtype
(:mod:`surgeon.merge.kernels.gram_compiled`); the torch block path below is
the fallback and the definition those loops follow.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..tensor import TensorMerge
from . import gram_compiled
from ._raw import raw_inputs, raw_view
from .base import Kernel, PieceInputs

NORM_CLAMP = 1e-7
COLINEAR_EPS = 1e-8
F64 = torch.float64


def nuslerp_coefficients(t: float, aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per vector, ``(c0, c1)`` with ``nuslerp = c0 v0 + c1 v1``, from float64
    ``|v0|^2``, ``|v1|^2`` and ``<v0, v1>`` (any matching shapes): norms
    clamped below at 1e-7, the cosine to [-1, 1]; lerp where
    ``1 - cos^2 <= 1e-16``, else ``sin((1-t) theta) / sin theta`` and
    ``sin(t theta) / sin theta``."""
    na = aa.sqrt().clamp(min=NORM_CLAMP)
    nb = bb.sqrt().clamp(min=NORM_CLAMP)
    cos = (ab / (na * nb)).clamp(-1.0, 1.0)
    colinear = (1 - cos * cos) <= COLINEAR_EPS ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    c0 = torch.where(colinear, torch.full_like(cos, 1.0 - t), torch.sin((1.0 - t) * theta) / s)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / s)
    return c0, c1


def nuslerp_layout(shape: tuple[int, ...], flatten: bool, row_wise: bool) -> tuple[str, int]:
    """How a tensor of ``shape`` is cut into vectors: ``("flat", numel)`` one
    vector; ``("rows", cols)`` vectors along the last dimension; ``("cols",
    inner)`` vectors along the first dimension, one per position of the other
    dimensions. A tensor of at most one dimension is one vector."""
    numel = math.prod(shape)
    if flatten or len(shape) <= 1:
        return "flat", numel
    if row_wise:
        return "cols", numel // shape[0]
    return "rows", shape[-1]


def nuslerp_sums(a: torch.Tensor, b: torch.Tensor, dim: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``|a|^2, |b|^2, <a, b>`` in float64, over everything (``dim`` None) or along ``dim``."""
    if dim is None:
        return (a * a).sum(dtype=F64), (b * b).sum(dtype=F64), (a * b).sum(dtype=F64)
    return (a * a).sum(dim, dtype=F64), (b * b).sum(dim, dtype=F64), (a * b).sum(dim, dtype=F64)


def nuslerp_combine(c0: torch.Tensor, c1: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor,
                    base: torch.Tensor | None) -> torch.Tensor:
    """``c0 v0 + c1 v1`` (+ base) in float32."""
    out = v0 * c0.to(torch.float32)
    out += v1 * c1.to(torch.float32)
    if base is not None:
        out += base
    return out


class NuslerpKernel(Kernel):
    """NuSLERP streamed (see the module docstring for the passes)."""

    def __init__(self, meta: TensorMerge, t: float):
        self.t = t
        self.kind, self.n = nuslerp_layout(tuple(meta.shape), bool(meta.params["nuslerp_flatten"]),
                                           bool(meta.params["nuslerp_row_wise"]))
        self.align = 1 if self.kind == "flat" else self.n
        self.stat_passes = 0 if self.kind == "rows" else 1
        self.sums: list[torch.Tensor] | None = None
        self.coef: tuple[torch.Tensor, torch.Tensor] | None = None

    def _vectors(self, blk: TensorMerge) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        m0, m1 = blk.models
        base = blk.base
        v0 = m0 - base if base is not None else m0
        v1 = m1 - base if base is not None else m1
        if self.kind == "flat":
            return v0, v1, base
        shape = (-1, self.n)
        return v0.view(shape), v1.view(shape), None if base is None else base.view(shape)

    def observe(self, pass_no: int, blk: TensorMerge) -> None:
        v0, v1, _ = self._vectors(blk)
        sums = nuslerp_sums(v0, v1, None if self.kind == "flat" else 0)
        self.sums = list(sums) if self.sums is None else [s + x for s, x in zip(self.sums, sums)]

    def end_pass(self, pass_no: int) -> None:
        assert self.sums is not None
        c0, c1 = nuslerp_coefficients(self.t, *self.sums)
        self.coef = (c0.unsqueeze(0), c1.unsqueeze(0)) if self.kind == "cols" else (c0, c1)

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        v0, v1, base = self._vectors(blk)
        if self.kind == "rows":
            c0, c1 = (c.unsqueeze(-1) for c in nuslerp_coefficients(self.t, *nuslerp_sums(v0, v1, -1)))
        else:
            assert self.coef is not None
            c0, c1 = self.coef
        return nuslerp_combine(c0, c1, v0, v1, base).reshape(-1)

    # -- the compiled loops (one flat vector), on whole pieces in their stored dtype --------------
    def _raw(self, piece: PieceInputs) -> tuple[np.ndarray | None, tuple[np.ndarray, ...]] | None:
        if self.kind != "flat" or len(piece.models) != 2 or not gram_compiled.available():
            return None
        return raw_inputs(piece.base, piece.models)

    def observe_raw(self, pass_no: int, piece: PieceInputs) -> bool:
        raw = self._raw(piece)
        if raw is None:
            return False
        g = np.zeros((2, 2), dtype=np.float64)
        gram_compiled.gram_sums(raw[1], raw[0], g)
        got = [torch.tensor(float(v), dtype=F64) for v in (g[0, 0], g[1, 1], g[0, 1])]
        self.sums = got if self.sums is None else [s + x for s, x in zip(self.sums, got)]
        return True

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        raw, o = self._raw(piece), raw_view(out)
        if raw is None or o is None:
            return None
        assert self.coef is not None
        c0, c1 = (float(c.to(torch.float32)) for c in self.coef)  # nuslerp_combine's float32 casts
        return gram_compiled.combine(raw[1], raw[0], [c0, c1], o, fused=False)  # out += v1 * c1: two roundings
