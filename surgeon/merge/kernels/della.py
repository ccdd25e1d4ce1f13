"""DELLA's arithmetic and kernel: MagPrune on whole rows, L1 sums streamed.

The definition is :func:`surgeon.merge.methods.della.della` /
``della_linear``; tests/test_merge_conformance.py proves this kernel equal to it.

MagPrune ranks the entries of each row (dim 1) by magnitude, so blocks hold
whole rows (``align``: the entries under one index of dim 0); the uniforms
come from one CPU generator per model, drawn in flat order, so drawing them
block by block in flat order gives the numbers the whole tensor would get
(CPU ``torch.rand`` is serial; a CUDA generator is not split this way: the
kernel declines other devices). ``rescale`` needs each task vector's L1 norm
before and after pruning over the whole tensor: one statistic pass sums them
(float64, as the reference does) and keeps each block's keep mask packed to
bits (1/16 of the bf16 inputs of a pruned model, for the tensor being merged
only), so the merge pass neither ranks nor draws again.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

from ..arith import L1_EPS, combine
from ..select.exact import stable_ranks
from ..select.ranks import magnitude_ranks
from ..tensor import TensorMerge
from .base import Kernel


def della_params_ok(density: float, epsilon: float) -> bool:
    """Whether MagPrune accepts these parameters (else the reference raises the error)."""
    return density >= 1 or density <= 0 or (density + epsilon < 1 and density - epsilon > 0)


def rows_view(delta: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``delta`` (the tensor or a block of whole rows of a tensor of ``shape``)
    as MagPrune's rows: dim 1 is ranked (a 1-D tensor is one row)."""
    if len(shape) < 2:
        return delta.reshape(1, -1)
    return delta.reshape(-1, *shape[1:])


def magprune_keep(rows: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
                  compiled: bool = False) -> torch.Tensor:
    """MagPrune's keep mask (bool, shape of ``rows``): rank ``|rows|`` along
    dim 1, keep with probability ``density - epsilon + 2 epsilon rank / (n - 1)``;
    draws ``rows.numel()`` uniforms from ``generator``. ``compiled``: rank 2-D rows
    with the compiled radix loop (:func:`surgeon.merge.select.ranks.magnitude_ranks`,
    the same ranks); the reference function ranks with torch."""
    n = rows.shape[1]
    if n > 1:
        ranks = magnitude_ranks(rows) if compiled and rows.dim() == 2 else stable_ranks(rows.abs(), dim=1)
        rank = ranks.to(torch.float32).div_(n - 1)
    else:
        rank = torch.full(rows.shape, 0.5, dtype=torch.float32, device=rows.device)
    probs = rank.mul_(2 * epsilon).add_(density - epsilon)
    u = torch.rand(rows.shape, generator=generator, device=rows.device, dtype=torch.float32)
    return u < probs


def l1_sum(t: torch.Tensor) -> float:
    """``sum |t|`` accumulated in float64 (the rescale's norms: block partial
    sums add up to the whole tensor's to float64 rounding, which float32 sums
    would not)."""
    return float(t.abs().sum(dtype=torch.float64))


def l1_scale(before: float, after: float) -> float | None:
    """The rescale factor ``before / after`` (None: either norm below :data:`L1_EPS`, no rescale)."""
    if before < L1_EPS or after < L1_EPS:
        return None
    return before / after


class DellaKernel(Kernel):
    """``della`` / ``della_linear`` on blocks of whole rows (CPU)."""

    def __init__(self, meta: TensorMerge, consensus: str | None):
        p = meta.params
        self.meta = meta
        self.consensus = consensus
        self.normalize = bool(p["normalize"])
        self.lam = float(p["lambda"])
        self.dens = [float(mp["density"]) for mp in meta.model_params]
        self.eps = [float(mp["epsilon"]) for mp in meta.model_params]
        self.prunes = [0 < d < 1 for d in self.dens]
        shape = tuple(meta.shape)
        self.align = meta.numel if len(shape) < 2 else meta.numel // max(1, shape[0])
        self.rescale = bool(p["rescale"])
        self.stat_passes = 1 if self.rescale and any(self.prunes) else 0
        n = len(self.dens)
        self.before = [0.0] * n
        self.after = [0.0] * n
        self.scale: list[float | None] = [None] * n
        self._gens: list[torch.Generator | None] | None = None
        self._next = 0
        # the statistic pass's keep masks, block by block in flat order: (offset, numel, packed bits per model)
        self._masks: deque[tuple[int, int, list[np.ndarray | None]]] = deque()

    def _start(self, offset: int, numel: int) -> list[torch.Generator | None]:
        """The generators at this block (restarted at offset 0); blocks must come in flat order."""
        if offset == 0:
            self._gens = [self.meta.generator(f"della:{i}") if pr else None for i, pr in enumerate(self.prunes)]
            self._next = 0
        if offset != self._next or self._gens is None:
            raise RuntimeError(f"tensor {self.meta.name!r}: della blocks out of order ({offset} != {self._next})")
        self._next = offset + numel
        return self._gens

    def _pruned(self, blk: TensorMerge, keep_bits: list[np.ndarray | None] | None = None
                ) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        """Per model: (task vector, pruned task vector and keep mask, or None and None where nothing is drawn).
        ``keep_bits``: the statistic pass's packed keep masks (else ranked and drawn here)."""
        n = blk.base.numel()
        gens = self._start(blk.offset, n) if keep_bits is None else None
        out = []
        shape = tuple(self.meta.shape)
        for i, m in enumerate(blk.models):
            d = m - blk.base
            if not self.prunes[i]:
                out.append((d if self.dens[i] >= 1 else d.zero_(), None, None))
                continue
            rows = rows_view(d, shape)
            if keep_bits is None:
                keep = magprune_keep(rows, self.dens[i], self.eps[i], gens[i], compiled=True)  # type: ignore[index,arg-type]
            else:
                keep = torch.from_numpy(np.unpackbits(keep_bits[i], count=n).view(np.bool_)).reshape(rows.shape)
            out.append((d, (rows * keep).reshape(d.shape), keep))
        return out

    def observe(self, pass_no: int, blk: TensorMerge) -> None:
        bits: list[np.ndarray | None] = []
        for i, (d, pruned, keep) in enumerate(self._pruned(blk)):
            if pruned is None or keep is None:
                bits.append(None)
                continue
            self.before[i] += l1_sum(d)
            self.after[i] += l1_sum(pruned)
            bits.append(np.packbits(keep.reshape(-1).numpy()))
        self._masks.append((blk.offset, blk.base.numel(), bits))

    def end_pass(self, pass_no: int) -> None:
        self.scale = [l1_scale(b, a) if pr else None for b, a, pr in zip(self.before, self.after, self.prunes)]
        self._gens = None

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        keep_bits = None
        if self.stat_passes:
            offset, numel, keep_bits = self._masks.popleft()
            if (offset, numel) != (blk.offset, blk.base.numel()):
                raise RuntimeError(f"tensor {self.meta.name!r}: della merge block {blk.offset}+{blk.base.numel()} "
                                   f"is not the statistic pass's {offset}+{numel}")
        deltas = []
        for i, (d, pruned, _) in enumerate(self._pruned(blk, keep_bits)):
            if pruned is None:
                deltas.append(d)
                continue
            if self.rescale and self.scale[i] is not None:
                pruned.mul_(self.scale[i])
            deltas.append(pruned)
        return combine(blk, deltas, consensus=self.consensus, normalize=self.normalize, lam=self.lam)
