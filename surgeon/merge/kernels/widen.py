"""WIDEN's kernel on row pieces: one pass of column statistics, then the weighted merge.

The definition is :func:`surgeon.merge.methods.widen.widen`.
"""
from __future__ import annotations

import torch

from ..arith import column_weights
from ..tensor import TensorMerge
from . import widen_compiled
from ._raw import based_inputs, raw_view
from .base import Kernel, PieceInputs


class WidenKernel(Kernel):
    """WIDEN on row pieces: one statistic pass accumulates each column's
    squared norms and base dot products (float64 sums over row blocks; the
    embedding, whose "columns" are its rows, gets them per row), ``end_pass``
    turns them into weights with :func:`column_weights` as the whole-matrix
    path does, and the merge pass adds the weighted deltas. The float64 sums
    differ from the whole-matrix ones only in float64 rounding."""

    stat_passes = 1

    def __init__(self, meta: TensorMerge):
        self.meta = meta
        shape = meta.shape
        self.rows = int(shape[0])
        self.cols = meta.numel // self.rows if self.rows else 0
        self.align = max(1, self.cols)
        self.by_row = meta.role == "embedding" and len(shape) == 2
        self.ratio = float(meta.params["above_average_value_ratio"])
        self.calib = float(meta.params["score_calibration_value"])
        n_models = len(meta.model_params)
        n = self.rows if self.by_row else self.cols
        # compiled loops on CPU (surgeon.merge.kernels.widen_compiled)
        self.fused = meta.device.type == "cpu" and widen_compiled.available()
        f64 = dict(dtype=torch.float64, device=meta.device)
        self.bb = torch.zeros(n, **f64)
        self.mm, self.mb = torch.zeros((n_models, n), **f64), torch.zeros((n_models, n), **f64)
        self.weights: torch.Tensor | None = None

    def observe(self, pass_no: int, blk: TensorMerge) -> None:
        if self.fused:
            widen_compiled.add_sums(blk.base, blk.models, self.cols, self.by_row, blk.offset // max(1, self.cols),
                                  self.bb, self.mm, self.mb)
            return
        b = blk.base.view(-1, self.cols)
        dim = 1 if self.by_row else 0
        r0 = blk.offset // self.cols
        sl = slice(r0, r0 + b.shape[0]) if self.by_row else slice(None)
        f64 = torch.float64
        self.bb[sl] += (b * b).sum(dim, dtype=f64)
        for i, m in enumerate(blk.models):
            m = m.view(-1, self.cols)
            self.mm[i, sl] += (m * m).sum(dim, dtype=f64)
            self.mb[i, sl] += (m * b).sum(dim, dtype=f64)

    def observe_raw(self, pass_no: int, piece: PieceInputs) -> bool:
        """Column (or, for the embedding, row) sums of a whole piece from its stored dtype."""
        raw = based_inputs(piece.base, piece.models, self.fused)
        if raw is None:
            return False
        widen_compiled.add_sums(raw[0], raw[1], self.cols, self.by_row, piece.start // max(1, self.cols),
                              self.bb, self.mm, self.mb)
        return True

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        """A whole piece merged from and to its stored dtypes (None: float32 blocks needed)."""
        raw, o = based_inputs(piece.base, piece.models, self.fused), raw_view(out)
        if raw is None or o is None:
            return None
        assert self.weights is not None
        return widen_compiled.merge_raw(raw[0], raw[1], self.weights, self.cols, o, self.by_row,
                                      piece.start // max(1, self.cols))

    def end_pass(self, pass_no: int) -> None:
        self.weights = column_weights(self.bb.sqrt(), list(self.mm.sqrt()), list(self.mb), self.ratio,
                                      self.calib).contiguous()
        self.bb = self.mm = self.mb = None  # type: ignore[assignment]

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        assert self.weights is not None
        if self.fused:
            return widen_compiled.merge_rows(blk.base, blk.models, self.weights, self.cols, self.by_row,
                                           blk.offset // max(1, self.cols))
        b = blk.base.view(-1, self.cols)
        r0 = blk.offset // self.cols
        out = b.clone()
        for i, m in enumerate(blk.models):
            w = self.weights[i, r0:r0 + b.shape[0]].unsqueeze(1) if self.by_row else self.weights[i].unsqueeze(0)
            out.add_((m.view(-1, self.cols) - b).mul_(w))
        return out.reshape(-1)
