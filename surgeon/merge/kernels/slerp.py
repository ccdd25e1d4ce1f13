"""SLERP's kernel: one pass of float64 norms and dot product, then ``c0 v0 + c1 v1``.

The definition is :func:`surgeon.merge.methods.slerp.slerp`.
"""
from __future__ import annotations

import torch

from ..arith import slerp_coefficients, slerp_sums
from ..tensor import TensorMerge
from .base import Kernel


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
