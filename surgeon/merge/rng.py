"""Counter-based uniform numbers: entry ``i`` of a stream is a pure function of (key, i).

Why not ``torch.rand`` with a seeded generator. DARE draws one number per
entry per model; on CPU ``torch.rand`` runs a sequential Mersenne Twister at
~6 ns per number, which was 3/4 of a ``dare_ties`` merge (5.8 of ~7.5 ms per
block of 2^18 entries, three models). It also draws different numbers on
CUDA (Philox) than on CPU, so a DARE merge on the GPU was not the CPU's merge.

Here entries ``2c`` and ``2c + 1`` come from SplitMix64's output for
counter ``c`` (Steele, Lea, Flood 2014, "Fast splittable pseudorandom number
generators"): ``z = key + c * 0x9E3779B97F4A7C15`` through SplitMix64's
finaliser; the even entry takes bits 40-63 of ``z``, the odd one bits 8-31,
each scaled to [0, 1) (24 bits: a float32's precision). Integer arithmetic is
exact, so the same numbers come from numba on CPU and from int64 torch ops
on any device, for any slice of the stream: a block of a tensor gets the
numbers the whole tensor would.

Two numbers per 64-bit output because the hash, not the drawing, is the
cost: AVX2 has no 64-bit vector multiply, so the finaliser's two multiplies
run one lane at a time (~1.2 ns per hash on the development CPU, 4.5 of a
1.1B ``dare_ties`` merge's CPU seconds at one number per hash).

A word stream (:func:`word_stream`, :func:`words_at`; :func:`word` and
:func:`fill_words` in compiled loops) gives entry ``i`` the whole 64-bit
output for counter ``i``; a 16-bit stream (:func:`slice16_stream`) cuts each
output into four entries. DELLA draws from both
(:mod:`surgeon.merge.kernels.della`).
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

import torch

from .kernels._jit import compiled
from .kernels._jit import numba_module as _numba

_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_M64 = (1 << 64) - 1
_SCALE = 2.0 ** -24


def _signed(c: int) -> int:
    """A 64-bit pattern as torch's int64 (two's complement)."""
    c &= _M64
    return c - (1 << 64) if c >= 1 << 63 else c


def fill_uniform(key: Any, start: Any, out: Any) -> None:  # pragma: no cover - replaced in compiled code
    """Inside compiled loops: ``out[i]`` = entry ``start + i`` of stream ``key``
    (``key`` as int64 bits, ``start`` an integer, ``out`` float32)."""
    raise NotImplementedError("fill_uniform is only callable from compiled loops")


def fill_words(key: Any, start: Any, out: Any) -> None:  # pragma: no cover - replaced in compiled code
    """Inside compiled loops: ``out[i]`` = entry ``start + i`` of word stream ``key``
    (``key`` as int64 bits, ``start`` an integer, ``out`` uint64)."""
    raise NotImplementedError("fill_words is only callable from compiled loops")


def word(key: Any, counter: Any) -> Any:  # pragma: no cover - replaced in compiled code
    """Inside compiled loops: entry ``counter`` of word stream ``key`` (uint64)."""
    raise NotImplementedError("word is only callable from compiled loops")


@lru_cache(maxsize=1)
def register() -> bool:
    """Teach numba :func:`fill_uniform`, :func:`fill_words` and :func:`word` (once; False without
    numba), so that compiled merges draw their numbers in-line, chunk by chunk."""
    nb = _numba()
    if nb is None:
        return False
    import numpy as np
    from numba.extending import overload

    @overload(word, jit_options={"nogil": True, "boundscheck": False, "error_model": "numpy"}, inline="always")
    def _word(key, counter):  # pragma: no cover - compiled
        def one(key, counter):
            z = np.uint64(key) + np.uint64(counter) * np.uint64(_GAMMA)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
            return z ^ (z >> np.uint64(31))
        return one

    @overload(fill_uniform, jit_options={"nogil": True, "boundscheck": False, "error_model": "numpy"})
    def _fill(key, start, out):  # pragma: no cover - compiled
        def fill(key, start, out):
            k = np.uint64(key)
            scale = np.float32(_SCALE)
            n = out.shape[0]
            i = 0
            if n > 0 and start & 1:  # an odd first entry: the low half of its counter's output
                z = word(k, np.uint64(start >> 1))
                out[0] = np.float32(np.int64((z >> np.uint64(8)) & np.uint64(0xFFFFFF))) * scale
                i = 1
            c0 = np.uint64((start + i) >> 1)
            pairs = (n - i) >> 1
            body = out[i:i + 2 * pairs]
            g, m1, m2 = np.uint64(_GAMMA), np.uint64(_MIX1), np.uint64(_MIX2)
            for p in range(pairs):  # word(), written out: the inlined call kept this loop ~25 % slower
                z = k + (c0 + np.uint64(p)) * g
                z = (z ^ (z >> np.uint64(30))) * m1
                z = (z ^ (z >> np.uint64(27))) * m2
                z = z ^ (z >> np.uint64(31))
                body[2 * p] = np.float32(np.int64(z >> np.uint64(40))) * scale
                body[2 * p + 1] = np.float32(np.int64((z >> np.uint64(8)) & np.uint64(0xFFFFFF))) * scale
            if i + 2 * pairs < n:  # an even last entry: the high half
                z = word(k, c0 + np.uint64(pairs))
                out[n - 1] = np.float32(np.int64(z >> np.uint64(40))) * scale
        return fill

    @overload(fill_words, jit_options={"nogil": True, "boundscheck": False, "error_model": "numpy"})
    def _fill_words(key, start, out):  # pragma: no cover - compiled
        def fill(key, start, out):
            k = np.uint64(key)
            c0 = np.uint64(start)
            g, m1, m2 = np.uint64(_GAMMA), np.uint64(_MIX1), np.uint64(_MIX2)
            for p in range(out.shape[0]):  # word(), written out, as in fill_uniform
                z = k + (c0 + np.uint64(p)) * g
                z = (z ^ (z >> np.uint64(30))) * m1
                z = (z ^ (z >> np.uint64(27))) * m2
                out[p] = z ^ (z >> np.uint64(31))
        return fill

    return True


@compiled
def _compiled_fill(jit: Any) -> Any:
    """The compiled stream filler."""
    register()

    @jit
    def fill(key, start, out):  # pragma: no cover - compiled
        fill_uniform(key, start, out)

    return fill


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 patterns (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def stream_key(seed: int, name: str, salt: str) -> int:
    """The stream key of (recipe seed, tensor name, salt): 64 bits of their sha256."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def signed_key(key: int) -> int:
    """``key`` as the int64 the compiled loops take."""
    return _signed(key)


