"""Stable ranks of magnitudes along rows, compiled for CPU (DELLA's MagPrune).

Why. MagPrune ranks every entry of a task vector within its row. ``torch.argsort``
(stable) plus a scatter, :func:`surgeon.merge.select.exact.stable_ranks`, costs
~50-80 ns per entry on the 2-core development machine: 200 s of a DELLA merge of
three 1.1B fine-tunes. Here one numba loop per row sorts the entries' bit
patterns by least-significant-digit radix sort (four 8-bit passes, a pass skipped
when its digit is the same across the row); radix sort is stable, so equal
magnitudes keep their index order, exactly as ``argsort(stable=True)``.

Keys. For float32, clearing the sign bit gives |x|, and the bit patterns of
non-negative floats order as unsigned integers do (+0 < subnormals < normals <
inf < NaN), which is ``torch.sort``'s order with NaN last. So the loop needs no
``abs`` pass: ``magnitude_ranks(x) == stable_ranks(x.abs(), dim=1)`` for every
float32 input, -0.0, inf and NaN included (tests/test_merge_select.py); the one
difference: NaNs of different payloads order by payload here, by index in torch
(arithmetic produces one payload).
Without numba (``SURGEON_NO_NUMBA=1``), off the CPU or for other dtypes the torch
path runs.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..kernels._jit import compiled
from .exact import stable_ranks


@compiled
def _kernels(jit: Any) -> Any:
    """The row radix ranking."""

    @jit
    def row_ranks(keys, out):  # pragma: no cover - compiled
        # keys: uint32 [rows, n] (sign bit already cleared); out: int64 [rows, n]
        rows, n = keys.shape
        ia = np.empty(n, np.int64)
        ib = np.empty(n, np.int64)
        ka = np.empty(n, np.uint32)
        kb = np.empty(n, np.uint32)
        cnt = np.empty(256, np.int64)
        mask = np.uint32(255)
        for r in range(rows):
            for i in range(n):
                ia[i] = i
                ka[i] = keys[r, i]
            for p in range(4):
                shift = np.uint32(8 * p)
                for b in range(256):
                    cnt[b] = 0
                for i in range(n):
                    cnt[(ka[i] >> shift) & mask] += 1
                if cnt[(ka[0] >> shift) & mask] == n:  # one digit across the row: order unchanged
                    continue
                total = 0
                for b in range(256):
                    c = cnt[b]
                    cnt[b] = total
                    total += c
                for i in range(n):
                    d = (ka[i] >> shift) & mask
                    j = cnt[d]
                    cnt[d] = j + 1
                    ib[j] = ia[i]
                    kb[j] = ka[i]
                ia, ib = ib, ia
                ka, kb = kb, ka
            for i in range(n):
                out[r, ia[i]] = i

    return row_ranks


def compiled_available() -> bool:
    """Whether the compiled loop can run (numba present and not switched off)."""
    return _kernels() is not None


def magnitude_ranks(rows: torch.Tensor) -> torch.Tensor:
    """0-based stable ascending ranks of ``|rows|`` along dim 1 of a 2-D tensor (int64):
    equal to ``stable_ranks(rows.abs(), dim=1)``, compiled on CPU for float32."""
    if rows.dim() != 2:
        raise ValueError(f"magnitude_ranks: expected a 2-D tensor, got shape {tuple(rows.shape)}")
    loop = _kernels()
    if loop is None or rows.device.type != "cpu" or rows.dtype != torch.float32 or rows.shape[1] == 0:
        return stable_ranks(rows.abs(), dim=1)
    keys = (rows.contiguous().view(torch.int32) & 0x7FFFFFFF).numpy().view(np.uint32)
    out = torch.empty(rows.shape, dtype=torch.int64)
    loop(keys, out.numpy())
    return out
