"""SLERP's and flat NuSLERP's statistic pass and mix compiled, from and to stored dtypes.

Why. Through torch, SLERP's statistic pass casts every block of both inputs
to float32 and makes three float32 products, each a fresh temporary summed in
float64; the merge pass casts again for ``c0 v0 + c1 v1``: on the 1.1B
family (AVX2 host) ~5.6 s of sums and ~5 s of block merging in a 12.3 s job.
Here each pass is one numba call per piece: a 512-entry chunk of both inputs
is widened in L1 (:mod:`surgeon.merge.kernels._raw`).

Exactness. The products are float32, as torch's ``a * a``, and the mix is
torch's: ``v0 * c0`` rounded to float32, then ``+ c1 * v1`` fused into one
rounding (torch's CPU ``add_(v1, alpha=c1)``), both coefficients as float32
as torch casts its scalars, so the merge pass writes the bytes the torch
block path writes for the same coefficients. The float64 sums run in 512
lanes (torch: a block at a time), so the coefficients equal the whole-tensor
reference's to float64 rounding, as the torch block kernel's do.

NuSLERP with one flat vector per tensor (mergekit's default) sums the same
three products of its task vectors (``m_i - base`` in float32, or the models
themselves without a base) and mixes as :func:`surgeon.merge.kernels.nuslerp.nuslerp_combine`
does: ``v0 * c0``, then ``+ v1 * c1`` with the product rounded first (two
roundings, no fused multiply-add), then ``+ base``.
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
    """SLERP's and NuSLERP's statistic and mix loops."""
    _raw.register()

    @jit
    def task_sums(a_all, b_all, base_all, has_base, out):  # pragma: no cover - compiled
        # out[0] += sum x^2, out[1] += sum y^2, out[2] += sum x y: float32 products, float64 lanes;
        # x = a - base and y = b - base (float32) when has_base, else a and b
        n = a_all.shape[0]
        a = np.empty(_CH, np.float32)
        b = np.empty(_CH, np.float32)
        c = np.empty(_CH, np.float32)
        lanes = np.zeros((3, _CH), np.float64)
        laa = lanes[0]
        lbb = lanes[1]
        lab = lanes[2]
        for s in range(0, n, _CH):
            e = min(n, s + _CH)
            k = e - s
            _raw.load(a_all[s:e], a)
            _raw.load(b_all[s:e], b)
            if has_base:
                _raw.load(base_all[s:e], c)
                for j in range(k):
                    a[j] = a[j] - c[j]
                    b[j] = b[j] - c[j]
            for j in range(k):
                x = a[j]
                y = b[j]
                laa[j] += np.float64(x * x)
                lbb[j] += np.float64(y * y)
                lab[j] += np.float64(x * y)
        for i in range(3):
            out[i] += lanes[i].sum()

    @jit
    def task_mix(a_all, b_all, base_all, has_base, fused, c0, c1, out_all):  # pragma: no cover - compiled
        # fused (SLERP, no base): out = fma(c1, b, a * c0); else out = (x * c0 + (y * c1)) [+ base],
        # every operation rounded to float32, x and y as in task_sums. Returns whether all were finite.
        n = out_all.shape[0]
        a = np.empty(_CH, np.float32)
        b = np.empty(_CH, np.float32)
        c = np.empty(_CH, np.float32)
        o = np.empty(_CH, np.float32)
        chk = np.zeros(_CH, np.float32)
        for s in range(0, n, _CH):
            e = min(n, s + _CH)
            k = e - s
            _raw.load(a_all[s:e], a)
            _raw.load(b_all[s:e], b)
            if fused:
                for j in range(k):
                    o[j] = _raw.fma(c1, b[j], a[j] * c0)
            elif has_base:
                _raw.load(base_all[s:e], c)
                for j in range(k):
                    o[j] = ((a[j] - c[j]) * c0 + (b[j] - c[j]) * c1) + c[j]
            else:
                for j in range(k):
                    o[j] = a[j] * c0 + b[j] * c1
            _raw.store_checked(o[:k], out_all[s:e], chk)
        return _raw.all_finite(chk)

    return SimpleNamespace(task_sums=task_sums, task_mix=task_mix)


def available() -> bool:
    """Whether the compiled loops can run (numba present and not switched off)."""
    return _kernels() is not None


def slerp_mix(v0: np.ndarray, v1: np.ndarray, c0: float, c1: float, out: np.ndarray) -> bool:
    """Write ``c0 v0 + c1 v1`` (torch's float32 operations) into ``out`` (float32
    or bf16 bits); returns whether every result was finite."""
    return bool(_kernels().task_mix(v0, v1, v0, False, True, np.float32(c0), np.float32(c1), out))


def task_vector_sums(m0: np.ndarray, m1: np.ndarray, base: np.ndarray | None, out: np.ndarray) -> None:
    """Add a piece's ``|v0|^2, |v1|^2, <v0, v1>`` to ``out`` (float64 ``[3]``), ``v_i =
    m_i - base`` in float32 (``m_i`` itself when ``base`` is None: SLERP's two inputs)."""
    _kernels().task_sums(m0, m1, m0 if base is None else base, base is not None, out)


def task_vector_mix(m0: np.ndarray, m1: np.ndarray, base: np.ndarray | None, c0: float, c1: float,
                    out: np.ndarray) -> bool:
    """Write ``v0 * c0 + v1 * c1 (+ base)`` as NuSLERP's torch path rounds it into
    ``out``; returns whether every result was finite."""
    return bool(_kernels().task_mix(m0, m1, m0 if base is None else base, base is not None, False,
                                    np.float32(c0), np.float32(c1), out))
