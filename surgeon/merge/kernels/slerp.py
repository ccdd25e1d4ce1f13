"""SLERP's kernel: one pass of float64 norms and dot product, then ``c0 v0 + c1 v1``.

The definition is :func:`surgeon.merge.methods.slerp.slerp`. With numba both
passes take whole pieces in their stored dtype
(:mod:`surgeon.merge.kernels.slerp_compiled`); the torch block path below is
the fallback and the definition those loops follow.
"""
from __future__ import annotations

import numpy as np
import torch

from ..arith import slerp_coefficients, slerp_sums
from ..tensor import TensorMerge
from . import slerp_compiled
from ._raw import based_inputs, raw_view
from .base import Kernel, PieceInputs


class SlerpKernel(Kernel):
    """SLERP streamed: one pass sums ``|v0|^2, |v1|^2, <v0, v1>`` over the
    blocks (float64), then each block is ``c0 v0 + c1 v1``."""

    stat_passes = 1

    def __init__(self, meta: TensorMerge):
        self.t = float(meta.params["t"])
        self.sums = [0.0, 0.0, 0.0]
        self.coef: tuple[float, float] | None = None

    def observe(self, pass_no: int, blk: TensorMerge) -> None:
        for i, v in enumerate(slerp_sums(blk.base, blk.models[0])):
            self.sums[i] += v

    def end_pass(self, pass_no: int) -> None:
        self.coef = slerp_coefficients(self.t, *self.sums)

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        assert self.coef is not None
        out = torch.mul(blk.base, self.coef[0])
        return out.add_(blk.models[0], alpha=self.coef[1])

    # -- the compiled loops, on whole pieces in their stored dtype -------------------------------
    def _raw(self, piece: PieceInputs) -> tuple[np.ndarray, tuple[np.ndarray, ...]] | None:
        return based_inputs(piece.base, piece.models, slerp_compiled.available())

    def observe_raw(self, pass_no: int, piece: PieceInputs) -> bool:
        raw = self._raw(piece)
        if raw is None:
            return False
        sums = np.zeros(3, dtype=np.float64)
        slerp_compiled.task_vector_sums(raw[0], raw[1][0], None, sums)
        for i, v in enumerate(sums.tolist()):
            self.sums[i] += v
        return True

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        raw, o = self._raw(piece), raw_view(out)
        if raw is None or o is None:
            return None
        assert self.coef is not None
        return slerp_compiled.slerp_mix(raw[0], raw[1][0], self.coef[0], self.coef[1], o)
