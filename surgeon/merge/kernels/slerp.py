"""SLERP's kernel: one pass of float64 norms and dot product, then ``c0 v0 + c1 v1``.

The definition is :func:`surgeon.merge.methods.slerp.slerp`. With numba both
passes take whole pieces in their stored dtype
(:mod:`surgeon.merge.kernels.gram_compiled`); the torch block path below is
the fallback and the definition those loops follow.
"""
from __future__ import annotations

import numpy as np
import torch

from ..arith import slerp_coefficients, slerp_sums
from ..tensor import TensorMerge
from . import gram_compiled
from ._raw import raw_inputs, raw_view
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
    def _raw(self, piece: PieceInputs) -> tuple[np.ndarray, ...] | None:
        """(base, other) as one tuple of one raw dtype (the compiled loops index it), or None."""
        if piece.base is None or not gram_compiled.available():
            return None
        raw = raw_inputs(None, [piece.base, *piece.models])
        return None if raw is None else raw[1]

    def observe_raw(self, pass_no: int, piece: PieceInputs) -> bool:
        raw = self._raw(piece)
        if raw is None:
            return False
        g = np.zeros((2, 2), dtype=np.float64)
        gram_compiled.gram_sums(raw, None, g)  # the two inputs themselves, no task vectors
        for i, v in enumerate((g[0, 0], g[1, 1], g[0, 1])):
            self.sums[i] += float(v)
        return True

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        raw, o = self._raw(piece), raw_view(out)
        if raw is None or o is None:
            return None
        assert self.coef is not None
        return gram_compiled.combine(raw, None, list(self.coef), o)  # base c0, then + c1 other fused
