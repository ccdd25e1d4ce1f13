"""passthrough's kernel for ``scale: 1``: a copy from the stored dtype.

The definition is :func:`surgeon.merge.methods.passthrough.passthrough`
(``x * scale`` in float32). With ``scale`` 1 that is ``x`` itself, so each
piece is copied from its stored dtype straight into the output (one cast, as
the float32 block path's final store does) instead of being widened to
float32 blocks and narrowed again: a frankenmerge's copied layers cost a
memory copy. Other scales use the reference block by block.
"""
from __future__ import annotations

import torch

from ..tensor import TensorMerge
from .base import Kernel, PieceInputs


class CopyKernel(Kernel):
    """``passthrough`` with ``scale`` 1: pieces copied from their stored dtype."""

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        src = piece.models[0]
        out.copy_(src)
        # finiteness of the (float32-exact) values, as the block path checks it
        return bool(torch.isfinite(src.sum())) or bool(torch.isfinite(src).all())

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        return blk.models[0].clone()
