"""Model Stock's mix compiled, from and to stored dtypes (its statistic pass, the
offsets' Gram matrix, is :func:`surgeon.merge.kernels.gram_compiled.gram_sums`).

Why. Through torch, Model Stock's statistic pass casts every block of every
input to float32, makes each offset ``m_i - b`` and sums its square and its
products with the others in float64 (a fresh temporary per op), and the merge
pass casts again to average the models: on the 1.1B family 9.8 s for a whole
job floor of 2.9 s. Here each pass is one numba call per piece: a 512-entry
chunk of every input is widened in L1 (:mod:`surgeon.merge.kernels._raw`).

Exactness. The offsets, their float32 products and the mix
``ratio * avg + (1 - ratio) * base`` (``avg`` the running sum of the models
divided by their count) are torch's float32 operations in torch's order, so
the merge pass writes the bytes the torch block path writes for the same
ratio. The float64 sums run in 512 lanes (torch: a block at a time), so the
ratio equals the whole-tensor reference's to float64 rounding, as the torch
block kernel's does (tests/test_merge_conformance.py, ``FLOAT64_SUMS``).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

from . import _raw
from ._jit import compiled

_CH = _raw.CHUNK


@compiled
def _kernels(jit: Any) -> Any:
    """Model Stock's mix loop."""
    _raw.register()

    @jit
    def mix(b_all, ms, ratio, out_all):  # pragma: no cover - compiled
        # out = ratio * avg + (1 - ratio) * b, avg = (m_0 + m_1 + ...) / count. Returns whether all were finite.
        nm = len(ms)
        n = out_all.shape[0]
        b = np.empty(_CH, np.float32)
        m = np.empty(_CH, np.float32)
        avg = np.empty(_CH, np.float32)
        chk = np.zeros(_CH, np.float32)
        r = np.float32(ratio)
        rest = np.float32(1.0) - r
        count = np.float32(nm)
        for s in range(0, n, _CH):
            e = min(n, s + _CH)
            k = e - s
            _raw.load(b_all[s:e], b)
            _raw.load(ms[0][s:e], avg)
            for i in range(1, nm):
                _raw.load(ms[i][s:e], m)
                for j in range(k):
                    avg[j] = avg[j] + m[j]
            for j in range(k):
                avg[j] = r * (avg[j] / count) + rest * b[j]
            _raw.store_checked(avg[:k], out_all[s:e], chk)
        return _raw.all_finite(chk)

    return SimpleNamespace(mix=mix)


def available() -> bool:
    """Whether the compiled loops can run (numba present and not switched off)."""
    return _kernels() is not None


def stock_mix(base: np.ndarray, models: tuple[np.ndarray, ...], ratio: float, out: np.ndarray) -> bool:
    """Write ``ratio * mean(models) + (1 - ratio) * base`` into ``out`` (float32 or
    bf16 bits); returns whether every result was finite."""
    return bool(_kernels().mix(base, models, np.float32(ratio), out))
