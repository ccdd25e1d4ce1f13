"""Stored-dtype inputs for the compiled loops: bf16 decoded and encoded chunk by chunk.

Why. The block engine used to cast every block of every input to float32
with torch before a kernel saw it (``blk.base.to(float32)``) and to cast the
float32 result back to the output dtype: on a TIES merge of three bf16
models that is 14 casts per block of 2^18 entries over the three passes,
each writing a fresh 1 MiB temporary (~40 % of the arithmetic on the
development CPU). A compiled kernel can instead read the stored bf16 bits and
widen one 512-entry chunk at a time into a float32 scratch row that stays in
L1 (bf16 is the top half of a float32: a 16-bit shift), and round its
float32 results to bf16 the same way when it writes them.

Exactness. Widening bf16 is exact. Narrowing rounds to nearest, ties to
even, as torch's ``float -> bfloat16`` conversion, so outputs are the bytes a
torch cast of a float32 block writes (tests/test_merge_raw.py compares them).
A NaN becomes 0xFFFF, as in torch's vectorised CPU conversion (its scalar
path, used for the last few entries of a tensor, writes 0x7FC0).

``load(src, dst)``, ``store(src, dst)`` (and ``store_checked`` with
``all_finite``, the output check every merge kernel makes), ``add_if(count, cond)``
and ``fma(a, b, c)`` are numba overloads usable inside any compiled loop, the
first five inlined into it (as calls, each chunk paid a call and two atomic
reference counts per array: a loop of four bf16 loads and a store, 1.05 -> 0.81 ns
an entry); ``src``/``dst`` of the
loads and stores are either float32 arrays or uint16 arrays holding bf16
bits. Editing this file recompiles every loop that inlines it on next use
(the cache is stamped with all kernel sources: :mod:`surgeon.merge.kernels._jit`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ._jit import OVERLOAD_OPTIONS
from ._jit import numba_module as _numba

#: entries per chunk: the scratch rows of a chunk stay in L1
CHUNK = 512


def load(src: np.ndarray, dst: np.ndarray) -> None:  # pragma: no cover - replaced in compiled code
    """Inside compiled loops: ``dst[:len(src)] = float32(src)``."""
    raise NotImplementedError("load is only callable from compiled loops")


def store(src: np.ndarray, dst: np.ndarray) -> None:  # pragma: no cover - replaced in compiled code
    """Inside compiled loops: ``dst[:] = src[:len(dst)]`` in dst's dtype (bf16: round to nearest even)."""
    raise NotImplementedError("store is only callable from compiled loops")


def store_checked(src: np.ndarray, dst: np.ndarray, chk: np.ndarray) -> None:  # pragma: no cover - compiled
    """Inside compiled loops: :func:`store`, after adding ``x - x`` of each
    stored value to ``chk`` (float32 scratch as long as a chunk): ``chk``
    turns NaN once any result is inf or NaN (see :func:`all_finite`)."""
    raise NotImplementedError("store_checked is only callable from compiled loops")


def all_finite(chk: np.ndarray) -> bool:  # pragma: no cover - replaced in compiled code
    """Inside compiled loops: whether every value :func:`store_checked` saw was finite."""
    raise NotImplementedError("all_finite is only callable from compiled loops")


def add_if(count: int, cond: bool) -> int:  # pragma: no cover - replaced in compiled code
    """Inside compiled loops: ``count + 1`` where ``cond``, else ``count``, as an int32 (start
    counts at ``np.int32(0)``), for counts that stay under 2^31 (those of a chunk or of a piece's
    slice). numba widens int32 sums to int64, and a loop keeping int64 counts lanes went from
    16 float32 lanes to 8 and spilled its counts to the stack (breadcrumbs' counting merge:
    1.93 -> 1.13 ns an entry in cache, with the narrowing)."""
    raise NotImplementedError("add_if is only callable from compiled loops")


def fma(a: float, b: float, c: float) -> float:  # pragma: no cover - replaced in compiled code
    """Inside compiled loops: ``a * b + c`` in float32 with one rounding, as
    torch's CPU ``add_(x, alpha=w)`` computes (its vectorised kernel fuses the
    multiply and the add; numba never fuses them on its own)."""
    raise NotImplementedError("fma is only callable from compiled loops")


