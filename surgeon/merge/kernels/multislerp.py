"""Multi-SLERP's arithmetic and kernel: coefficients from the inputs' Gram matrix.

The definition is :func:`surgeon.merge.methods.multislerp.multislerp`. Every
quantity of the method is a function of the Gram matrix ``<x_i, x_j>`` of
its vectors, so the kernel sums that matrix (float64) in one pass over the
tensor's blocks and then writes ``sum_i c_i x_i`` (+ base) block by block.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ...errors import InvalidInputError
from ..tensor import TensorMerge
from . import gram_compiled
from ._raw import raw_inputs, raw_view
from .base import Kernel, PieceInputs

F64 = torch.float64


def gram(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``G[i, j] = <x_i, x_j>`` summed in float64 (flattened inputs; a CPU k x k matrix)."""
    k = len(xs)
    g = torch.zeros(k, k, dtype=F64)
    flat = [x.reshape(-1) for x in xs]
    for i in range(k):
        for j in range(i, k):
            g[i, j] = g[j, i] = float((flat[i] * flat[j]).sum(dtype=F64))
    return g


def multislerp_coefficients(g: torch.Tensor, weights: Sequence[float], normalize: bool, eps: float,
                            where: str) -> list[float]:
    """``c`` with ``multislerp = sum_i c_i x_i`` (+ base), from the Gram matrix of the ``x_i``:
    ``c_i = w_i / (n_i + eps) * sum_j w_j n_j / |sum_j w_j u_j|``; when that mean
    direction is shorter than ``eps``, two models fall back to their weighted sum
    (mergekit's fallback) and more are refused."""
    w = [float(x) for x in weights]
    if normalize:
        total = sum(w)
        if abs(total) < 1e-12:
            raise InvalidInputError(f"{where}: multislerp weights {w} sum to zero and normalize_weights is on; "
                                    "give weights with a non-zero sum (or normalize_weights: false)")
        w = [x / total for x in w]
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(len(w))]
    a = torch.tensor([wi / (ni + eps) for wi, ni in zip(w, norms)], dtype=F64)
    mean_norm = math.sqrt(max(float(a @ g @ a), 0.0))
    if mean_norm < eps:
        if len(w) == 2:
            return w
        raise InvalidInputError(
            f"{where}: multislerp: the weighted mean of the models' directions is zero (antipodal models whose "
            "weights cancel); use different weights"
        )
    avg_norm = sum(wi * ni for wi, ni in zip(w, norms))
    return (a * (avg_norm / mean_norm)).tolist()


def combination(coef: Sequence[float], xs: Sequence[torch.Tensor], base: torch.Tensor | None = None
                ) -> torch.Tensor:
    """``sum_i coef_i xs_i`` (+ base), float32."""
    out = xs[0] * coef[0]
    for c, x in zip(coef[1:], xs[1:]):
        out.add_(x, alpha=c)
    if base is not None:
        out += base
    return out


def multislerp_vectors(t: TensorMerge) -> list[torch.Tensor]:
    """The interpolated vectors: the task vectors with a base, else the models (float32)."""
    xs = [m.to(torch.float32) for m in t.models]
    if t.base is not None:
        base = t.base.to(torch.float32)
        xs = [x - base for x in xs]
    return xs


class MultislerpKernel(Kernel):
    """Multi-SLERP streamed: one pass sums the Gram matrix, then each block is
    ``sum_i c_i x_i`` (+ base)."""

    stat_passes = 1

    def __init__(self, meta: TensorMerge):
        self.name = meta.name
        self.weights = [float(p["weight"]) for p in meta.model_params]
        self.normalize = bool(meta.params["normalize_weights"])
        self.eps = float(meta.params["eps"])
        self.g: torch.Tensor | None = None
        self.coef: list[float] | None = None

    def observe(self, pass_no: int, blk: TensorMerge) -> None:
        g = gram(multislerp_vectors(blk))
        self.g = g if self.g is None else self.g + g

    def end_pass(self, pass_no: int) -> None:
        assert self.g is not None
        self.coef = multislerp_coefficients(self.g, self.weights, self.normalize, self.eps, f"tensor {self.name!r}")

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        assert self.coef is not None
        return combination(self.coef, multislerp_vectors(blk), blk.base)

    # -- the compiled loops (gram_compiled), on whole pieces in their stored dtype ----------------
    def observe_raw(self, pass_no: int, piece: PieceInputs) -> bool:
        raw = raw_inputs(piece.base, piece.models) if gram_compiled.available() else None
        if raw is None:
            return False
        g = np.zeros((len(raw[1]), len(raw[1])), dtype=np.float64)
        gram_compiled.gram_sums(raw[1], raw[0], g)
        self.g = torch.from_numpy(g) if self.g is None else self.g + torch.from_numpy(g)
        return True

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        raw = raw_inputs(piece.base, piece.models) if gram_compiled.available() else None
        o = raw_view(out)
        if raw is None or o is None:
            return None
        assert self.coef is not None
        return gram_compiled.combine(raw[1], raw[0], self.coef, o)