def words_at(key: int, counters: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output for each counter of ``counters`` (int64, any shape and device)
    under ``key``, as int64 bit patterns: entry ``c`` of the word stream ``key``."""
    z = counters * _signed(_GAMMA) + _signed(key)  # int64 products wrap modulo 2^64
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    return z ^ _shr(z, 31)


def word_stream(key: int, start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Entries ``[start, start + n)`` of the word stream ``key``: SplitMix64's
    output for counters ``start..start + n - 1``, as int64 bit patterns."""
    return words_at(key, torch.arange(start, start + n, dtype=torch.int64, device=torch.device(device)))


def slice16_stream(key: int, start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Entries ``[start, start + n)`` of the 16-bit stream ``key`` (int64 values in
    ``[0, 2^16)``): entry ``j`` is bits ``16 (j mod 4)`` to ``16 (j mod 4) + 15`` of
    SplitMix64's output for counter ``floor(j / 4)``, four entries a hash (compiled
    loops view the outputs as uint16, little-endian)."""
    j = torch.arange(start, start + n, dtype=torch.int64, device=torch.device(device))
    return (words_at(key, j >> 2) >> (16 * (j & 3))) & 0xFFFF  # the mask drops the arithmetic shift's sign bits


def positions_below(words: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """A uniform draw from ``0..n-1`` for each 64-bit word (int64 bit patterns;
    ``n`` its bound, int64, shaped like ``words``): ``floor(u n)`` with ``u`` the
    word's top 53 bits over ``2^53`` (float64 ops, exact but for the product's one
    rounding; ``n - 1`` where that rounds up to ``n``), so uneven by at most
    ~``n / 2^53``. Compiled loops compute it with the same operations
    (:func:`surgeon.merge.kernels.arcee_fusion` ``sample``)."""
    u = _shr(words, 11).to(torch.float64).mul_(2.0 ** -53)
    return torch.minimum(u.mul_(n.to(torch.float64)).floor_().to(torch.int64), n - 1)


def uniform_stream(key: int, start: int, n: int, device: torch.device | str = "cpu",
                   compiled: bool = True) -> torch.Tensor:
    """Entries ``[start, start + n)`` of the uniform [0, 1) float32 stream ``key``."""
    device = torch.device(device)
    fill = _compiled_fill() if compiled and device.type == "cpu" else None
    if fill is not None:
        out = torch.empty(n, dtype=torch.float32)
        fill(_signed(key), start, out.numpy())  # one int64 signature; the loop reads it as uint64
        return out
    c = torch.arange(start, start + n, dtype=torch.int64, device=device)
    z = (c >> 1) * _signed(_GAMMA) + _signed(key)  # int64 products wrap modulo 2^64
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    z = z ^ _shr(z, 31)
    bits = torch.where((c & 1) == 0, _shr(z, 40), _shr(z, 8) & 0xFFFFFF)
    return bits.to(torch.float32).mul_(_SCALE)
