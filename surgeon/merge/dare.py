"""DARE: Drop And REscale task vectors, then task arithmetic or TIES.

Yu, Yu, Yu, Huang, Li, 2023, "Language Models are Super Mario: Absorbing
Abilities from Homologous Models as a Free Lunch" (ICML 2024,
arXiv 2311.03099).

Each entry of each task vector is dropped with probability ``1 - density``
and, with ``rescale`` (default), the survivors are multiplied by
``1 / density`` as in the paper, so the task vector is unchanged in
expectation. mergekit's ``rescale`` instead scales the survivors so the
sparse task vector has the original L1 norm (about the same factor, but
data-dependent); that is the one deliberate difference from mergekit's
``dare_linear`` / ``dare_ties``.

Randomness comes from :meth:`TensorMerge.uniform`, seeded from the recipe
seed, the tensor name, the model's position in the step (``salt =
"dare:<i>"``) and the entry's fixed segment of the tensor, so a tensor's masks
are the same whichever process computes it, in whatever order, whole or block
by block (the methods are elementwise and run in cache-sized blocks); ``dare_linear`` and ``dare_ties`` draw the
same masks for the same seed. ``density >= 1`` draws nothing and keeps the
task vector as is; ``density == 0`` drops everything.
"""
from __future__ import annotations

import numpy as np
import torch

from . import _ties_fused
from ._common import (DENSITY, LAMBDA, WEIGHT, check_inputs, combine, normalize_param, rescale_param,
                      weight_total)
from ._random import stream_key
from ._raw import raw_inputs, raw_view
from .blocks import PieceInputs, TensorMeta
from .registry import TensorMerge, merge_method

_RESCALE = rescale_param(True, "multiply the surviving entries by 1/density (the paper's rescale)")
_PAPER = "Yu et al. 2023, Language Models are Super Mario (DARE) (arXiv 2311.03099)"


def dare_drop(delta: torch.Tensor, density: float, rescale: bool, uniform: torch.Tensor) -> torch.Tensor:
    """Keep each entry where ``uniform < density`` (in place; ``uniform`` is
    one U[0, 1) draw per entry), then rescale the survivors by ``1/density``."""
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    # keep = [u < density] as a float: sign(relu(density - u)) (float ops; bool masks are slow on CPU)
    keep = uniform.neg_().add_(density).relu_().sign_()
    delta.mul_(keep)
    if rescale:
        delta.div_(density)
    return delta


class DareKernel:
    """``dare_linear`` / ``dare_ties`` on CPU blocks through the compiled merge
    (:mod:`surgeon.merge._ties_fused`): drop, rescale, weight, elect and mix in
    one call per block instead of ~30 torch ops. Same numbers (the same
    uniforms, float32 operations in the same order) as ``fn``."""

    stat_passes = 0

    def __init__(self, meta: TensorMeta, consensus: bool):
        p = meta.params
        dens = [float(mp["density"]) for mp in meta.model_params]
        # the streams TensorMerge.uniform(f"dare:{i}") draws from (read only for models that draw)
        self.keys = [stream_key(meta.seed, meta.name, f"dare:{i}") for i in range(len(dens))]
        weights = [float(mp["weight"]) for mp in meta.model_params]
        self.args = _ties_fused.dare_args(
            np.array([0 if d >= 1 else (1 if d <= 0 else 2) for d in dens], dtype=np.int8),
            np.array(dens, dtype=np.float32), bool(p["rescale"]), np.array(weights, dtype=np.float32), consensus,
            bool(p["normalize"]), weight_total(weights), float(p["lambda"]))

    def observe(self, pass_no: int, blk: TensorMerge) -> None:  # pragma: no cover - no passes
        raise AssertionError("dare has no statistic passes")

    def end_pass(self, pass_no: int) -> None:  # pragma: no cover - no passes
        raise AssertionError("dare has no statistic passes")

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        """The whole piece from and to its stored dtypes, uniforms drawn in-line
        (None: these inputs need float32 blocks)."""
        raw, o = raw_inputs(piece.base, piece.models), raw_view(out)
        if raw is None or raw[0] is None or o is None:
            return None
        return _ties_fused.merge_raw(raw[0], raw[1], self.args, o, self.keys, piece.start)

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        return _ties_fused.merge_block(blk.base, blk.models, self.args, self.keys, blk.offset).reshape(blk.base.shape)


def _dare_kernel(consensus: bool):
    def factory(meta: TensorMeta) -> DareKernel | None:
        if meta.device.type != "cpu" or not meta.has_base or not _ties_fused.available():
            return None  # the elementwise fn serves the blocks
        return DareKernel(meta, consensus)

    return factory


def _dropped_deltas(t: TensorMerge) -> list[torch.Tensor]:
    deltas = []
    for i, (m, mp) in enumerate(zip(t.models, t.model_params)):
        d = m - t.base
        density = float(mp["density"])
        u = t.uniform(f"dare:{i}") if 0 < density < 1 else None
        deltas.append(dare_drop(d, density, t.params["rescale"], u))
    return deltas


@merge_method(
    "dare_linear",
    params=[WEIGHT, DENSITY, LAMBDA, normalize_param(False), _RESCALE],
    needs_base=True,
    min_models=1,
    paper=_PAPER,
    randomized=True,
    mergekit_name="dare_linear",
    elementwise=True,
    kernel=_dare_kernel(consensus=False),
)
def dare_linear(t: TensorMerge) -> torch.Tensor:
    """DARE + task arithmetic: base + lambda * sum_i w_i * drop_rescale(model_i - base)."""
    check_inputs(t, "dare_linear")
    p = t.params
    return combine(t, _dropped_deltas(t), consensus=None, normalize=p["normalize"], lam=p["lambda"])


@merge_method(
    "dare_ties",
    params=[WEIGHT, DENSITY, LAMBDA, normalize_param(False), _RESCALE],
    needs_base=True,
    min_models=1,
    paper=_PAPER,
    randomized=True,
    mergekit_name="dare_ties",
    elementwise=True,
    kernel=_dare_kernel(consensus=True),
)
def dare_ties(t: TensorMerge) -> torch.Tensor:
    """DARE + TIES sign consensus: drop and rescale, elect signs (mass), merge the agreeing entries.

    A zero elected sum counts as positive (mergekit). ``normalize`` (default
    false, as in mergekit) divides by the agreeing models' summed weights.
    """
    check_inputs(t, "dare_ties")
    p = t.params
    return combine(t, _dropped_deltas(t), consensus="sum", normalize=p["normalize"], lam=p["lambda"])
