"""Model Stock's kernel: one pass of float64 offset statistics (or none, per row), then the mix.

The definition is :func:`surgeon.merge.methods.model_stock.model_stock`.
"""
from __future__ import annotations

import torch

from ..arith import stock_combine, stock_ratio, stock_stats
from ..tensor import TensorMerge
from .base import Kernel


class ModelStockKernel(Kernel):
    """Model Stock streamed. One ratio per tensor: a pass sums the offsets'
    squared norms and pairwise products (float64) over the blocks. One per
    row (``filter_wise``): blocks hold whole rows, so each block computes its
    rows' ratios itself and no pass is needed."""

    def __init__(self, meta: TensorMerge):
        self.n = len(meta.model_params)
        self.filter_wise = bool(meta.params["filter_wise"])
        shape = meta.shape
        self.cols = int(shape[-1]) if len(shape) >= 2 else meta.numel
        self.align = self.cols if self.filter_wise else 1
        self.stat_passes = 0 if self.filter_wise else 1
        self.sq: list[torch.Tensor] | None = None
        self.dots: dict[tuple[int, int], torch.Tensor] = {}
        self.ratio: torch.Tensor | None = None

    def observe(self, pass_no: int, blk: TensorMerge) -> None:
        sq, dots = stock_stats(blk.base, list(blk.models))
        if self.sq is None:
            self.sq, self.dots = sq, dots
        else:
            self.sq = [a + b for a, b in zip(self.sq, sq)]
            self.dots = {k: v + dots[k] for k, v in self.dots.items()}

    def end_pass(self, pass_no: int) -> None:
        assert self.sq is not None
        self.ratio = stock_ratio(self.n, self.sq, self.dots)

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        if self.filter_wise:
            w0 = blk.base.view(-1, self.cols)
            ws = [m.view(-1, self.cols) for m in blk.models]
            sq, dots = stock_stats(w0, ws)
            return stock_combine(stock_ratio(self.n, sq, dots), w0, ws).reshape(-1)
        assert self.ratio is not None
        return stock_combine(self.ratio, blk.base, list(blk.models))
