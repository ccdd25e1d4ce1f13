"""Exact OMP's pick from bfloat16 products, certified (compiled with numba).

Exact OMP picks, for each residual ``r``, the atom ``a`` of largest ``|<a, r>|``
over the whole dictionary: one (B x D) @ (D x N) product per pick, nearly all
of a transplant's arithmetic. On CPUs with bfloat16 dot-product instructions
(AVX512-BF16, AMX) that product runs about twice as fast in bfloat16 as in
float32 (tests measure nothing; scripts/bench_transplant.py does). Its
results are rounded, so the largest rounded product need not be the largest
product. :func:`certified_picks` makes the pick exact all the same:

With ``u = 2**-8`` (bfloat16 keeps 8 significant bits) the atom and the
residual are rounded to within a relative ``u`` per entry, the products of
those entries summed in float32 (error at most ``gamma_D``, D float32
additions), and the sum rounded to bfloat16 (relative ``u``). So the true
product ``s`` and the computed ``t`` satisfy

    |s| >= |t| (1 - c2) - c1 |a| |r|   and   |s| <= |t| (1 + c2) + c1 |a| |r|,

``c2 = u / (1 - u)``, ``c1 = 2u + u^2 + gamma_D (1 + u)^2`` (Cauchy-Schwarz
bounds ``sum |a_i r_i|`` by ``|a| |r|``); :func:`bounds` doubles both for
margin. Per row, pass 1 finds the best lower bound ``lb`` over the atoms that
may still be picked; every atom whose upper bound reaches ``lb`` may be the
largest, and pass 2 computes those candidates' products exactly (float64 sums
of the float32 entries) and picks the largest, ties to the lower index, as
:meth:`surgeon.transplant.products.DictionaryProducts.argmax_abs` does. The
atom the float32 search would pick is always among the candidates; on the
real pairs of docs/transplant.md a row has a few dozen (the bound is loose by
about the square root of D, and atoms of different norms share it).

Atoms already picked (``taken``) are never candidates: their products with
the residual are 0 up to rounding. A residual of exactly 0 picks the
lowest-indexed atom not taken (every product is 0).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

from .. import settings
from ..merge.kernels._jit import best_effort_cache, numba_module

#: bfloat16's unit roundoff (8 significant bits)
U_BF16 = 2.0 ** -8
#: atoms per chunk of pass 2's skip test (a chunk whose largest product cannot reach the bound is skipped)
CHUNK = 64
#: partial maxima kept side by side in pass 1 (one AVX-512 register of float32)
LANES = 16


def bounds(dim: int) -> tuple[float, float]:
    """``(c1, c2)`` of the module docstring for atoms of ``dim`` entries, each doubled."""
    u, u32 = U_BF16, 2.0 ** -24
    gamma = dim * u32 / (1.0 - dim * u32)
    c1 = 2 * u + u * u + gamma * (1 + u) ** 2
    c2 = u / (1 - u)
    return 2.0 * c1, 2.0 * c2


#: numba's fast-math flags for the pick: vectorised max and sums; inputs are finite
#: (a row without a finite candidate picks as a zero residual does)
_FASTMATH = {"nnan", "ninf", "nsz", "contract", "reassoc"}


def _taken(taken: Any, b: int, n_taken: int, a: int) -> bool:  # pragma: no cover - compiled
    for i in range(n_taken):
        if taken[b, i] == a:
            return True
    return False


def _lowest_free(taken: Any, b: int, n_taken: int) -> int:  # pragma: no cover - compiled
    pick = 0
    while _taken(taken, b, n_taken, pick):
        pick += 1
    return pick


def _picks(bits, atoms, norms, chunk_norms, x, xnorm, taken, n_taken, c1, c2, out, lo, hi):  # pragma: no cover - compiled
    # bits: B x N int16 (bfloat16 products); atoms: N x D float32; norms: the N atoms' norms, float32,
    # zero-padded to whole CHUNKs, chunk_norms: the largest of each CHUNK; x: B x D float32 residuals;
    # xnorm: B float32; taken: B x T int64 (first n_taken columns); out: B int64 receives the picks
    n = bits.shape[1]
    d = atoms.shape[1]
    n_chunks = chunk_norms.shape[0]
    mag = np.zeros(n_chunks * CHUNK, np.float32)  # the padding stays 0
    mag_bits = mag.view(np.uint32)
    ubits = bits.view(np.uint16)
    chunk_max = np.empty(n_chunks, np.float32)
    lanes = np.empty(LANES, np.float32)  # partial maxima, LANES side by side (vectorised)
    top = np.empty(LANES, np.float32)
    lo_f = np.float32(1.0 - c2)
    hi_f = np.float32(1.0 + c2)
    for b in range(lo, hi):
        if not xnorm[b] > 0.0:  # every product is 0: the lowest index not taken
            out[b] = _lowest_free(taken, b, n_taken)
            continue
        row = ubits[b]
        for a in range(n):  # |t| as float32: the bfloat16 bits, sign cleared, in the upper half
            mag_bits[a] = (np.uint32(row[a]) << np.uint32(16)) & np.uint32(0x7FFF0000)
        e = np.float32(c1 * xnorm[b])
        lanes[:] = -3.0e38  # pass 1: the best lower bound, and each chunk's largest |t| ...
        for c in range(n_chunks):
            top[:] = 0.0
            for a0 in range(c * CHUNK, (c + 1) * CHUNK, LANES):
                for j in range(LANES):
                    m = mag[a0 + j]
                    top[j] = top[j] if top[j] > m else m
                    v = m * lo_f - e * norms[a0 + j]
                    lanes[j] = lanes[j] if lanes[j] > v else v
            chunk_max[c] = top.max()
        lb = lanes.max()
        hit = False  # ... over the atoms not taken (a taken atom's product is ~0: it is rarely the one)
        for i in range(n_taken):
            a = taken[b, i]
            if mag[a] * lo_f - e * norms[a] >= lb:
                hit = True
        if hit:
            lb = np.float32(-3.0e38)
            for a in range(n):
                v = mag[a] * lo_f - e * norms[a]
                if v > lb and not _taken(taken, b, n_taken, a):
                    lb = v
        best = -1.0
        pick = -1
        for c in range(n_chunks):  # pass 2: every atom that may beat lb, its product computed exactly
            if chunk_max[c] * hi_f + e * chunk_norms[c] < lb:
                continue
            for a in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
                if mag[a] * hi_f + e * norms[a] >= lb and not _taken(taken, b, n_taken, a):
                    s = 0.0
                    for i in range(d):
                        s += np.float64(atoms[a, i]) * np.float64(x[b, i])
                    s = abs(s)
                    if s > best or (s == best and a < pick):
                        best = s
                        pick = a
        out[b] = pick if pick >= 0 else _lowest_free(taken, b, n_taken)


@lru_cache(maxsize=1)
def _build() -> Any:
    nb = numba_module()
    if nb is None:
        return None
    opts = {"nogil": True, "cache": True, "boundscheck": False, "error_model": "numpy", "fastmath": _FASTMATH}
    global _taken, _lowest_free
    _taken = nb.njit(**{k: v for k, v in opts.items() if k != "cache"})(_taken)
    _lowest_free = nb.njit(**{k: v for k, v in opts.items() if k != "cache"})(_lowest_free)
    return best_effort_cache(nb.njit(**opts)(_picks))


def _kernels() -> Any:
    """The compiled pick (compiled, or loaded from numba's cache, on first use), or None
    without numba (``SURGEON_NO_NUMBA=1`` is honoured on every call)."""
    return None if settings.current().no_numba else _build()


def available() -> bool:
    """Whether the compiled pick can run (numba present and not switched off)."""
    return _kernels() is not None


def padded_norms(norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(norms zero-padded to whole CHUNKs, the largest of each CHUNK)``, float32: the kernel's
    view of the atoms' norms (a padded atom's bound is 0, and no padded atom is ever picked)."""
    pad = (-len(norms)) % CHUNK
    full = np.concatenate([norms.astype(np.float32), np.zeros(pad, np.float32)])
    return full, np.ascontiguousarray(full.reshape(-1, CHUNK).max(1))


def certified_picks(bits: np.ndarray, atoms: np.ndarray, norms: np.ndarray, x: np.ndarray, taken: np.ndarray,
                    n_taken: int, out: np.ndarray, workers: int = 1,
                    padded: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Each row's exact pick into ``out`` (B, int64); arguments as in the module docstring:
    ``bits`` the B x N bfloat16 products viewed as int16, ``atoms`` N x D and ``x`` B x D float32,
    ``norms`` the atoms' norms (``padded``: their :func:`padded_norms`, when the caller keeps
    them), ``taken[:, :n_taken]`` the atoms each row has picked. ``workers`` threads share the rows."""
    kernel = _kernels()
    c1, c2 = bounds(atoms.shape[1])
    pn, cn = padded_norms(norms) if padded is None else padded
    xnorm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype(np.float32) * np.float32(1 + 1e-6)
    B = bits.shape[0]
    if workers <= 1 or B < 2 * workers:
        kernel(bits, atoms, pn, cn, x, xnorm, taken, n_taken, c1, c2, out, 0, B)
        return
    from concurrent.futures import ThreadPoolExecutor

    step = math.ceil(B / workers)
    with ThreadPoolExecutor(workers) as pool:
        jobs = [pool.submit(kernel, bits, atoms, pn, cn, x, xnorm, taken, n_taken, c1, c2, out, s, min(B, s + step))
                for s in range(0, B, step)]
        for j in jobs:
            j.result()
