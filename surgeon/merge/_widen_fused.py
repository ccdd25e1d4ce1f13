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
row) keeps the torch path. The engine hands whole pieces in their stored
dtype (``WidenKernel.observe_raw``/``merge_raw``): rows are widened from bf16
into a float32 scratch row and the merged row is rounded back to bf16 as
torch would (:mod:`surgeon.merge._raw`), so no float32 copy of a block is made.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch

from . import _raw
from ._hist import compiled


@compiled
def _kernels(jit: Any) -> Any:
    """WIDEN's row loops, on stored-dtype rows (float32 or bf16 bits: :mod:`surgeon.merge._raw`)."""
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
    def merge(b_all, ms, w, cols, out_all):  # pragma: no cover - compiled
        # returns whether every result was finite (chk accumulates o - o: NaN once one is inf or NaN)
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
                for j in range(cols):
                    o[j] = o[j] + (m[j] - b[j]) * wi[j]
            for j in range(cols):
                chk[j] = chk[j] + (o[j] - o[j])
            _raw.store(o, out_all[r * cols:(r + 1) * cols])
        bad = np.float32(0.0)
        for j in range(cols):
            bad += chk[j]
        return bad == np.float32(0.0)

    return SimpleNamespace(column_sums=column_sums, merge=merge)


def available() -> bool:
    return _kernels() is not None


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(-1).numpy()


def add_column_sums(base: Any, models: Sequence[Any], cols: int, bb: torch.Tensor, mm: torch.Tensor,
                    mb: torch.Tensor) -> None:
    """``bb += sum_rows b*b``, ``mm[i] += sum_rows m_i*m_i``, ``mb[i] += sum_rows m_i*b``
    (float64 accumulators; whole rows of ``cols`` columns). Inputs: float32
    CPU tensors, or the stored-dtype arrays of :func:`surgeon.merge._raw.raw_inputs`."""
    if isinstance(base, torch.Tensor):
        base, models = _np(base), tuple(_np(m) for m in models)
    _kernels().column_sums(base, tuple(models), cols, bb.numpy(), mm.numpy(), mb.numpy())


def merge_rows(base: torch.Tensor, models: Sequence[torch.Tensor], weights: torch.Tensor, cols: int) -> torch.Tensor:
    """``base + sum_i (m_i - base) * weights[i]`` per row (float32, column weights)."""
    out = torch.empty(base.numel(), dtype=torch.float32)
    merge_raw(_np(base), tuple(_np(m) for m in models), weights, cols, out.numpy())
    return out


def merge_raw(base: np.ndarray, models: tuple[np.ndarray, ...], weights: torch.Tensor, cols: int,
              out: np.ndarray) -> bool:
    """:func:`merge_rows` from and to stored-dtype arrays; returns whether every result was finite."""
    return bool(_kernels().merge(base, tuple(models), weights.numpy(), cols, out))
