"""Counter-based uniform numbers: entry ``i`` of a stream is a pure function of (key, i).

Why not ``torch.rand`` with a seeded generator. DARE draws one number per
entry per model; on CPU ``torch.rand`` runs a sequential Mersenne Twister at
~6 ns per number, which was 3/4 of a ``dare_ties`` merge (5.8 of ~7.5 ms per
block of 2^18 entries, three models). It also draws different numbers on
CUDA (Philox) than on CPU, so a DARE merge on the GPU was not the CPU's merge.

Here entry ``i`` is SplitMix64's output for counter ``i`` (Steele, Lea,
Flood 2014, "Fast splittable pseudorandom number generators"): ``z = key +
i * 0x9E3779B97F4A7C15`` through SplitMix64's finaliser, top 24 bits scaled to
[0, 1). Integer arithmetic is exact, so the same numbers come from numba on
CPU (~1 ns each) and from int64 torch ops on any device, for any slice of the
stream: a block of a tensor gets the numbers the whole tensor would.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

import torch

from ._hist import _numba, compiled

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


@lru_cache(maxsize=1)
def register() -> bool:
    """Teach numba :func:`fill_uniform` (once; False without numba), so that
    compiled merges draw their uniforms in-line, chunk by chunk."""
    if _numba() is None:
        return False
    import numpy as np
    from numba.extending import overload

    @overload(fill_uniform, jit_options={"nogil": True, "boundscheck": False, "error_model": "numpy"})
    def _fill(key, start, out):  # pragma: no cover - compiled
        def fill(key, start, out):
            g, m1, m2 = np.uint64(_GAMMA), np.uint64(_MIX1), np.uint64(_MIX2)
            k = np.uint64(key)
            s = np.uint64(start)
            for i in range(out.shape[0]):
                z = k + (s + np.uint64(i)) * g
                z = (z ^ (z >> np.uint64(30))) * m1
                z = (z ^ (z >> np.uint64(27))) * m2
                z = z ^ (z >> np.uint64(31))
                out[i] = np.float32(np.int64(z >> np.uint64(40))) * np.float32(_SCALE)
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


def uniform_stream(key: int, start: int, n: int, device: torch.device | str = "cpu",
                   compiled: bool = True) -> torch.Tensor:
    """Entries ``[start, start + n)`` of the uniform [0, 1) float32 stream ``key``."""
    device = torch.device(device)
    fill = _compiled_fill() if compiled and device.type == "cpu" else None
    if fill is not None:
        out = torch.empty(n, dtype=torch.float32)
        fill(_signed(key), start, out.numpy())  # one int64 signature; the loop reads it as uint64
        return out
    z = torch.arange(start, start + n, dtype=torch.int64, device=device)
    z = z * _signed(_GAMMA) + _signed(key)        # int64 products wrap modulo 2^64
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    z = z ^ _shr(z, 31)
    return _shr(z, 40).to(torch.float32).mul_(_SCALE)
