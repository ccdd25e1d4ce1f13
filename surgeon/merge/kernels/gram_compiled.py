"""The Gram pass and the linear-combination mix compiled, from and to stored dtypes.

Why. Multi-SLERP, the Karcher mean, SLERP and NuSLERP sum the Gram matrix
``<x_i, x_j>`` of their inputs (the task vectors ``m_i - base`` or the
models) in a pass, then write ``sum_i c_i x_i`` (+ base); Model Stock's pass
is the same Gram matrix of its offsets (its mix is its own). Through torch each product is a fresh float32
temporary of a float32 copy of every block; here each pass is one numba call
per piece, a 512-entry chunk of every input widened in L1
(:mod:`surgeon.merge.kernels._raw`).

Exactness. The task vectors and products are float32 and the sums float64,
as :func:`surgeon.merge.kernels.multislerp.gram` computes them (in 512 lanes
rather than a block at a time: equal to float64 rounding); the mix is
:func:`surgeon.merge.kernels.multislerp.combination`'s float32 operations in
its order: ``x_0 * c_0``, then each ``+ c_i x_i`` in one rounding (torch's CPU
``add_(x, alpha=c)`` fuses them), then ``+ base``, the coefficients as float32
as torch casts its scalars. NuSLERP's mix (``out += x_i * c_i``) rounds the
product first: ``fused=False``. For the same coefficients the bytes are the
torch block path's.
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
    """The Gram and combination loops."""
    _raw.register()

    @jit
    def gram(ms, base_all, has_base, g):  # pragma: no cover - compiled
        # g[i, j] and g[j, i] += sum x_i x_j (float32 products, float64 lanes), x_i = m_i - base
        # (float32) when has_base, else m_i
        k_in = len(ms)
        n = ms[0].shape[0]
        b = np.empty(_CH, np.float32)
        x = np.empty((k_in, _CH), np.float32)
        lanes = np.zeros((k_in * (k_in + 1) // 2, _CH), np.float64)
        for s in range(0, n, _CH):
            e = min(n, s + _CH)
            k = e - s
            if has_base:
                _raw.load(base_all[s:e], b)
            for i in range(k_in):
                xi = x[i]
                _raw.load(ms[i][s:e], xi)
                if has_base:
                    for j in range(k):
                        xi[j] = xi[j] - b[j]
            p = 0
            for i in range(k_in):
                xi = x[i]
                for q in range(i, k_in):
                    xq = x[q]
                    lane = lanes[p]
                    for j in range(k):
                        lane[j] += np.float64(xi[j] * xq[j])
                    p += 1
        p = 0
        for i in range(k_in):
            for q in range(i, k_in):
                v = lanes[p].sum()
                g[i, q] += v
                if q != i:
                    g[q, i] += v
                p += 1

    @jit
    def combine(ms, base_all, has_base, coef, fused, out_all):  # pragma: no cover - compiled
        # out = x_0 c_0, then fma(c_i, x_i, out) for i >= 1 (fused; else out + (x_i c_i), two
        # roundings), then + base when has_base; returns whether every result was finite
        k_in = len(ms)
        n = out_all.shape[0]
        b = np.empty(_CH, np.float32)
        m = np.empty(_CH, np.float32)
        o = np.empty(_CH, np.float32)
        chk = np.zeros(_CH, np.float32)
        for s in range(0, n, _CH):
            e = min(n, s + _CH)
            k = e - s
            if has_base:
                _raw.load(base_all[s:e], b)
            _raw.load(ms[0][s:e], m)
            if has_base:
                for j in range(k):
                    m[j] = m[j] - b[j]
            c0 = coef[0]
            for j in range(k):
                o[j] = m[j] * c0
            for i in range(1, k_in):
                _raw.load(ms[i][s:e], m)
                ci = coef[i]
                if has_base:
                    for j in range(k):
                        m[j] = m[j] - b[j]
                if fused:
                    for j in range(k):
                        o[j] = _raw.fma(ci, m[j], o[j])
                else:
                    for j in range(k):
                        o[j] = o[j] + m[j] * ci
            if has_base:
                for j in range(k):
                    o[j] = o[j] + b[j]
            _raw.store_checked(o[:k], out_all[s:e], chk)
        return _raw.all_finite(chk)

    return SimpleNamespace(gram=gram, combine=combine)


def available() -> bool:
    """Whether the compiled loops can run (numba present and not switched off)."""
    return _kernels() is not None


def gram_sums(models: tuple[np.ndarray, ...], base: np.ndarray | None, g: np.ndarray) -> None:
    """Add a piece's Gram matrix of ``x_i = m_i - base`` (``m_i`` when ``base`` is
    None; flat stored-dtype arrays) to ``g`` (float64 ``[k, k]``)."""
    _kernels().gram(models, models[0] if base is None else base, base is not None, g)


def combine(models: tuple[np.ndarray, ...], base: np.ndarray | None, coef: list[float], out: np.ndarray,
            fused: bool = True) -> bool:
    """Write ``sum_i coef_i x_i`` (+ base) as the torch path rounds it into ``out``
    (float32 or bf16 bits): each term added in one rounding (``fused``, torch's
    ``add_(x, alpha=c)``) or after its product's (``out += x * c``); returns
    whether every result was finite."""
    c = np.array(coef, dtype=np.float32)
    return bool(_kernels().combine(models, models[0] if base is None else base, base is not None, c, fused, out))
