"""RAM's arithmetic and RAM+'s kernel: contribution masks and per-tensor counts.

The definitions are :func:`surgeon.merge.methods.ram.ram` and
:func:`~surgeon.merge.methods.ram.ramplus_tl`. RAM is elementwise (its
reference runs block by block); RAM+ makes one pass counting each model's
shared and unique contributing entries (exact integers), then merges block
by block with the resulting ``lambda_i``.
"""
from __future__ import annotations

import torch

from ..tensor import TensorMerge
from .base import Kernel


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


class RamPlusKernel(Kernel):
    """RAM+ streamed: one pass counts shared/unique entries per model, then
    each block is merged with the resulting ``lambda_i``."""

    stat_passes = 1

    def __init__(self, meta: TensorMerge):
        self.eps = float(meta.params["epsilon"])
        self.r = float(meta.params["r"])
        self.alpha = float(meta.params["alpha"])
        n = len(meta.model_params)
        self.shared, self.unique = [0] * n, [0] * n
        self.lambdas: list[float] | None = None

    def observe(self, pass_no: int, blk: TensorMerge) -> None:
        s, u = ramplus_counts(blk.base, list(blk.models), self.eps)
        self.shared = [a + b for a, b in zip(self.shared, s)]
        self.unique = [a + b for a, b in zip(self.unique, u)]

    def end_pass(self, pass_no: int) -> None:
        self.lambdas = ramplus_lambdas(self.shared, self.unique, self.r, self.alpha, self.eps)

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        assert self.lambdas is not None
        return ram_tensors(blk.base, list(blk.models), self.eps, self.lambdas)
