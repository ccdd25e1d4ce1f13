"""The kernel contract (:class:`Kernel`) and the piece/block driver every kernel runs under.

Why blocks. A merge method written with whole-tensor torch ops makes one pass
over memory per op; TIES needs some forty of them, so on a CPU it is bound by
memory bandwidth and by page faults on fresh float32 temporaries, not by
arithmetic. Cutting the same ops into blocks of 2**18 elements (1 MiB per
float32 operand, so a block's working set stays in L2/L3) made TIES' combine
step 5x faster on the 2-core development machine (679 ms -> 136 ms for a
2048 x 5632 tensor, four inputs). Blocks also bound memory: inputs stay in
their stored dtype (bf16: half of float32) and only one block at a time is
float32, so the engine can stream row *pieces* of a tensor from disk and the
peak no longer grows with the largest tensor.

Compiled kernels (TIES, DARE, WIDEN, linear, task arithmetic) go further:
``observe_raw``/``merge_raw`` take a whole piece in its stored dtype and
widen it chunk by chunk inside the loop (:mod:`surgeon.merge.kernels._raw`), so no
float32 copy of a block is made.

A method opts in by declaring itself ``elementwise`` (its ``fn`` then runs on
blocks as it is) or by registering a kernel factory (``MergeMethod.kernel``):
given a tensor's header (:meth:`TensorMerge.header`) it returns a :class:`Kernel` (or
``None`` when these parameters need the whole tensor, e.g. TIES' L1
``rescale``; the method's whole-tensor ``fn`` then runs instead). A kernel
may ask for ``stat_passes`` statistic passes over all of the tensor's blocks
(TIES: two exact selection passes; WIDEN: one pass of column statistics)
before the merge pass. Blocks are always visited in increasing flat order
within a pass; blocks have lengths that are multiples of the kernel's
``align`` (whole rows where it is the row length).

Block boundaries are global multiples of :data:`BLOCK_ELEMS`, whatever the
piece boundaries, so a kernel's result does not depend on how the engine cut
the tensor into pieces (and random methods draw the same numbers: see
:meth:`TensorMerge.uniform`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..tensor import TensorMerge
from ._raw import flat_array, raw_inputs, raw_view

#: elements per block on CPU (1 MiB of float32 per operand); on other devices
#: a block is a whole piece (GPUs want large kernels, not cache blocking)
BLOCK_ELEMS = 1 << 18


@dataclass
class PieceInputs:
    """One contiguous flat range ``[start, start + numel)`` of a tensor's inputs,
    1-D, in their stored dtype (cast to float32 block by block)."""

    start: int
    base: torch.Tensor | None
    models: list[torch.Tensor]
    # called once the piece is merged: hand the memory its data lives in back (read buffers
    # to their pool, mapped file pages to the page cache)
    release: list[Callable[[], None]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        ref = self.base if self.base is not None else self.models[0]
        return ref.numel()


class Kernel:
    """One tensor's kernel: an optimisation of a method's reference function.

    The engine (and :func:`run_in_memory`) drives every kernel the same way:

    1. for each statistic pass ``p`` in ``range(stat_passes)`` for which
       :meth:`pass_needed` is not False: every piece of the tensor, in
       increasing flat order, goes to :meth:`observe_raw` (whole, stored
       dtype); when that returns False the piece is cut into blocks for
       :meth:`observe`; then :meth:`end_pass`;
    2. every piece, in flat order, to :meth:`merge_raw` (whole, from and to
       the stored dtypes); when that returns None, block by block through
       :meth:`merge`.

    Blocks are 1-D float32 :class:`TensorMerge` slices whose ``offset`` is the
    flat index of their first entry; their length is a multiple of
    :attr:`align` (a kernel working on whole rows sets it to the row
    length). Subclasses override what they need; the defaults below are a
    kernel with no statistic passes and no stored-dtype path.
    """

    #: statistic passes over the tensor before the merge pass
    stat_passes: int = 0
    #: block lengths are multiples of this (whole rows: the row length)
    align: int = 1

    def pass_needed(self, pass_no: int) -> bool | None:
        """Whether statistic pass ``pass_no`` is still wanted: False skips it
        (TIES' selection usually settles in its first pass); None while the
        kernel cannot tell yet (the engine then runs it)."""
        return True

    def observe_raw(self, pass_no: int, piece: PieceInputs) -> bool:
        """Statistic pass over a whole piece in its stored dtype; False: the
        engine falls back to :meth:`observe` on float32 blocks."""
        return False

    def observe(self, pass_no: int, blk: TensorMerge) -> None:
        """Statistic pass over one float32 block."""
        raise AssertionError(f"{type(self).__name__} has no statistic passes")

    def end_pass(self, pass_no: int) -> None:
        """Close statistic pass ``pass_no``."""

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        """Merge a whole piece from its stored dtype into ``out`` (1-D, the
        output dtype); returns whether every result was finite, or None when
        these inputs need float32 blocks (:meth:`merge`)."""
        return None

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        """The float32 merged values of one block (same shape as ``blk.base``)."""
        raise NotImplementedError


class CompiledLoop(Kernel):
    """Base of kernels whose one compiled loop, ``_run(base, models, out)``, merges flat arrays
    both from the stored dtype (:meth:`merge_raw`, whole pieces) and as float32 (:meth:`merge`,
    blocks): this class makes the arrays for it. ``reads_base``: False for loops that never read
    the base (then ``base`` is None)."""

    reads_base = True

    def _run(self, base: Any, models: tuple[Any, ...], out: Any) -> bool:
        """Merge into ``out``; whether every result was finite."""
        raise NotImplementedError

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        raw = raw_inputs(piece.base if self.reads_base else None, piece.models)
        o = raw_view(out)
        if raw is None or o is None or (self.reads_base and raw[0] is None):
            return None
        return self._run(raw[0], raw[1], o)

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        ref = blk.models[0]
        out = torch.empty(ref.numel(), dtype=torch.float32)
        base = flat_array(blk.base) if self.reads_base else None
        self._run(base, tuple(flat_array(m) for m in blk.models), out.numpy())
        return out.reshape(ref.shape)


class Elementwise(Kernel):
    """Kernel for a stateless elementwise method: each block through its reference ``fn``."""

    def __init__(self, fn: Callable[[TensorMerge], torch.Tensor]):
        self.fn = fn

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        return self.fn(blk)


def block_ranges(start: int, stop: int, block: int | None) -> Iterator[tuple[int, int]]:
    """Global flat ranges covering ``[start, stop)``, cut at multiples of ``block``."""
    if block is None:
        if stop > start:
            yield start, stop
        return
    a = start
    while a < stop:
        b = min((a // block + 1) * block, stop)
        yield a, b
        a = b


def block_size_for(device: torch.device, align: int = 1) -> int | None:
    """Block length: ``BLOCK_ELEMS`` rounded to a multiple of ``align`` (a
    kernel that works on whole rows sets ``align`` to the row length) on CPU;
    None (whole pieces) elsewhere."""
    if device.type != "cpu":
        return None
    align = max(1, int(align))
    return max(align, (BLOCK_ELEMS // align) * align)


def _block_merge(meta: TensorMerge, piece: PieceInputs, a: int, b: int) -> TensorMerge:
    lo, hi = a - piece.start, b - piece.start
    base = piece.base[lo:hi].to(torch.float32) if piece.base is not None else None
    models = [m[lo:hi].to(torch.float32) for m in piece.models]
    return TensorMerge(meta.name, base, models, meta.model_params, meta.params, seed=meta.seed, role=meta.role,
                       state=meta.state, offset=a)


def observe_piece(kernel: Kernel, meta: TensorMerge, pass_no: int, piece: PieceInputs) -> None:
    """Feed one piece to statistic pass ``pass_no``: whole, in its stored
    dtype, when the kernel's ``observe_raw`` takes it, else block by block."""
    if kernel.observe_raw(pass_no, piece):
        return
    block = block_size_for(piece.models[0].device, kernel.align)
    for a, b in block_ranges(piece.start, piece.start + piece.numel, block):
        kernel.observe(pass_no, _block_merge(meta, piece, a, b))


def merge_piece(kernel: Kernel, meta: TensorMerge, piece: PieceInputs, out: torch.Tensor) -> bool:
    """Merge one piece's blocks into ``out`` (1-D, the output dtype).

    Returns whether every merged value was finite (checked per block on the
    float32 result while it is in cache: one sum, exact test only on doubt).
    The kernel's ``merge_raw(piece, out)`` may merge the whole piece from
    its stored dtype straight into ``out`` (it returns the finiteness, or
    None when these inputs need the float32 blocks).
    """
    finite = kernel.merge_raw(piece, out)
    if finite is not None:
        return bool(finite)
    block = block_size_for(piece.models[0].device, kernel.align)
    finite = True
    for a, b in block_ranges(piece.start, piece.start + piece.numel, block):
        res = kernel.merge(_block_merge(meta, piece, a, b)).reshape(-1)
        if finite and not bool(torch.isfinite(res.sum())) and not bool(torch.isfinite(res).all()):
            finite = False
        out[a - piece.start:b - piece.start].copy_(res)
    return finite


def run_in_memory(kernel: Kernel, meta: TensorMerge, base: torch.Tensor | None,
                  models: Sequence[torch.Tensor]) -> torch.Tensor:
    """Run a kernel over whole in-memory tensors (the API's and tests' path)."""
    flat = PieceInputs(0, base.reshape(-1) if base is not None else None, [m.reshape(-1) for m in models])
    for p in range(kernel.stat_passes):
        if kernel.pass_needed(p):
            observe_piece(kernel, meta, p, flat)
            kernel.end_pass(p)
    out = torch.empty(meta.numel, dtype=torch.float32, device=flat.models[0].device)
    merge_piece(kernel, meta, flat, out)
    return out.reshape(meta.shape)