@lru_cache(maxsize=1)
def register() -> bool:
    """Teach numba ``load`` and ``store`` (once; False without numba).
    Kernel builders call this before they define loops that use them."""
    nb = _numba()
    if nb is None:
        return False
    from numba import types
    from numba.extending import intrinsic, overload

    @overload(load, jit_options=OVERLOAD_OPTIONS, inline="always")
    def _load(src, dst):  # pragma: no cover - compiled
        if isinstance(src.dtype, types.Integer):  # bf16 bits
            def widen(src, dst):
                du = dst.view(np.uint32)
                for j in range(src.shape[0]):
                    du[j] = np.uint32(src[j]) << np.uint32(16)
            return widen

        def copy(src, dst):
            for j in range(src.shape[0]):
                dst[j] = src[j]
        return copy

    @overload(store, jit_options=OVERLOAD_OPTIONS, inline="always")
    def _store(src, dst):  # pragma: no cover - compiled
        if isinstance(dst.dtype, types.Integer):  # bf16 bits, rounded as torch's vectorised cast
            def narrow(src, dst):
                su = src.view(np.uint32)
                for j in range(dst.shape[0]):
                    u = su[j]
                    r = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
                    x = src[j]
                    dst[j] = np.uint16(0xFFFF) if x != x else np.uint16(r)
            return narrow

        def copy(src, dst):
            for j in range(dst.shape[0]):
                dst[j] = src[j]
        return copy

    @overload(store_checked, jit_options=OVERLOAD_OPTIONS, inline="always")
    def _store_checked(src, dst, chk):  # pragma: no cover - compiled
        def checked(src, dst, chk):
            for j in range(dst.shape[0]):
                chk[j] = chk[j] + (src[j] - src[j])
            store(src, dst)
        return checked

    @overload(all_finite, jit_options=OVERLOAD_OPTIONS, inline="always")
    def _all_finite(chk):  # pragma: no cover - compiled
        def finite(chk):
            bad = np.float32(0.0)
            for j in range(chk.shape[0]):
                bad += chk[j]
            return bad == np.float32(0.0)
        return finite

    @overload(add_if, jit_options=OVERLOAD_OPTIONS, inline="always")
    def _add_if(count, cond):  # pragma: no cover - compiled
        def narrowed(count, cond):
            return np.int32(count + np.int32(cond))
        return narrowed

    @intrinsic
    def _fma32(typingctx, a, b, c):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):
            return builder.fma(*args)
        return types.float32(types.float32, types.float32, types.float32), codegen

    @overload(fma, jit_options=OVERLOAD_OPTIONS)
    def _fma(a, b, c):  # pragma: no cover - compiled
        def fused(a, b, c):
            return _fma32(a, b, c)
        return fused

    return True


def raw_view(t: torch.Tensor) -> np.ndarray | None:
    """A flat numpy view of ``t``'s stored values that the compiled loops read
    or write: bf16 as uint16 bits, float32 as is; None for other dtypes, for
    tensors off the CPU and for non-contiguous ones (the caller falls back to
    torch casts)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return None
    if t.dtype == torch.bfloat16:
        return t.reshape(-1).view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float32:
        return t.reshape(-1).numpy()
    return None


def flat_array(t: torch.Tensor) -> np.ndarray:
    """A flat numpy array of a CPU float32 block (a copy only if ``t`` is not contiguous)."""
    return t.detach().reshape(-1).numpy()


def raw_inputs(base: torch.Tensor | None, models: list[torch.Tensor]) -> tuple[Any, tuple[np.ndarray, ...]] | None:
    """Views of a piece's inputs for a compiled loop, or None when they do not
    qualify: the models must share one raw dtype (numba indexes a tuple of
    arrays by a runtime index only when its arrays have one type); the base
    may have either."""
    ms = tuple(raw_view(m) for m in models)
    if not ms or any(m is None for m in ms) or len({m.dtype for m in ms}) != 1:  # type: ignore[union-attr]
        return None
    if base is None:
        return None, ms  # type: ignore[return-value]
    b = raw_view(base)
    return None if b is None else (b, ms)  # type: ignore[return-value]


def based_inputs(base: torch.Tensor | None, models: list[torch.Tensor], applies: bool = True
                 ) -> tuple[np.ndarray, tuple[np.ndarray, ...]] | None:
    """:func:`raw_inputs` for the loops that need a base: None when ``applies``
    is False (the caller's loop is off or does not fit these inputs), when
    there is no base or when the inputs do not qualify."""
    raw = raw_inputs(base, models) if applies else None
    return None if raw is None or raw[0] is None else raw  # type: ignore[return-value]
