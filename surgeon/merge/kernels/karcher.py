"""The Karcher mean's kernel: the iteration on coefficients, from the Gram matrix.

The definition is :func:`surgeon.merge.methods.karcher.karcher` (which
iterates on the vectors themselves). The mean always lies in the span of the
inputs' unit vectors, so the iteration runs on its coefficients ``b`` in
that basis: ``<m, u_j> = (G_u b)_j`` and ``|m|^2 = b^T G_u b`` with ``G_u`` the
Gram matrix of the unit vectors. One float64 pass over the blocks sums the
Gram matrix; then each block is ``sum_i c_i x_i``: bounded memory whatever
the tensor size.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..tensor import TensorMerge
from . import gram_compiled
from ._raw import raw_inputs, raw_view
from .base import Kernel, PieceInputs
from .multislerp import combination, gram

F64 = torch.float64


def karcher_inputs(t: TensorMerge) -> list[torch.Tensor]:
    """The merged inputs: the models (a base is only a template; see the method's docstring)."""
    return list(t.models)


def karcher_coefficients(g: torch.Tensor, max_iter: int = 10, tol: float = 1e-5) -> list[float]:
    """``c`` with ``karcher = sum_i c_i x_i``, from the Gram matrix ``g`` of the inputs."""
    k = g.shape[0]
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(k)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return [0.0] * k
    nv = torch.tensor([norms[i] for i in valid], dtype=F64)
    gu = g[valid][:, valid] / torch.outer(nv, nv)

    def norm(b: torch.Tensor) -> float:
        return math.sqrt(max(float(b @ gu @ b), 0.0))

    alpha = 1.0 / len(valid)
    b = torch.full((len(valid),), alpha, dtype=F64)
    mn = norm(b)
    if mn < tol:
        b = torch.zeros_like(b)
        b[0] = 1.0
    else:
        b = b / mn
    for _ in range(max_iter):
        dots = (gu @ b).clamp(-1.0, 1.0)
        tangent = torch.zeros_like(b)
        for j in range(len(valid)):
            dot = float(dots[j])
            theta = math.acos(dot)
            if theta < tol:
                continue
            f = alpha * theta / math.sin(theta)
            tangent[j] += f
            tangent -= (f * dot) * b
        tn = norm(tangent)
        if tn < tol:
            break
        b = math.cos(tn) * b + (math.sin(tn) / tn) * tangent
        un = norm(b)
        if un > tol:
            b = b / un
    scale = sum(norms) / k
    c = [0.0] * k
    for j, i in enumerate(valid):
        c[i] = scale * float(b[j]) / norms[i]
    return c


class KarcherKernel(Kernel):
    """Karcher mean streamed: one pass sums the inputs' Gram matrix (float64),
    then each block is ``sum_i c_i x_i``."""

    stat_passes = 1

    def __init__(self, meta: TensorMerge):
        self.max_iter = int(meta.params["max_iter"])
        self.tol = float(meta.params["tol"])
        self.g: torch.Tensor | None = None
        self.coef: list[float] | None = None

    def observe(self, pass_no: int, blk: TensorMerge) -> None:
        g = gram(karcher_inputs(blk))
        self.g = g if self.g is None else self.g + g

    def end_pass(self, pass_no: int) -> None:
        assert self.g is not None
        self.coef = karcher_coefficients(self.g, self.max_iter, self.tol)

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        assert self.coef is not None
        return combination(self.coef, karcher_inputs(blk))

    # -- the compiled loops (gram_compiled), on whole pieces in their stored dtype ----------------
    def observe_raw(self, pass_no: int, piece: PieceInputs) -> bool:
        raw = raw_inputs(None, piece.models) if gram_compiled.available() else None  # the base is no input
        if raw is None:
            return False
        g = np.zeros((len(raw[1]), len(raw[1])), dtype=np.float64)
        gram_compiled.gram_sums(raw[1], None, g)
        self.g = torch.from_numpy(g) if self.g is None else self.g + torch.from_numpy(g)
        return True

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        raw = raw_inputs(None, piece.models) if gram_compiled.available() else None
        o = raw_view(out)
        if raw is None or o is None:
            return None
        assert self.coef is not None
        return gram_compiled.combine(raw[1], None, self.coef, o)
