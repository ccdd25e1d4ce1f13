"""WIDEN's row-block loops compiled: column statistics and the weighted merge.

Why. :class:`surgeon.merge.kernels.widen.WidenKernel` spends, per block of 2^18
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
The input embedding's statistics are per row: ``row_sums`` walks each row
once into one float64 sum per row (again in a different order than torch's
reduction), and the merge takes one weight per row. The engine hands whole pieces in their stored
dtype (``WidenKernel.observe_raw``/``merge_raw``): rows are widened from bf16
into a float32 scratch row and the merged row is rounded back to bf16 as
torch would (:mod:`surgeon.merge.kernels._raw`), so no float32 copy of a block is made.
"""
from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from . import _raw
from ._jit import compiled


@compiled
def _kernels(jit: Any) -> Any:
    """WIDEN's row loops, on stored-dtype rows (float32 or bf16 bits: :mod:`surgeon.merge.kernels._raw`)."""
    _raw.register()

    @jit
    def column_sums(b_all, ms, cols, bb, mm, mb):  # pragma: no cover - compiled
        # four rows at a time: each column's four products are added up first, then into its
        # accumulator (a quarter of the accumulators' loads and stores: 1.61 -> 1.42 ns an
        # entry on a 1.1B down_proj, three models); then the rows left over one at a time
        rows = b_all.shape[0] // cols
        b = np.empty((4, cols), np.float32)
        m = np.empty((4, cols), np.float32)
        full = rows - rows % 4
        for r0 in range(0, full, 4):
            for q in range(4):
                _raw.load(b_all[(r0 + q) * cols:(r0 + q + 1) * cols], b[q])
            b0, b1, b2, b3 = b[0], b[1], b[2], b[3]
            for j in range(cols):
                bb[j] += ((np.float64(b0[j] * b0[j]) + np.float64(b1[j] * b1[j]))
                          + np.float64(b2[j] * b2[j])) + np.float64(b3[j] * b3[j])
            for i in range(len(ms)):
                for q in range(4):
                    _raw.load(ms[i][(r0 + q) * cols:(r0 + q + 1) * cols], m[q])
                m0, m1, m2, m3 = m[0], m[1], m[2], m[3]
                mmi = mm[i]
                mbi = mb[i]
                for j in range(cols):
                    mmi[j] += ((np.float64(m0[j] * m0[j]) + np.float64(m1[j] * m1[j]))
                               + np.float64(m2[j] * m2[j])) + np.float64(m3[j] * m3[j])
                for j in range(cols):
                    mbi[j] += ((np.float64(m0[j] * b0[j]) + np.float64(m1[j] * b1[j]))
                               + np.float64(m2[j] * b2[j])) + np.float64(m3[j] * b3[j])
        b0 = b[0]
        m0 = m[0]
        for r in range(full, rows):
            _raw.load(b_all[r * cols:(r + 1) * cols], b0)
            for j in range(cols):
                bb[j] += np.float64(b0[j] * b0[j])
            for i in range(len(ms)):
                _raw.load(ms[i][r * cols:(r + 1) * cols], m0)
                mmi = mm[i]
                mbi = mb[i]
                for j in range(cols):
                    y = m0[j]
                    mmi[j] += np.float64(y * y)
                    mbi[j] += np.float64(y * b0[j])

    @jit
    def row_sums(b_all, ms, cols, r0, bb, mm, mb):  # pragma: no cover - compiled
        # the embedding's orientation: one float64 sum per row (rows r0.. of the tensor)
        rows = b_all.shape[0] // cols
        b = np.empty(cols, np.float32)
        m = np.empty(cols, np.float32)
        # each sum in eight float64 lanes (entry j into lane j % 8), added up at the row's end:
        # one running sum waited on every add (4.45 ns an entry on a 1.1B embedding)
        lanes = np.empty(8, np.float64)
        lm = np.empty(8, np.float64)
        lb = np.empty(8, np.float64)
        c8 = cols - cols % 8
        for r in range(rows):
            _raw.load(b_all[r * cols:(r + 1) * cols], b)
            lanes[:] = 0.0
            for g in range(0, c8, 8):
                for q in range(8):
                    x = b[g + q]
                    lanes[q] += np.float64(x * x)
            for j in range(c8, cols):
                x = b[j]
                lanes[0] += np.float64(x * x)
            bb[r0 + r] += ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
            for i in range(len(ms)):
                _raw.load(ms[i][r * cols:(r + 1) * cols], m)
                lm[:] = 0.0
                lb[:] = 0.0
                for g in range(0, c8, 8):
                    for q in range(8):
                        y = m[g + q]
                        lm[q] += np.float64(y * y)
                        lb[q] += np.float64(y * b[g + q])
                for j in range(c8, cols):
                    y = m[j]
                    lm[0] += np.float64(y * y)
                    lb[0] += np.float64(y * b[j])
                mm[i, r0 + r] += ((lm[0] + lm[1]) + (lm[2] + lm[3])) + ((lm[4] + lm[5]) + (lm[6] + lm[7]))
                mb[i, r0 + r] += ((lb[0] + lb[1]) + (lb[2] + lb[3])) + ((lb[4] + lb[5]) + (lb[6] + lb[7]))

    @jit
    def merge(b_all, ms, w, cols, per_row, r0, out_all):  # pragma: no cover - compiled
        # returns whether every result was finite (_raw.store_checked)
        rows = b_all.shape[0] // cols
        b = np.empty(cols, np.float32)
        m = np.empty(cols, np.float32)
        o = np.empty(cols, np.float32)
        chk = np.zeros(cols, np.float32)
        for r in range(rows):
            _raw.load(b_all[r * cols:(r + 1) * cols], b)
            for j in range(cols):
                o[j] = b[j]
            for i in range(len(ms)):
                _raw.load(ms[i][r * cols:(r + 1) * cols], m)
                wi = w[i]
                if per_row:  # one weight per row (the embedding)
                    wr = wi[r0 + r]
                    for j in range(cols):
                        o[j] = o[j] + (m[j] - b[j]) * wr
                else:        # one weight per column
                    for j in range(cols):
                        o[j] = o[j] + (m[j] - b[j]) * wi[j]
            _raw.store_checked(o, out_all[r * cols:(r + 1) * cols], chk)
        return _raw.all_finite(chk)

    return SimpleNamespace(column_sums=column_sums, row_sums=row_sums, merge=merge)


