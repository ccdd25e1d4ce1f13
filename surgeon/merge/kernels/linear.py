"""``linear`` and ``task_arithmetic`` compiled: weighted sums from and to stored dtypes.

Why. Through torch, a block of these methods is a float32 cast per input, a
zero-filled accumulator, one ``add_(x, alpha=w)`` per model (plus a
subtraction for task arithmetic), the scaling ops and a cast back: ~10 passes
over 1 MiB operands per block. Here one numba loop per piece widens each
input a 512-entry chunk at a time (:mod:`surgeon.merge.kernels._raw`) and writes the
result in the output's dtype.

Exactness. The float32 operations are torch's, in torch's order: the
accumulator starts at +0 and each model adds ``w * x`` with one rounding
(torch's vectorised CPU ``add_`` with ``alpha`` is a fused multiply-add; the
compiled loop uses the same instruction), then ``/ total`` and, for task
arithmetic, ``* lambda`` and ``+ base`` as separate roundings. So the bytes
equal :func:`surgeon.merge.methods.basic.linear` / ``task_arithmetic`` on the same
machine (tests/test_merge_raw.py). (A CPU without FMA instructions would run
torch's unfused path; the compiled loop stays fused, slowly emulated there.)
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
    """The weighted-sum loop."""
    _raw.register()

    @jit
    def weighted_sum(b_all, ms, w, has_base, normalize, total, lam, out_all):  # pragma: no cover - compiled
        # linear: o = sum_i w_i m_i (from +0), / total; task arithmetic:
        # o = sum_i w_i (m_i - b), / total, * lam, + b. Returns whether every result was finite.
        n = out_all.shape[0]
        b = np.empty(_CH, np.float32)
        m = np.empty(_CH, np.float32)
        o = np.empty(_CH, np.float32)
        chk = np.zeros(_CH, np.float32)
        zero = np.float32(0.0)
        for s in range(0, n, _CH):
            e = min(n, s + _CH)
            k = e - s
            if has_base:
                _raw.load(b_all[s:e], b)
            for j in range(k):
                o[j] = zero
            for i in range(len(ms)):
                _raw.load(ms[i][s:e], m)
                wi = w[i]
                if has_base:
                    for j in range(k):
                        o[j] = _raw.fma(wi, m[j] - b[j], o[j])
                else:
                    for j in range(k):
                        o[j] = _raw.fma(wi, m[j], o[j])
            if normalize:
                for j in range(k):
                    o[j] = o[j] / total
            if has_base:
                for j in range(k):
                    o[j] = o[j] * lam + b[j]
            _raw.store_checked(o, out_all[s:e], chk)
        return _raw.all_finite(chk)

    return SimpleNamespace(weighted_sum=weighted_sum)


def available() -> bool:
    """Whether the compiled weighted sum can run (numba present and on)."""
    return _kernels() is not None


class WeightedSumKernel(CompiledLoop):
    """``linear`` (``task=False``) or ``task_arithmetic`` (``task=True``) on CPU,
    whole pieces from their stored dtype, or float32 blocks."""

    def __init__(self, meta: TensorMerge, task: bool):
        p = meta.params
        weights = [float(mp["weight"]) for mp in meta.model_params]
        self.task = task
        self.w = np.array(weights, dtype=np.float32)   # torch casts alpha to the tensor's float32
        self.normalize = bool(p["normalize"])
        self.total = np.float32(sum(weights))
        self.lam = np.float32(float(p["lambda"]) if task else 1.0)

    @property
    def reads_base(self) -> bool:  # type: ignore[override]
        return self.task  # task arithmetic adds to the base; linear never reads it

    def _run(self, base: Any, models: tuple[np.ndarray, ...], out: np.ndarray) -> bool:
        b = base if self.task else models[0]  # linear reads no base; any array of the right type will do
        return bool(_kernels().weighted_sum(b, models, self.w, self.task, self.normalize, self.total, self.lam,
                                            out))


