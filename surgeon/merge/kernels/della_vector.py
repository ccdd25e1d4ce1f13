"""DELLA's band step in explicit 16-lane vectors: compress-stores and a gather.

What. MagPrune decides a row's band entries (:mod:`surgeon.merge.kernels.della_compiled`)
by comparing each one's magnitude with a partner's. Written as a scalar loop, that step
walks the band's set bits and loads each partner on its own (~1.5 ns a band entry on the
development VM, a mispredicted loop exit every 64 entries); numba's vectoriser emits
neither the compress nor the gather it needs (LLVM's cost model for the host CPU it
names declines gathers). These two operations write them out as LLVM's generic masked
intrinsics, 16 lanes at a time:

- :func:`band_list16`: entries ``i0 .. i0 + 15`` of a row: the band's positions and
  magnitudes appended to slot lists (``llvm.masked.compressstore``), the count returned;
- :func:`band_compare16`: slots ``k .. k + 15``: each band entry's partner magnitude
  gathered (``llvm.masked.gather``) and compared, the keep flags stored in slot order.

Where they apply. On a CPU with AVX-512 the intrinsics are single instructions
(``vpcompressd``, ``vpgatherdd``); elsewhere LLVM writes them out as scalar code, which is
correct but no faster than the walk: :func:`preferred` says which path a CPU should take,
and the statistic loop takes either (tests run both everywhere).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from ._jit import numba_module as _numba

#: lanes of one operation (32-bit entries: one 512-bit vector)
LANES = 16


def band_list16(in_band: np.ndarray, mags: np.ndarray, i0: int, idx: np.ndarray, bm: np.ndarray,
                k: int) -> int:  # pragma: no cover - replaced in compiled code
    """Inside compiled loops: of entries ``i0 .. i0 + 15`` (``in_band`` uint8 0/1, ``mags``
    uint32, both readable 16 entries past ``i0``), append the band's positions (uint32) to
    ``idx`` and their magnitudes to ``bm`` from slot ``k`` on, in increasing position;
    returns how many."""
    raise NotImplementedError("band_list16 is only callable from compiled loops")


def band_compare16(mags: np.ndarray, idx: np.ndarray, offs: np.ndarray, bm: np.ndarray, kb: np.ndarray,
                   k: int) -> None:  # pragma: no cover - replaced in compiled code
    """Inside compiled loops: for slots ``k .. k + 15``, with ``i = idx[s]`` and ``off = offs[s]``
    (the partner's offset among the row's other entries), ``kb[s] = 1`` when ``bm[s]`` (entry
    ``i``'s magnitude) exceeds ``y = mags[off + (off >= i)]``, or equals it and ``off < i``
    (ties by position), else 0."""
    raise NotImplementedError("band_compare16 is only callable from compiled loops")


def llvm_opaque_pointers() -> bool:
    """Whether numba's LLVM has only opaque pointers (LLVM 17 on)."""
    from llvmlite import binding

    return tuple(binding.llvm_version_info) >= (17,)


@lru_cache(maxsize=1)
def preferred() -> bool:
    """Whether the host CPU runs the intrinsics as vector instructions (AVX-512F: numba
    compiles for the host, with an LLVM that takes the gather intrinsic); else the
    statistic loop keeps its scalar walk."""
    nb = _numba()
    if nb is None:
        return False
    try:
        from llvmlite import binding

        return llvm_opaque_pointers() and bool(binding.get_host_cpu_features().get("avx512f", False))
    except Exception:  # noqa: BLE001 - a feature query that fails means: do not rely on it
        return False


@lru_cache(maxsize=1)
def register() -> bool:
    """Teach numba :func:`band_list16` and :func:`band_compare16` (once; False without numba)."""
    nb = _numba()
    if nb is None:
        return False
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic, overload

    # LLVM 17 on has only opaque pointers: the gather's name is ``...v16p0``; before, the name
    # spells the pointee type (and depends on how llvmlite emits pointers), so older LLVMs get
    # sixteen loads instead, which :func:`preferred` does not choose
    opaque = llvm_opaque_pointers()
    i1, i8, i16, i32, i64 = (ir.IntType(w) for w in (1, 8, 16, 32, 64))
    v1, v8, v32, v64 = (ir.VectorType(t, LANES) for t in (i1, i8, i32, i64))

    def at(context: Any, builder: Any, aryty: Any, ary: Any, index: Any, vector: Any) -> Any:
        """A pointer to ``ary[index]`` as a pointer to ``vector``."""
        a = context.make_array(aryty)(context, builder, ary)
        return builder.bitcast(cgutils.get_item_pointer(context, builder, aryty, a, [index]), vector.as_pointer())

    def splat(builder: Any, value: Any, vector: Any) -> Any:
        """``value`` in every lane of ``vector``."""
        one = builder.insert_element(ir.Constant(vector, None), value, i32(0))
        return builder.shuffle_vector(one, ir.Constant(vector, None), ir.Constant(v32, [0] * LANES))

    def declare(builder: Any, name: str, ret: Any, args: list[Any]) -> Any:
        return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)

    def arrays(*pairs: tuple[Any, Any]) -> bool:
        """Whether each (type, dtype) is a C-contiguous 1-D array of that dtype."""
        return all(isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C" and t.dtype == d for t, d in pairs)

    @intrinsic
    def _band_list16(typingctx, in_band, mags, i0, idx, bm, k):  # pragma: no cover - compiled
        if not arrays((in_band, types.uint8), (mags, types.uint32), (idx, types.uint32), (bm, types.uint32)):
            return None

        def codegen(context, builder, signature, args):
            ft, mt, _, it, bt, _ = signature.args
            flags_, mags_, i0_, idx_, bm_, k_ = args
            mask = builder.icmp_unsigned("!=", builder.load(at(context, builder, ft, flags_, i0_, v8), align=1),
                                         ir.Constant(v8, None))
            pos = builder.add(splat(builder, builder.trunc(i0_, i32), v32), ir.Constant(v32, list(range(LANES))))
            store = declare(builder, "llvm.masked.compressstore.v16i32", ir.VoidType(), [v32, i32.as_pointer(), v1])
            to_idx = builder.bitcast(at(context, builder, it, idx_, k_, v32), i32.as_pointer())
            builder.call(store, [pos, to_idx, mask])
            mag = builder.load(at(context, builder, mt, mags_, i0_, v32), align=4)
            builder.call(store, [mag, builder.bitcast(at(context, builder, bt, bm_, k_, v32), i32.as_pointer()), mask])
            count = builder.call(declare(builder, "llvm.ctpop.i16", i16, [i16]), [builder.bitcast(mask, i16)])
            return builder.zext(count, i64)
        return types.int64(in_band, mags, types.int64, idx, bm, types.int64), codegen

    @intrinsic
    def _band_compare16(typingctx, mags, idx, offs, bm, kb, k):  # pragma: no cover - compiled
        if not arrays((mags, types.uint32), (idx, types.uint32), (offs, types.uint32), (bm, types.uint32),
                      (kb, types.uint8)):
            return None

        def codegen(context, builder, signature, args):
            mt, it, ot, bt, kt, _ = signature.args
            mags_, idx_, offs_, bm_, kb_, k_ = args
            pos = builder.load(at(context, builder, it, idx_, k_, v32), align=4)
            off = builder.load(at(context, builder, ot, offs_, k_, v32), align=4)
            mine = builder.load(at(context, builder, bt, bm_, k_, v32), align=4)
            j = builder.add(off, builder.zext(builder.icmp_unsigned(">=", off, pos), v32))
            # the partners' addresses: the row's first entry + 4 j (llvmlite's gep takes no vector index)
            row = builder.ptrtoint(at(context, builder, mt, mags_, context.get_constant(types.intp, 0), v32), i64)
            addrs = builder.add(splat(builder, row, v64), builder.shl(builder.zext(j, v64), ir.Constant(v64, [2] * LANES)))
            ptrs = builder.inttoptr(addrs, ir.VectorType(i32.as_pointer(), LANES))
            if opaque:
                gather = declare(builder, "llvm.masked.gather.v16i32.v16p0", v32, [ptrs.type, i32, v1, v32])
                theirs = builder.call(gather, [ptrs, i32(4), ir.Constant(v1, [1] * LANES), ir.Constant(v32, None)])
            else:  # an LLVM whose intrinsic names spell the pointee: one load a lane (valid everywhere)
                theirs = ir.Constant(v32, None)
                for lane in range(LANES):
                    theirs = builder.insert_element(
                        theirs, builder.load(builder.extract_element(ptrs, i32(lane)), align=4), i32(lane))
            kept = builder.or_(builder.icmp_unsigned(">", mine, theirs),
                               builder.and_(builder.icmp_unsigned("==", mine, theirs),
                                            builder.icmp_unsigned("<", off, pos)))
            builder.store(builder.zext(kept, v8), at(context, builder, kt, kb_, k_, v8), align=1)
            return context.get_dummy_value()
        return types.void(mags, idx, offs, bm, kb, types.int64), codegen

    options = {"nogil": True, "boundscheck": False, "error_model": "numpy"}

    @overload(band_list16, jit_options=options, inline="always")
    def _list(in_band, mags, i0, idx, bm, k):  # pragma: no cover - compiled
        return lambda in_band, mags, i0, idx, bm, k: _band_list16(in_band, mags, np.int64(i0), idx, bm,
                                                                  np.int64(k))

    @overload(band_compare16, jit_options=options, inline="always")
    def _compare(mags, idx, offs, bm, kb, k):  # pragma: no cover - compiled
        return lambda mags, idx, offs, bm, kb, k: _band_compare16(mags, idx, offs, bm, kb, np.int64(k))

    return True