def available() -> bool:
    return _kernels() is not None


def add_sums(base: Any, models: Sequence[Any], cols: int, by_row: bool, r0: int, bb: torch.Tensor,
             mm: torch.Tensor, mb: torch.Tensor) -> None:
    """Column orientation: ``bb += sum_rows b*b``, ``mm[i] += sum_rows m_i*m_i``,
    ``mb[i] += sum_rows m_i*b``; row orientation (``by_row``): the same sums
    along each row, into entries ``r0..`` (float64 accumulators; whole rows
    of ``cols`` columns). Inputs: float32 CPU tensors, or the stored-dtype
    arrays of :func:`surgeon.merge.kernels._raw.raw_inputs`."""
    if isinstance(base, torch.Tensor):
        base, models = _raw.flat_array(base), tuple(_raw.flat_array(m) for m in models)
    k = _kernels()
    if by_row:
        k.row_sums(base, tuple(models), cols, r0, bb.numpy(), mm.numpy(), mb.numpy())
    else:
        k.column_sums(base, tuple(models), cols, bb.numpy(), mm.numpy(), mb.numpy())


def merge_rows(base: torch.Tensor, models: Sequence[torch.Tensor], weights: torch.Tensor, cols: int,
               by_row: bool = False, r0: int = 0) -> torch.Tensor:
    """``base + sum_i (m_i - base) * weights[i]`` per row (float32; column
    weights, or with ``by_row`` one weight per row from row ``r0``)."""
    out = torch.empty(base.numel(), dtype=torch.float32)
    merge_raw(_raw.flat_array(base), tuple(_raw.flat_array(m) for m in models), weights, cols, out.numpy(), by_row, r0)
    return out


def merge_raw(base: np.ndarray, models: tuple[np.ndarray, ...], weights: torch.Tensor, cols: int,
              out: np.ndarray, by_row: bool = False, r0: int = 0) -> bool:
    """:func:`merge_rows` from and to stored-dtype arrays; returns whether every result was finite."""
    return bool(_kernels().merge(base, tuple(models), weights.numpy(), cols, by_row, r0, out))
