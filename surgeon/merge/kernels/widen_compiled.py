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
        rows = b_all.shape[0] // cols
        b = np.empty(cols, np.float32)
        m = np.empty(cols, np.float32)
        for r in range(rows):
            _raw.load(b_all[r * cols:(r + 1) * cols], b)
            for j in range(cols):
                x = b[j]
                bb[j] += np.float64(x * x)
            for i in range(len(ms)):
                _raw.load(ms[i][r * cols:(r + 1) * cols], m)
                mmi = mm[i]
                mbi = mb[i]
                for j in range(cols):
                    y = m[j]
                    mmi[j] += np.float64(y * y)
                    mbi[j] += np.float64(y * b[j])

    @jit
    def row_sums(b_all, ms, cols, r0, bb, mm, mb):  # pragma: no cover - compiled
        # the embedding's orientation: one float64 sum per row (rows r0.. of the tensor)
        rows = b_all.shape[0] // cols
        b = np.empty(cols, np.float32)
        m = np.empty(cols, np.float32)
        for r in range(rows):
            _raw.load(b_all[r * cols:(r + 1) * cols], b)
            acc = np.float64(0.0)
            for j in range(cols):
                x = b[j]
                acc += np.float64(x * x)
            bb[r0 + r] += acc
            for i in range(len(ms)):
                _raw.load(ms[i][r * cols:(r + 1) * cols], m)
                am = np.float64(0.0)
                ab = np.float64(0.0)
                for j in range(cols):
                    y = m[j]
                    am += np.float64(y * y)
                    ab += np.float64(y * b[j])
                mm[i, r0 + r] += am
                mb[i, r0 + r] += ab

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
