"""Exact OMP's pick from bfloat16 products, certified (compiled with numba).

Exact OMP picks, for each residual ``r``, the atom ``a`` of largest ``|<a, r>|``
over the whole dictionary: one (B x D) @ (D x N) product per pick, nearly all
of a transplant's arithmetic. On CPUs with bfloat16 dot-product instructions
(AVX512-BF16, AMX) that product runs about twice as fast in bfloat16 as in
float32 (tests measure nothing; scripts/bench_transplant.py does). Its
results are rounded, so the largest rounded product need not be the largest
product. :func:`certified_picks` makes the pick exact all the same:

Write ``a' `` and ``r' `` for the atom and the residual rounded to bfloat16,
``d_a = a - a'``, ``d_r = r - r'``. Then ``<a, r> - <a', r'> = <d_a, r> + <a', d_r>``,
so by Cauchy-Schwarz the rounding of the inputs moves a product by at most
``|d_a| |r| + |a'| |d_r|``; torch sums the products of bfloat16 entries (exact
in float32) in float32, off by at most ``gamma_D |a'| |r'|`` (D additions,
``gamma_D = D u32 / (1 - D u32)``, ``u32 = 2**-24``), and rounds the sum to
bfloat16 (relative ``u = 2**-8``). So with ``e_a = |d_a| R1 + |a'| R2``, ``R1 = |r|``,
``R2 = |d_r| + gamma_D |r'|``, the true product ``s`` and the computed ``t`` satisfy

    |t| (1 - c) - e_a  <=  |s|  <=  |t| (1 + c) + e_a,     c = u / (1 - u).

The norms are the actual rounding errors' (about half the worst case ``u |a|``),
and :func:`row_bounds` and :class:`AtomBounds` round every term up by 0.1 %.
Per row, pass 1 finds the best lower bound ``lb`` over the atoms that may
still be picked; every atom whose upper bound reaches ``lb`` may be the
largest, and pass 2 computes those candidates' products exactly (float64 sums
of the float32 entries) and picks the largest, ties to the lower index, as
:meth:`surgeon.transplant.products.DictionaryProducts.argmax_abs` does. The
atom the float32 search would pick is always among the candidates. The bound
is loose by about the square root of D (rounding errors mostly cancel), yet on
the Gemma-3 / SmolLM2 pair a row has 1.4 candidates at the first pick and 3.4
at the 64th (a worst-case bound, ``u |a|`` for ``|d_a|``, doubled, left 262).

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


#: every bound term is rounded up by this factor (the bound's own float32 arithmetic)
SLACK = 1.001


class AtomBounds:
    """The dictionary's side of the bound: for each atom (N x D float32 ``atoms``) the norm
    of its bfloat16 rounding error ``|d_a|`` and of the rounded atom ``|a'|``, zero-padded
    to whole :data:`CHUNK` s (a padded atom's bound is 0 and it is never picked), and each
    chunk's largest (pass 2 skips a chunk whose best case cannot reach the bound)."""

    def __init__(self, atoms: np.ndarray, rounded: np.ndarray):
        # rounded: the atoms in bfloat16, widened to float32 (N x D)
        err = _row_norms(atoms - rounded) * SLACK
        size = _row_norms(rounded) * SLACK
        pad = (-len(atoms)) % CHUNK
        self.err = np.concatenate([err, np.zeros(pad)]).astype(np.float32)
        self.size = np.concatenate([size, np.zeros(pad)]).astype(np.float32)
        self.err_chunk = np.ascontiguousarray(self.err.reshape(-1, CHUNK).max(1))
        self.size_chunk = np.ascontiguousarray(self.size.reshape(-1, CHUNK).max(1))
        self.gamma = _gamma(atoms.shape[1])


def _row_norms(m: np.ndarray) -> np.ndarray:
    """The Euclidean norm of each row of the float32 matrix ``m``, summed in float64."""
    return np.sqrt(np.einsum("ij,ij->i", m, m, dtype=np.float64))


def _gamma(dim: int) -> float:
    u32 = 2.0 ** -24
    return dim * u32 / (1.0 - dim * u32)


def row_bounds(x: np.ndarray, rounded: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """The residuals' side of the bound, ``(R1, R2)`` (B each, float32), from the residuals ``x``
    and their bfloat16 rounding widened to float32 (``rounded``, B x D)."""
    norm = _row_norms(x)
    err = _row_norms(x - rounded)
    size = _row_norms(rounded)
    # 1e-30: room for entries below float32's normal range, flushed to 0 by bfloat16 dot products
    return (norm * SLACK).astype(np.float32), ((err + gamma * size) * SLACK + 1e-30).astype(np.float32)


def rounding_factor() -> float:
    """``c`` of the module docstring, rounded up."""
    return U_BF16 / (1.0 - U_BF16) * SLACK


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


def _picks(bits, atoms, err, size, err_chunk, size_chunk, x, r1, r2, taken, n_taken, c2, out, lo,
           hi):  # pragma: no cover - compiled
    # bits: B x N int16 (bfloat16 products); atoms: N x D float32; err, size: AtomBounds' padded
    # per-atom norms, err_chunk, size_chunk: their chunk maxima; x: B x D float32 residuals; r1, r2:
    # row_bounds; taken: B x T int64 (first n_taken columns); out: B int64 receives the picks
    n = bits.shape[1]
    d = atoms.shape[1]
    n_chunks = err_chunk.shape[0]
    mag = np.zeros(n_chunks * CHUNK, np.float32)  # the padding stays 0
    mag_bits = mag.view(np.uint32)
    ubits = bits.view(np.uint16)
    chunk_max = np.empty(n_chunks, np.float32)
    lanes = np.empty(LANES, np.float32)  # partial maxima, LANES side by side (vectorised)
    top = np.empty(LANES, np.float32)
    lo_f = np.float32(1.0 - c2)
    hi_f = np.float32(1.0 + c2)
    for b in range(lo, hi):
        if not r1[b] > 0.0:  # every product is 0: the lowest index not taken
            out[b] = _lowest_free(taken, b, n_taken)
            continue
        row = ubits[b]
        for a in range(n):  # |t| as float32: the bfloat16 bits, sign cleared, in the upper half
            mag_bits[a] = (np.uint32(row[a]) << np.uint32(16)) & np.uint32(0x7FFF0000)
        e1 = r1[b]
        e2 = r2[b]
        lanes[:] = -3.0e38  # pass 1: the best lower bound, and each chunk's largest |t| ...
        for c in range(n_chunks):
            top[:] = 0.0
            for a0 in range(c * CHUNK, (c + 1) * CHUNK, LANES):
                for j in range(LANES):
                    m = mag[a0 + j]
                    top[j] = top[j] if top[j] > m else m
                    v = m * lo_f - (e1 * err[a0 + j] + e2 * size[a0 + j])
                    lanes[j] = lanes[j] if lanes[j] > v else v
            chunk_max[c] = top.max()
        lb = lanes.max()
        hit = False  # ... over the atoms not taken (a taken atom's product is ~0: it is rarely the one)
        for i in range(n_taken):
            a = taken[b, i]
            if mag[a] * lo_f - (e1 * err[a] + e2 * size[a]) >= lb:
                hit = True
        if hit:
            lb = np.float32(-3.0e38)
            for a in range(n):
                v = mag[a] * lo_f - (e1 * err[a] + e2 * size[a])
                if v > lb and not _taken(taken, b, n_taken, a):
                    lb = v
        best = -1.0
        pick = -1
        for c in range(n_chunks):  # pass 2: every atom that may beat lb, its product computed exactly
            if chunk_max[c] * hi_f + e1 * err_chunk[c] + e2 * size_chunk[c] < lb:
                continue
            for a in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
                if mag[a] * hi_f + (e1 * err[a] + e2 * size[a]) >= lb and not _taken(taken, b, n_taken, a):
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


def certified_picks(bits: np.ndarray, atoms: np.ndarray, bounds: AtomBounds, x: np.ndarray, x_rounded: np.ndarray,
                    taken: np.ndarray, n_taken: int, out: np.ndarray, workers: int = 1) -> None:
    """Each row's exact pick into ``out`` (B, int64): ``bits`` the B x N bfloat16 products of
    ``x_rounded`` (the residuals ``x``, B x D float32, rounded to bfloat16 and widened back)
    with the ``atoms`` (N x D float32) rounded to bfloat16, viewed as int16; ``bounds`` the
    atoms' :class:`AtomBounds`; ``taken[:, :n_taken]`` the atoms each row has picked.
    ``workers`` threads share the rows."""
    kernel = _kernels()
    r1, r2 = row_bounds(x, x_rounded, bounds.gamma)
    c2 = rounding_factor()
    args = (bits, atoms, bounds.err, bounds.size, bounds.err_chunk, bounds.size_chunk, x, r1, r2, taken, n_taken, c2,
            out)
    B = bits.shape[0]
    if workers <= 1 or B < 2 * workers:
        kernel(*args, 0, B)
        return
    from concurrent.futures import ThreadPoolExecutor

    step = math.ceil(B / workers)
    with ThreadPoolExecutor(workers) as pool:
        for job in [pool.submit(kernel, *args, s, min(B, s + step)) for s in range(0, B, step)]:
            job.result()
