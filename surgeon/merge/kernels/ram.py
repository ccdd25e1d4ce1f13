"""RAM's arithmetic and RAM+'s kernel: contribution masks and per-tensor counts.

The definitions are :func:`surgeon.merge.methods.ram.ram` and
:func:`~surgeon.merge.methods.ram.ramplus_tl`. RAM is elementwise; RAM+
makes one pass counting each model's shared and unique contributing entries
(exact integers), then merges with the resulting ``lambda_i``.
"""
from __future__ import annotations

import numpy as np
import torch

from ..tensor import TensorMerge
from . import ram_compiled
from ._raw import based_inputs, raw_view
from .base import Kernel, PieceInputs

#: a one-pass RAM+ lists up to 1/ONE_PASS_ROOM of the tensor's entries (plus 4096) before it
#: mixes the whole tensor again instead
ONE_PASS_ROOM = 16


def _masks(base: torch.Tensor, models: list[torch.Tensor], eps: float
           ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Task vectors, their contribution masks (``|delta| > eps``) and the per-entry contributor count."""
    deltas = [m - base for m in models]
    nonzero = [d.abs() > eps for d in deltas]
    count = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for nz in nonzero:
        count += nz
    return deltas, nonzero, count


def ram_tensors(base: torch.Tensor, models: list[torch.Tensor], epsilon: float = 1e-5,
                unique_scale: list[float] | None = None) -> torch.Tensor:
    """RAM, float32: base plus, per entry, the one contributing delta (times
    ``unique_scale[i]``, RAM+'s ``lambda_i``; 1 for RAM) or the mean of the
    contributing deltas.

    Per model the term is ``d / max(c, 1)`` (``d * lambda_i`` where the entry
    is unique and ``lambda_i != 1``), with ``d`` zeroed where it does not
    contribute; the terms are summed in model order. These are the values
    mergekit's ``d * unique * lambda + d * shared / max(c, 1)`` takes, rounding
    for rounding (one of its two products is always zero)."""
    base = base.to(torch.float32)
    if not models:
        return base.clone()
    deltas, nonzero, count = _masks(base, [m.to(torch.float32) for m in models], epsilon)
    div = count.clamp(min=1).to(torch.float32)
    unique = None
    merged: torch.Tensor | None = None
    for i, (d, nz) in enumerate(zip(deltas, nonzero)):
        d.mul_(nz)
        term = d / div
        lam = 1.0 if unique_scale is None else float(unique_scale[i])
        if lam != 1.0:
            if unique is None:
                unique = count == 1
            term = torch.where(unique, d * lam, term)
        merged = term if merged is None else merged.add_(term)
    assert merged is not None
    return base + merged


def ramplus_counts(base: torch.Tensor, models: list[torch.Tensor], epsilon: float) -> tuple[list[int], list[int]]:
    """Per model: how many of its contributing entries are shared, how many unique."""
    _, nonzero, count = _masks(base.to(torch.float32), [m.to(torch.float32) for m in models], epsilon)
    unique = count == 1
    shared = count > 1
    return ([int((nz & shared).sum()) for nz in nonzero], [int((nz & unique).sum()) for nz in nonzero])


def ramplus_lambdas(shared: list[int], unique: list[int], r: float, alpha: float, epsilon: float) -> list[float]:
    """``lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha)`` (float32, as mergekit)."""
    s = torch.tensor(shared, dtype=torch.float32)
    u = torch.tensor(unique, dtype=torch.float32).clamp(min=epsilon)
    return (1 + r * (s / u).clamp(min=0, max=alpha)).tolist()


class RamKernel(Kernel):
    """RAM, and RAM+ streamed (``plus``: one pass counts shared/unique entries
    per model, then each piece is merged with the resulting ``lambda_i``; a tensor in one
    piece on CPU is merged in one pass: :meth:`_one_pass_mix`).
    With numba both passes take whole pieces in their stored dtype
    (:mod:`surgeon.merge.kernels.ram_compiled`); the torch block path is the
    fallback and the definition those loops follow."""

    def __init__(self, meta: TensorMerge, plus: bool):
        self.eps = float(meta.params["epsilon"])
        self.plus = plus
        self.stat_passes = 1 if plus else 0
        if plus:
            self.r = float(meta.params["r"])
            self.alpha = float(meta.params["alpha"])
        n = len(meta.model_params)
        self.numel = meta.numel
        self.shared, self.unique = [0] * n, [0] * n
        self.lambdas: list[float] | None = None
        self._one_pass = False  # the tensor is one piece: the merge counts it (RAM+)

    def observe(self, pass_no: int, blk: TensorMerge) -> None:
        s, u = ramplus_counts(blk.base, list(blk.models), self.eps)
        self.shared = [a + b for a, b in zip(self.shared, s)]
        self.unique = [a + b for a, b in zip(self.unique, u)]

    def pass_needed(self, pass_no: int) -> bool | None:
        return not self._one_pass

    def end_pass(self, pass_no: int) -> None:
        if not self._one_pass:
            self.lambdas = ramplus_lambdas(self.shared, self.unique, self.r, self.alpha, self.eps)

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        assert self.lambdas is not None or not self.plus
        return ram_tensors(blk.base, list(blk.models), self.eps, self.lambdas)

    def _raw(self, piece: PieceInputs) -> tuple[np.ndarray, tuple[np.ndarray, ...]] | None:
        return based_inputs(piece.base, piece.models, ram_compiled.available())

    def observe_raw(self, pass_no: int, piece: PieceInputs) -> bool:
        raw = self._raw(piece)
        if raw is None:
            return False
        if piece.start == 0 and piece.numel == self.numel:  # the whole tensor: the merge counts it
            self._one_pass = True
            return True
        self._count(raw)
        return True

    def _count(self, raw: tuple[np.ndarray, tuple[np.ndarray, ...]]) -> None:
        shared = np.zeros(len(self.shared), dtype=np.int64)
        unique = np.zeros(len(self.unique), dtype=np.int64)
        ram_compiled.ram_counts(raw[0], raw[1], self.eps, shared, unique)
        self.shared = [a + int(b) for a, b in zip(self.shared, shared)]
        self.unique = [a + int(b) for a, b in zip(self.unique, unique)]

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        raw, o = self._raw(piece), raw_view(out)
        if self._one_pass and raw is not None and o is None:  # float32 blocks need the lambdas: count first
            self._one_pass = False
            self._count(raw)
            self.end_pass(0)
        if raw is None or o is None:
            return None
        if self._one_pass:
            return self._one_pass_mix(raw[0], raw[1], o)
        return ram_compiled.ram_mix(raw[0], raw[1], self.eps, self.lambdas, o)

    def _one_pass_mix(self, base: np.ndarray, models: tuple[np.ndarray, ...], out: np.ndarray) -> bool:
        """RAM+ of the whole tensor in one pass over its inputs, equal to the two-pass merge.

        ``lambda_i`` scales only the entries model i alone contributes to (0.15 % of a 1.1B
        fine-tune's): the mix runs with every ``lambda_i`` at 1 while it counts the shared and
        unique entries and lists those entries (their inputs copied while in cache); the counts
        give the lambdas, and the listed entries are mixed again with them and written over the
        first results. When more entries are listed than there is room for, the whole tensor is
        mixed again."""
        n, nm = base.shape[0], len(models)
        alone = ram_compiled.Alone.empty(nm, min(n, n // ONE_PASS_ROOM + 4096), base.dtype, models[0].dtype)
        finite = ram_compiled.ram_mix(base, models, self.eps, None, out, alone)
        self.shared = [a + int(b) for a, b in zip(self.shared, alone.shared)]
        self.unique = [a + int(b) for a, b in zip(self.unique, alone.unique)]
        self._one_pass = False
        self.end_pass(0)
        if alone.entries.overflowed:
            return ram_compiled.ram_mix(base, models, self.eps, self.lambdas, out)
        return alone.entries.merge_again(
            out, lambda b, ms, into: ram_compiled.ram_mix(b, ms, self.eps, self.lambdas, into), finite)
