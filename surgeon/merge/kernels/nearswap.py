"""``nearswap`` compiled: the blend from and to stored dtypes in one loop.

Why. Through torch a block of NearSwap is a float32 cast of each input and
eight ops over 1 MiB operands, each writing a fresh temporary (subtract,
abs, clamp, reciprocal, scale, clamp, two products, a subtraction and a sum)
and a cast back: on the 1.1B family it took 7.0 CPU-seconds where the
weighted sum of three models takes 5.5. Here one numba loop widens both
inputs a 512-entry chunk at a time (:mod:`surgeon.merge.kernels._raw`) and
writes the result in the output's dtype.

Exactness. The float32 operations are those of
:func:`surgeon.merge.methods.nearswap.nearswap` in its order, each rounded
once: ``t / x`` is torch's ``x.reciprocal() * t`` (how torch divides a number
by a tensor), the clamps keep NaN as torch's do, and nothing is fused into a
multiply-add, so the bytes equal ``fn``'s then cast (tests/test_merge_raw.py).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

from ..tensor import TensorMerge
from . import _raw
from ._jit import compiled
from .base import CompiledLoop

_CH = _raw.CHUNK


@compiled
def _kernels(jit: Any) -> Any:
    """The blend loop."""
    _raw.register()

    @jit
    def blend(a_all, b_all, t, min_diff, out_all):  # pragma: no cover - compiled
        # w = clamp(t * (1 / max(|a - b|, min_diff)), 0, 1); out = w * b + (1 - w) * a.
        # Returns whether every result was finite.
        n = out_all.shape[0]
        a = np.empty(_CH, np.float32)
        b = np.empty(_CH, np.float32)
        o = np.empty(_CH, np.float32)
        chk = np.zeros(_CH, np.float32)
        zero = np.float32(0.0)
        one = np.float32(1.0)
        for s in range(0, n, _CH):
            e = min(n, s + _CH)
            k = e - s
            _raw.load(a_all[s:e], a)
            _raw.load(b_all[s:e], b)
            for j in range(k):
                x = abs(a[j] - b[j])
                x = x if (x >= min_diff) | (x != x) else min_diff  # clamp(min=...): NaN stays NaN
                w = (one / x) * t
                w = w if (w >= zero) | (w != w) else zero
                w = w if (w <= one) | (w != w) else one
                o[j] = w * b[j] + (one - w) * a[j]
            _raw.store_checked(o, out_all[s:e], chk)
        return _raw.all_finite(chk)

    return SimpleNamespace(blend=blend)


def available() -> bool:
    """Whether the compiled blend can run (numba present and on)."""
    return _kernels() is not None


class NearSwapKernel(CompiledLoop):
    """``nearswap`` on CPU: whole pieces from their stored dtype, or float32 blocks."""

    def __init__(self, meta: TensorMerge, min_diff: float):
        self.t = np.float32(float(meta.params["t"]))  # torch casts the scalar to the tensor's float32
        self.min_diff = np.float32(min_diff)

    def _run(self, base: np.ndarray, models: tuple[np.ndarray, ...], out: np.ndarray) -> bool:
        return bool(_kernels().blend(base, models[0], self.t, self.min_diff, out))
