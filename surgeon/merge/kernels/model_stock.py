"""Model Stock's kernel: one pass of float64 offset statistics (or none, per row), then the mix.

The definition is :func:`surgeon.merge.methods.model_stock.model_stock`.
With numba and one ratio per tensor, both passes take whole pieces in their
stored dtype (the offsets' Gram matrix: :mod:`surgeon.merge.kernels.gram_compiled`;
the mix: :mod:`surgeon.merge.kernels.model_stock_compiled`); the torch
block path below is the fallback and the definition those loops follow.
"""
from __future__ import annotations

import numpy as np
import torch

from ..arith import stock_combine, stock_ratio, stock_stats
from ..tensor import TensorMerge
from . import gram_compiled, model_stock_compiled
from ._raw import based_inputs, raw_view
from .base import Kernel, PieceInputs


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

    # -- the compiled loops (one ratio per tensor), on whole pieces in their stored dtype ----------
    def _raw(self, piece: PieceInputs) -> tuple[np.ndarray, tuple[np.ndarray, ...]] | None:
        return based_inputs(piece.base, piece.models, not self.filter_wise and model_stock_compiled.available())

    def observe_raw(self, pass_no: int, piece: PieceInputs) -> bool:
        raw = self._raw(piece)
        if raw is None:
            return False
        g = np.zeros((self.n, self.n), dtype=np.float64)  # the offsets' Gram matrix
        gram_compiled.gram_sums(raw[1], raw[0], g)
        pairs = [(i, j) for i in range(self.n) for j in range(i + 1, self.n)]  # stock_stats' order
        sq_t = [torch.tensor(float(g[i, i]), dtype=torch.float64) for i in range(self.n)]
        dots_t = {(i, j): torch.tensor(float(g[i, j]), dtype=torch.float64) for i, j in pairs}
        if self.sq is None:
            self.sq, self.dots = sq_t, dots_t
        else:
            self.sq = [a + b for a, b in zip(self.sq, sq_t)]
            self.dots = {k: v + dots_t[k] for k, v in self.dots.items()}
        return True

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        raw, o = self._raw(piece), raw_view(out)
        if raw is None or o is None:
            return None
        assert self.ratio is not None
        return model_stock_compiled.stock_mix(raw[0], raw[1], float(self.ratio.reshape(-1)[0]), o)
