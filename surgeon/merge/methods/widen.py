"""WIDEN: merging by weight disentanglement (magnitude and direction).

Yu, Yu, Huang, Li, Du, 2024, "Extend Model Merging from Fine-Tuned to
Pre-Trained Large Language Models via Weight Disentanglement"
(arXiv 2408.03092); reference code yule-BUAA/MergeLLM
(model_merging_methods/merging_methods.py, ``widen_merging``).

For a 2-D weight ``W`` (the input embedding, ``role == "embedding"``, is
first transposed to ``(hidden, vocab)`` and transposed back at the end;
``lm_head`` is not transposed), per model ``i`` against the base:

1. column magnitudes ``m = ||W[:, j]||_2`` (over dim 0) and directions
   ``W[:, j] / m_j``;
2. ``|m_i - m_base|`` and ``1 - cos(direction_i, direction_base)`` per column;
3. each is ranked within the tensor (stable ascending sort): significance of
   the column at ascending position ``r`` is ``r / n_columns``;
4. scores: softmax across models of the significance; then, wherever a
   significance exceeds its model's mean significance (over the columns)
   times ``above_average_value_ratio``, the score becomes
   ``score_calibration_value``;
5. weight per column = mean of the magnitude and the direction score;
   ``merged = base + sum_i weight_i * (W_i - W_base)``.

1-D tensors (norms, biases) use the raw ``|delta|`` as significance (no
ranking), scored the same way, and ``merged = base + sum_i score_i * delta_i``.
Tensors with more than two dimensions are treated as ``(shape[0], -1)``
matrices; 0-D tensors as 1-D.

Deliberate difference — the epsilon guard: the reference divides each column
by its norm, so an all-zero column (padding rows of an embedding, for
instance) gives 0/0 = NaN directions; its direction change is NaN and
``argsort`` ranks it above every real column. We compute the cosine as
``<W_i[:, j], W_base[:, j]> / (m_i m_base)`` only where both norms exceed
``1e-12`` (no division of the whole matrix); a column that is zero in both
models has direction change 0 (nothing moved), a column zero in exactly one of
them has direction change 1 (orthogonal: its magnitude change carries the
signal). Results therefore equal the reference's whenever no column is zero.

Rounding: ranks are discontinuous in the inputs. Columns whose changes differ
by less than the rounding of the column sums can swap ranks between runs that
sum in a different order. With float32 sums (as the reference), CPU vs CUDA
moved 47 of 384 columns of a 256x384 test by up to 2e-4; hence the float64
sums below. Each run is deterministic.

Precision: column norms and dot products are summed in float64 (the
reference sums in the model's dtype). Ranks then no longer depend on
float32 summation order — a whole-matrix and a row-streamed computation (the
engine streams tensors in row pieces, :class:`WidenKernel`) rank columns the
same way — and the rank flips described above shrink to float64 rounding.

Not idempotent: with the default calibration (``1.0, 1.0``) scores are not
normalised after calibration, so the weights of a column can sum above 1.
Merging two identical fine-tuned models gives ``base + c_j * delta`` with
``c_j`` in {1, 1.5, 2} per column (each model's softmax score is 0.5, the
calibrated ones 1) — not the model. This is the reference's behaviour and is
kept. Two identical models with ``score_calibration_value: 0.5``, or a single
model with the default calibration (softmax score 1), return the model.
"""
from __future__ import annotations

import torch

from ..arith import column_weights, importance_scores
from ..kernels.widen import WidenKernel
from ..method import merge_method
from ..params import Param
from ..tensor import TensorMerge
from .common import check_inputs


def _column_stats(w: torch.Tensor) -> torch.Tensor:
    """Column norms, summed in float64 (see "Precision" above)."""
    return (w * w).sum(dim=0, dtype=torch.float64).sqrt_()


def widen_matrix(base: torch.Tensor, models: list[torch.Tensor], ratio: float, calibration: float) -> torch.Tensor:
    """WIDEN for one 2-D weight (columns along dim 1)."""
    weights = column_weights(_column_stats(base), [_column_stats(m) for m in models],
                             [(m * base).sum(dim=0, dtype=torch.float64) for m in models], ratio, calibration)
    out = base.clone()
    for i, m in enumerate(models):
        out.add_((m - base).mul_(weights[i].unsqueeze(0)))
    return out


def widen_vector(base: torch.Tensor, models: list[torch.Tensor], ratio: float, calibration: float) -> torch.Tensor:
    """WIDEN for a 1-D parameter: raw |delta| significance."""
    deltas = torch.stack([m - base for m in models])
    scores = importance_scores(deltas.abs(), ratio, calibration)
    return base + (deltas * scores).sum(dim=0)


def widen_kernel(meta: TensorMerge) -> WidenKernel | None:
    """Row-piece kernel for matrices; vectors (norms, biases: small) use :func:`widen` whole."""
    if not meta.has_base or len(meta.shape) < 2 or meta.numel == 0 or not meta.model_params:
        return None
    return WidenKernel(meta)


@merge_method(
    "widen",
    params=[
        Param("above_average_value_ratio", float, default=1.0, min=0.0,
              help="a significance above its model's mean times this ratio is calibrated"),
        Param("score_calibration_value", float, default=1.0,
              help="the score given to calibrated (above-average) entries"),
    ],
    needs_base=True,
    min_models=1,
    paper="Yu et al. 2024, Extend Model Merging from Fine-Tuned to Pre-Trained LLMs via Weight Disentanglement (arXiv 2408.03092)",
    mergekit_name=None,
    kernel=widen_kernel,
)
def widen(t: TensorMerge) -> torch.Tensor:
    """WIDEN: weight each column's task vector by magnitude and direction change ranks (softmax over models, calibrated)."""
    check_inputs(t, "widen")
    base = t.base
    assert base is not None
    ratio = float(t.params["above_average_value_ratio"])
    calib = float(t.params["score_calibration_value"])
    shape = base.shape
    if base.dim() <= 1:
        out = widen_vector(base.reshape(-1), [m.reshape(-1) for m in t.models], ratio, calib)
        return out.reshape(shape)
    if base.dim() > 2:
        b2 = base.reshape(shape[0], -1)
        return widen_matrix(b2, [m.reshape(shape[0], -1) for m in t.models], ratio, calib).reshape(shape)
    if t.role == "embedding":
        out = widen_matrix(base.t(), [m.t() for m in t.models], ratio, calib)
        return out.t().contiguous()
    return widen_matrix(base, list(t.models), ratio, calib)


METHODS = (widen,)
