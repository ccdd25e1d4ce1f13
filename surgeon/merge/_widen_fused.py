"""WIDEN's row-block loops compiled: column statistics and the weighted merge.

Why. :class:`surgeon.merge.widen.WidenKernel` spends, per block of 2^18
entries and three models, ~2.2 ms in seven ``(x * y).sum(0, dtype=float64)``
reductions (each a strided float64 reduction over rows plus a float32
product temporary) and ~1.4 ms in the merge's nine elementwise ops, on the
development CPU. Here one numba loop per pass walks each row once, adding
every column's products into float64 accumulators (the inner loops run along
contiguous columns, so they vectorise).

Exactness. Products are rounded to float32 before the float64 sums, as
torch's ``(x * y).sum(dtype=float64)``; only the order of the float64
additions differs, which moves the sums by float64 rounding and cannot
change the column ranks the weights come from except between columns equal
to ~1e-16. The merge does torch's float32 operations in torch's order
(``out + (m - b) * w`` per model), so with equal weights it is bit-identical.
Only the column orientation is compiled; the input embedding (statistics per
row) keeps the torch path.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch

from ._hist import compiled


@compiled
def _kernels(jit: Any) -> Any:
    """WIDEN's row-block loops."""

    @jit
    def column_sums(b, ms, cols, bb, mm, mb):  # pragma: no cover - compiled
        rows = b.shape[0] // cols
        for r in range(rows):
            brow = b[r * cols:(r + 1) * cols]
            for j in range(cols):
                x = brow[j]
                bb[j] += np.float64(x * x)
            for i in range(len(ms)):
                mrow = ms[i][r * cols:(r + 1) * cols]
                mmi = mm[i]
                mbi = mb[i]
                for j in range(cols):
                    y = mrow[j]
                    mmi[j] += np.float64(y * y)
                    mbi[j] += np.float64(y * brow[j])

    @jit
    def merge(b, ms, w, cols, out):  # pragma: no cover - compiled
        rows = b.shape[0] // cols
        for r in range(rows):
            brow = b[r * cols:(r + 1) * cols]
            orow = out[r * cols:(r + 1) * cols]
            for j in range(cols):
                orow[j] = brow[j]
            for i in range(len(ms)):
                mrow = ms[i][r * cols:(r + 1) * cols]
                wi = w[i]
                for j in range(cols):
                    orow[j] = orow[j] + (mrow[j] - brow[j]) * wi[j]

    return SimpleNamespace(column_sums=column_sums, merge=merge)


def available() -> bool:
    return _kernels() is not None


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(-1).numpy()


def add_column_sums(base: torch.Tensor, models: Sequence[torch.Tensor], cols: int, bb: torch.Tensor,
                    mm: torch.Tensor, mb: torch.Tensor) -> None:
    """``bb += sum_rows b*b``, ``mm[i] += sum_rows m_i*m_i``, ``mb[i] += sum_rows m_i*b``
    (float64 accumulators; blocks of whole rows of ``cols`` columns)."""
    _kernels().column_sums(_np(base), tuple(_np(m) for m in models), cols, bb.numpy(), mm.numpy(), mb.numpy())


def merge_rows(base: torch.Tensor, models: Sequence[torch.Tensor], weights: torch.Tensor, cols: int) -> torch.Tensor:
    """``base + sum_i (m_i - base) * weights[i]`` per row (float32, column weights)."""
    out = torch.empty(base.numel(), dtype=torch.float32)
    _kernels().merge(_np(base), tuple(_np(m) for m in models), weights.numpy(), cols, out.numpy())
    return out
