"""DARE's kernel: drop, rescale, weight (and elect) through the compiled TIES/DARE loop.

The definition is :func:`surgeon.merge.methods.dare.dare_ties` /
``dare_linear``; tests/test_merge_conformance.py proves this kernel equal to it.
"""
from __future__ import annotations

import numpy as np
import torch

from ..arith import weight_total
from ..rng import stream_key
from ..tensor import TensorMerge
from . import ties_compiled
from ._raw import based_inputs, raw_view
from .base import Kernel, PieceInputs


class DareKernel(Kernel):
    """``dare_linear`` / ``dare_ties`` on CPU blocks through the compiled merge
    (:mod:`surgeon.merge.kernels.ties_compiled`): drop, rescale, weight, elect and mix in
    one call per block instead of ~30 torch ops. Same numbers (the same
    uniforms, float32 operations in the same order) as ``fn``."""

    def __init__(self, meta: TensorMerge, consensus: bool):
        p = meta.params
        dens = [float(mp["density"]) for mp in meta.model_params]
        # the streams TensorMerge.uniform(f"dare:{i}") draws from (read only for models that draw)
        self.keys = [stream_key(meta.seed, meta.name, f"dare:{i}") for i in range(len(dens))]
        weights = [float(mp["weight"]) for mp in meta.model_params]
        self.args = ties_compiled.dare_args(
            np.array([0 if d >= 1 else (1 if d <= 0 else 2) for d in dens], dtype=np.int8),
            np.array(dens, dtype=np.float32), bool(p["rescale"]), np.array(weights, dtype=np.float32), consensus,
            bool(p["normalize"]), weight_total(weights), float(p["lambda"]))



    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        """The whole piece from and to its stored dtypes, uniforms drawn in-line
        (None: these inputs need float32 blocks)."""
        raw, o = based_inputs(piece.base, piece.models), raw_view(out)
        if raw is None or o is None:
            return None
        return ties_compiled.merge_raw(raw[0], raw[1], self.args, o, self.keys, piece.start)

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        return ties_compiled.merge_block(blk.base, blk.models, self.args, self.keys, blk.offset).reshape(blk.base.shape)
