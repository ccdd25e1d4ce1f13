"""Arcee Fusion's arithmetic and kernel: row-wise importance, quartile threshold, mask.

The definition is :func:`surgeon.merge.methods.arcee_fusion.arcee_fusion`.
Blocks hold whole rows (the KL divergence is per row); one pass keeps the
importance values the quartiles need (all of them up to
:data:`SAMPLE_SIZE` entries, else a seeded sample of that many: at most
1,000,000 floats), then each block is merged with the threshold.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rng import stream_key
from ..tensor import TensorMerge
from .base import Kernel

SAMPLE_SIZE = 1_000_000
QUARTILES = (0.25, 0.5, 0.75)
_EPS = 1e-8


def importance(m: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|m - b| * KL(softmax(m) + 1e-8 || softmax(b) + 1e-8)`` along the last
    dimension, float32, with mergekit's operations in mergekit's order (so the
    comparisons with the threshold agree)."""
    diff = (m - b).abs()
    p = F.softmax(m, dim=-1) + _EPS
    q = F.softmax(b, dim=-1) + _EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return diff * kl


def threshold_from_sorted(values: torch.Tensor) -> torch.Tensor:
    """``median + 1.5 * (q3 - q1)`` from sorted float32 values, each quartile
    read at index ``floor(q (n - 1))`` (a 0-d float32 tensor)."""
    n = values.numel()
    q1, med, q3 = (values[int(q * (n - 1))] for q in QUARTILES)
    return med + 1.5 * (q3 - q1)


def sample_positions(n: int, seed: int, name: str) -> torch.Tensor | None:
    """The sorted flat positions (drawn with replacement, seeded by the recipe
    seed and the tensor name) whose importance estimates the quartiles, or
    None when all ``n`` values are used (``n <= SAMPLE_SIZE``)."""
    if n <= SAMPLE_SIZE:
        return None
    gen = torch.Generator().manual_seed(stream_key(seed, name, "arcee_fusion") & ((1 << 63) - 1))
    return torch.randint(n, (SAMPLE_SIZE,), generator=gen).sort().values


def row_length(shape: tuple[int, ...]) -> int:
    """Entries per row: the last dimension (a 1-D tensor is one row)."""
    if len(shape) == 0:
        return 1
    return int(shape[-1]) if len(shape) >= 2 else int(shape[0])


class ArceeFusionKernel(Kernel):
    """Arcee Fusion streamed: one pass over whole-row blocks collects the
    importance values for the quartiles; then each block is merged."""

    stat_passes = 1

    def __init__(self, meta: TensorMerge):
        self.cols = row_length(tuple(meta.shape))
        self.align = self.cols
        self.meta = meta
        # the sample's positions (1,000,000 int64: 8 MB) exist only during the statistic pass:
        # the engine makes every tensor's kernel before it merges any, so positions drawn here
        # were held for every large tensor at once (0.9 GB on the 300m family)
        self.pos: torch.Tensor | None = None
        self.parts: list[torch.Tensor] = []
        self.thr: torch.Tensor | None = None

    def _importance(self, blk: TensorMerge) -> torch.Tensor:
        return importance(blk.models[0].reshape(-1, self.cols), blk.base.reshape(-1, self.cols)).reshape(-1)

    def observe(self, pass_no: int, blk: TensorMerge) -> None:
        imp = self._importance(blk)
        if self.pos is None and blk.offset == 0:
            self.pos = sample_positions(self.meta.numel, self.meta.seed, self.meta.name)
        if self.pos is None:
            self.parts.append(imp)
            return
        lo, hi = torch.searchsorted(self.pos, torch.tensor([blk.offset, blk.offset + imp.numel()])).tolist()
        if hi > lo:
            self.parts.append(imp[(self.pos[lo:hi] - blk.offset).to(imp.device)])

    def end_pass(self, pass_no: int) -> None:
        self.thr = threshold_from_sorted(torch.cat(self.parts).sort().values)
        self.parts = []
        self.pos = None

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        assert self.thr is not None
        mask = (self._importance(blk) >= self.thr).to(torch.float32)
        return blk.base + (blk.models[0] - blk.base) * mask
