"""Block-wise merging: elementwise methods computed over cache-sized blocks.

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
widen it chunk by chunk inside the loop (:mod:`surgeon.merge._raw`), so no
float32 copy of a block is made.

A method opts in by declaring itself ``elementwise`` (its ``fn`` then runs on
blocks as it is) or by registering a kernel factory (``MergeMethod.kernel``):
given a tensor's :class:`TensorMeta` it returns a :class:`BlockKernel` (or
``None`` when these parameters need the whole tensor, e.g. TIES' L1
``rescale``; the method's whole-tensor ``fn`` then runs instead). A kernel
may ask for ``stat_passes`` statistic passes over all of the tensor's blocks
(TIES: two exact selection passes; WIDEN: one pass of column statistics)
before the merge pass. Blocks are always visited in increasing flat order
within a pass; a kernel with an ``align`` attribute gets blocks whose length
is a multiple of it (whole rows).

Block boundaries are global multiples of :data:`BLOCK_ELEMS`, whatever the
piece boundaries, so a kernel's result does not depend on how the engine cut
the tensor into pieces (and random methods draw the same numbers: see
:meth:`TensorMerge.uniform`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from .registry import MergeMethod, TensorMerge

#: elements per block on CPU (1 MiB of float32 per operand); on other devices
#: a block is a whole piece (GPUs want large kernels, not cache blocking)
BLOCK_ELEMS = 1 << 18


@dataclass
class TensorMeta:
    """What a kernel factory knows about a tensor before any weight is read."""

    name: str
    shape: tuple[int, ...]
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    has_base: bool
    seed: int = 0
    role: str = "other"
    state: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


class BlockKernel(Protocol):
    """Per-tensor state of a block-wise method.

    ``observe(p, blk)`` sees every block of statistic pass ``p`` (``0 <= p <
    stat_passes``), ``end_pass(p)`` closes it; a kernel may define
    ``pass_needed(p)`` to skip passes it turns out not to need (see
    :func:`pass_needed`); ``merge(blk)`` returns the
    float32 merged values of one block (same shape as ``blk.base``). Block
    tensors are 1-D; ``blk.offset`` is the flat index of their first entry.
    """

    stat_passes: int

    def observe(self, pass_no: int, blk: TensorMerge) -> None: ...

    def end_pass(self, pass_no: int) -> None: ...

    def merge(self, blk: TensorMerge) -> torch.Tensor: ...


class Elementwise:
    """Kernel for a stateless elementwise method: each block through ``fn``."""

    stat_passes = 0

    def __init__(self, fn: Callable[[TensorMerge], torch.Tensor]):
        self.fn = fn

    def observe(self, pass_no: int, blk: TensorMerge) -> None:  # pragma: no cover - no passes
        raise AssertionError("stateless kernel has no statistic passes")

    def end_pass(self, pass_no: int) -> None:  # pragma: no cover - no passes
        raise AssertionError("stateless kernel has no statistic passes")

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


@dataclass
class PieceInputs:
    """One contiguous flat range ``[start, start + numel)`` of a tensor's inputs,
    1-D, in their stored dtype (cast to float32 block by block)."""

    start: int
    base: torch.Tensor | None
    models: list[torch.Tensor]
    # read buffers the data lives in, handed back to their pool once the piece is merged
    buffers: list[torch.Tensor] = field(default_factory=list)

    @property
    def numel(self) -> int:
        ref = self.base if self.base is not None else self.models[0]
        return ref.numel()


def _block_merge(meta: TensorMeta, piece: PieceInputs, a: int, b: int) -> TensorMerge:
    lo, hi = a - piece.start, b - piece.start
    base = piece.base[lo:hi].to(torch.float32) if piece.base is not None else None
    models = [m[lo:hi].to(torch.float32) for m in piece.models]
    return TensorMerge(meta.name, base, models, meta.model_params, meta.params, seed=meta.seed, role=meta.role,
                       state=meta.state, offset=a)


def pass_needed(kernel: BlockKernel, pass_no: int) -> bool | None:
    """Whether the kernel wants statistic pass ``pass_no``: a kernel with
    ``pass_needed`` may skip passes (TIES' selection usually settles in its
    first) and answers None while it cannot tell yet; others want them all."""
    ask = getattr(kernel, "pass_needed", None)
    return True if ask is None else ask(pass_no)


def observe_piece(kernel: BlockKernel, meta: TensorMeta, pass_no: int, piece: PieceInputs) -> None:
    """Feed one piece to statistic pass ``pass_no``: whole, in its stored
    dtype, to a kernel whose ``observe_raw`` takes it, else block by block."""
    raw = getattr(kernel, "observe_raw", None)
    if raw is not None and raw(pass_no, piece):
        return
    block = block_size_for(piece.models[0].device, getattr(kernel, "align", 1))
    for a, b in block_ranges(piece.start, piece.start + piece.numel, block):
        kernel.observe(pass_no, _block_merge(meta, piece, a, b))


def merge_piece(kernel: BlockKernel, meta: TensorMeta, piece: PieceInputs, out: torch.Tensor) -> bool:
    """Merge one piece's blocks into ``out`` (1-D, the output dtype).

    Returns whether every merged value was finite (checked per block on the
    float32 result while it is in cache: one sum, exact test only on doubt).
    A kernel with ``merge_raw(piece, out)`` may merge the whole piece from
    its stored dtype straight into ``out`` (it returns the finiteness, or
    None when these inputs need the float32 blocks).
    """
    raw = getattr(kernel, "merge_raw", None)
    if raw is not None:
        finite = raw(piece, out)
        if finite is not None:
            return bool(finite)
    block = block_size_for(piece.models[0].device, getattr(kernel, "align", 1))
    finite = True
    for a, b in block_ranges(piece.start, piece.start + piece.numel, block):
        res = kernel.merge(_block_merge(meta, piece, a, b)).reshape(-1)
        if finite and not bool(torch.isfinite(res.sum())) and not bool(torch.isfinite(res).all()):
            finite = False
        out[a - piece.start:b - piece.start].copy_(res)
    return finite


def run_in_memory(kernel: BlockKernel, meta: TensorMeta, base: torch.Tensor | None,
                  models: Sequence[torch.Tensor]) -> torch.Tensor:
    """Run a kernel over whole in-memory tensors (the API's and tests' path)."""
    flat = PieceInputs(0, base.reshape(-1) if base is not None else None, [m.reshape(-1) for m in models])
    for p in range(kernel.stat_passes):
        if pass_needed(kernel, p):
            observe_piece(kernel, meta, p, flat)
            kernel.end_pass(p)
    out = torch.empty(meta.numel, dtype=torch.float32, device=flat.models[0].device)
    merge_piece(kernel, meta, flat, out)
    return out.reshape(meta.shape)


def meta_of(t: TensorMerge) -> TensorMeta:
    ref = t.base if t.base is not None else t.models[0]
    return TensorMeta(t.name, tuple(ref.shape), t.model_params, t.params, t.base is not None, seed=t.seed,
                      role=t.role, state=t.state, device=ref.device)


def apply_method(method: MergeMethod, t: TensorMerge) -> torch.Tensor:
    """Merge one whole tensor: through the method's block kernel when it has
    one for these parameters, else through its whole-tensor ``fn``."""
    if method.blockwise and t.models:
        kernel = method.block_kernel(meta_of(t))
        if kernel is not None:
            from ._common import check_inputs

            check_inputs(t, method.name, needs_base=method.needs_base, min_models=method.min_models,
                         max_models=method.max_models)
            return run_in_memory(kernel, meta_of(t), t.base, t.models)
    return method.fn(t)


# ---------------------------------------------------------------------------
# Sign consensus with float arithmetic only.

def consensus_mix(deltas: Sequence[torch.Tensor], weights: Sequence[float], consensus: str, normalize: bool,
                  zero_sign: float = 1.0) -> torch.Tensor:
    """TIES' elect-and-mix on weighted task vectors, with float ops only.

    ``s = sign(sum_i d_i)`` (``consensus: sum``) or ``sign(sum_i sign d_i)``
    (``count``), ``zero_sign`` where that is 0; an entry of ``d_i`` agrees when
    ``d_i * s > 0`` (a trimmed zero never agrees). Returns ``sum_i
    [agree] d_i``, divided by ``sum_i [agree] w_i`` when ``normalize`` (1
    where that is 0). Uses ``relu(d * s) * s == [agree] d`` (exact, since
    ``s = +-1``) instead of boolean masks and ``where``: comparisons that
    produce bool tensors and ``where`` ran 4-15x slower than float ops on CPU.
    """
    if consensus == "sum":
        acc = torch.add(deltas[0], deltas[1]) if len(deltas) > 1 else deltas[0].clone()
        for d in deltas[2:]:
            acc.add_(d)
    else:
        acc = torch.sign(deltas[0])
        for d in deltas[1:]:
            acc.add_(torch.sign(d))
    s = acc.sign_()
    if zero_sign in (1.0, -1.0):
        s.add_(0.5 * zero_sign).sign_()  # 0 -> zero_sign, +-1 unchanged: two ops instead of five
    elif zero_sign:
        s.add_(s.abs().neg_().add_(1.0).mul_(float(zero_sign)))
    # the first model starts the sums (no zero-filled accumulators)
    mixed = torch.mul(deltas[0], s).relu_()
    div = torch.sign(mixed) if normalize else None
    if div is not None and weights[0] != 1.0:
        div.mul_(weights[0])
    tmp = torch.empty_like(s)
    for d, w in zip(deltas[1:], weights[1:]):
        torch.mul(d, s, out=tmp).relu_()
        mixed.add_(tmp)
        if div is not None:
            div.add_(tmp.sign_(), alpha=w)
    if div is not None:
        if min(weights) > 0:
            # a zero divisor means no model agrees, so ``mixed`` is 0 there: any
            # positive divisor gives the same 0 as the reference's 1
            div.clamp_(min=torch.finfo(div.dtype).tiny)
        else:
            div.add_(div.abs().sign_().neg_().add_(1.0))  # 0 -> 1
        mixed.div_(div)
    return mixed.mul_(s)
