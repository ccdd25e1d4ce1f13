"""Stable ranks of magnitudes along rows, compiled for CPU (DELLA's MagPrune).

Why. MagPrune ranks every entry of a task vector within its row. ``torch.argsort``
(stable) plus a scatter, :func:`surgeon.merge.select.exact.stable_ranks`, costs
~50-80 ns per entry on the 2-core development machine: 200 s of a DELLA merge of
three 1.1B fine-tunes. Here one numba loop per row sorts the entries by
least-significant-digit radix sort (four 8-bit digits of the magnitude's bit
pattern); radix sort is stable, so equal magnitudes keep their index order,
exactly as ``argsort(stable=True)``.

How (:func:`_kernels` ``.order``, inlined into :mod:`surgeon.merge.kernels.della_compiled`
too). Each entry travels as one 64-bit word, ``key << 32 | index``, so a pass
moves one word instead of a key and an index; the four digit histograms are
counted in one sweep before the passes; a pass is skipped when every entry
has the same digit there (task vectors of bf16 models: the low mantissa bytes
of ``m - b`` are mostly zero, so one or two of the four passes run).

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

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..kernels._jit import compiled, numba_module
from .exact import stable_ranks


@compiled
def _kernels(jit: Any) -> Any:
    """The row radix sort (an inline helper) and the ranking loop built on it."""
    global _order  # helpers are globals, not closure cells: see kernels/_jit.py
    inline = numba_module().njit(inline="always", nogil=True, boundscheck=False, error_model="numpy")

    @inline
    def _order(keys, va, vb, cnt):  # pragma: no cover - compiled
        # keys: uint32 [n], a row's float32 bit patterns (the sign bit is ignored);
        # va, vb: uint64 [n] scratch; cnt: int64 [4, 256], zero on entry and on return.
        # Returns va or vb holding (|key| << 32 | index) in stable ascending order of |key|.
        n = keys.shape[0]
        for i in range(n):
            k = keys[i] & np.uint32(0x7FFFFFFF)
            va[i] = (np.uint64(k) << np.uint64(32)) | np.uint64(i)
            cnt[0, k & np.uint32(255)] += 1
            cnt[1, (k >> np.uint32(8)) & np.uint32(255)] += 1
            cnt[2, (k >> np.uint32(16)) & np.uint32(255)] += 1
            cnt[3, k >> np.uint32(24)] += 1
        src, dst = va, vb
        for p in range(4):
            c = cnt[p]
            shift = np.uint64(32 + 8 * p)
            if n > 0 and c[(src[0] >> shift) & np.uint64(255)] == n:  # one digit across the row: order unchanged
                c[(src[0] >> shift) & np.uint64(255)] = 0
                continue
            total = 0
            for b in range(256):
                x = c[b]
                c[b] = total
                total += x
            for i in range(n):
                v = src[i]
                dg = (v >> shift) & np.uint64(255)
                j = c[dg]
                c[dg] = j + 1
                dst[j] = v
            for b in range(256):
                c[b] = 0
            src, dst = dst, src
        return src

    @jit
    def row_ranks(keys, out):  # pragma: no cover - compiled
        # keys: uint32 [rows, n]; out: int64 [rows, n]
        rows, n = keys.shape
        va = np.empty(n, np.uint64)
        vb = np.empty(n, np.uint64)
        cnt = np.zeros((4, 256), np.int64)
        low = np.uint64(0xFFFFFFFF)
        for r in range(rows):
            srt = _order(keys[r], va, vb, cnt)
            o = out[r]
            for p in range(n):
                o[np.int64(srt[p] & low)] = p

    return SimpleNamespace(order=_order, row_ranks=row_ranks)


def compiled_available() -> bool:
    """Whether the compiled loop can run (numba present and not switched off)."""
    return _kernels() is not None


def magnitude_ranks(rows: torch.Tensor) -> torch.Tensor:
    """0-based stable ascending ranks of ``|rows|`` along dim 1 of a 2-D tensor (int64):
    equal to ``stable_ranks(rows.abs(), dim=1)``, compiled on CPU for float32."""
    if rows.dim() != 2:
        raise ValueError(f"magnitude_ranks: expected a 2-D tensor, got shape {tuple(rows.shape)}")
    loops = _kernels()
    if loops is None or rows.device.type != "cpu" or rows.dtype != torch.float32 or rows.shape[1] == 0:
        return stable_ranks(rows.abs(), dim=1)
    keys = rows.contiguous().view(torch.int32).numpy().view(np.uint32)
    out = torch.empty(rows.shape, dtype=torch.int64)
    loops.row_ranks(keys, out.numpy())
    return out
