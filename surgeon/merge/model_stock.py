"""Model Stock: interpolate the average of fine-tuned models towards the base.

Jang, Yun, Han, 2024, "Model Stock: All we need is just a few fine-tuned
models" (ECCV 2024, arXiv 2403.19522). Semantics of mergekit's
``model_stock``:

With ``N >= 2`` fine-tuned models ``w_i`` and the base ``w_0``, offsets
``d_i = w_i - w_0``; ``cos`` is the mean over all pairs ``i < j`` of the
cosine between ``d_i`` and ``d_j`` (norm product clamped below at 1e-6, the
cosine clamped to [-1, 1]); ``t = N cos / (1 + (N - 1) cos)`` and the result
is ``t * mean_i(w_i) + (1 - t) * w_0``. Where ``|1 + (N - 1) cos| < 1e-6``
no finite estimate exists and the base is kept (``t = 0``), as mergekit does.

``filter_wise: false`` (default) uses one angle for the whole tensor;
``true`` one per row, i.e. per vector along the last dimension (a 1-D
tensor is one row), as mergekit. Norms and products are summed
in float64 (mergekit: in the tensor's dtype), so the engine's streamed
computation and a whole-tensor one agree to float64 rounding.
"""
from __future__ import annotations

from typing import Any

import torch

from ._common import check_inputs
from .registry import Param, TensorMerge, merge_method


def stock_ratio(n: int, sq: list[torch.Tensor], dots: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """Model Stock's interpolation ratio from the offsets' squared norms and
    pairwise dot products (float64 sums; one value per row, or one in all)."""
    cos_sum = None
    for (i, j), d in dots.items():
        c = (d / (sq[i].sqrt() * sq[j].sqrt()).clamp(min=1e-6)).clamp(-1, 1)
        cos_sum = c if cos_sum is None else cos_sum + c
    cos = (cos_sum / len(dots)).unsqueeze(-1)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    ratio = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))
    return ratio.to(torch.float32)


def _stats(w0: torch.Tensor, ws: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[tuple[int, int], torch.Tensor]]:
    f64 = torch.float64
    offsets = [w - w0 for w in ws]
    sq = [(o * o).sum(dim=-1, dtype=f64) for o in offsets]
    dots = {(i, j): (offsets[i] * offsets[j]).sum(dim=-1, dtype=f64)
            for i in range(len(offsets)) for j in range(i + 1, len(offsets))}
    return sq, dots


def _combine(ratio: torch.Tensor, w0: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    avg = ws[0].clone()
    for w in ws[1:]:
        avg.add_(w)
    avg.div_(len(ws))
    return ratio * avg + (1 - ratio) * w0


class ModelStockKernel:
    """Model Stock streamed. One ratio per tensor: a pass sums the offsets'
    squared norms and pairwise products (float64) over the blocks. One per
    row (``filter_wise``): blocks hold whole rows, so each block computes its
    rows' ratios itself and no pass is needed."""

    def __init__(self, meta: Any):
        self.n = len(meta.model_params)
        self.filter_wise = bool(meta.params["filter_wise"])
        shape = meta.shape
        self.cols = int(shape[-1]) if len(shape) >= 2 else meta.numel
        self.align = self.cols if self.filter_wise else 1
        self.stat_passes = 0 if self.filter_wise else 1
        self.sq: list[torch.Tensor] | None = None
        self.dots: dict[tuple[int, int], torch.Tensor] = {}
        self.ratio: torch.Tensor | None = None

    def observe(self, pass_no: int, blk: TensorMerge) -> None:
        sq, dots = _stats(blk.base, list(blk.models))
        if self.sq is None:
            self.sq, self.dots = sq, dots
        else:
            self.sq = [a + b for a, b in zip(self.sq, sq)]
            self.dots = {k: v + dots[k] for k, v in self.dots.items()}

    def end_pass(self, pass_no: int) -> None:
        assert self.sq is not None
        self.ratio = stock_ratio(self.n, self.sq, self.dots)

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        if self.filter_wise:
            w0 = blk.base.view(-1, self.cols)
            ws = [m.view(-1, self.cols) for m in blk.models]
            sq, dots = _stats(w0, ws)
            return _combine(stock_ratio(self.n, sq, dots), w0, ws).reshape(-1)
        assert self.ratio is not None
        return _combine(self.ratio, blk.base, list(blk.models))


def model_stock_kernel(meta: Any) -> ModelStockKernel | None:
    if not meta.has_base or len(meta.model_params) < 2 or meta.numel == 0:
        return None  # the whole-tensor path gives the clear error
    return ModelStockKernel(meta)


@merge_method(
    "model_stock",
    params=[Param("filter_wise", bool, default=False, help="one interpolation ratio per row instead of per tensor")],
    needs_base=True,
    min_models=2,
    paper="Jang et al. 2024, Model Stock (arXiv 2403.19522)",
    mergekit_name="model_stock",
    kernel=model_stock_kernel,
)
def model_stock(t: TensorMerge) -> torch.Tensor:
    """Model Stock: t = N cos / (1 + (N-1) cos) from the mean pairwise angle; t * average + (1 - t) * base."""
    check_inputs(t, "model_stock", min_models=2)
    base = t.base
    assert base is not None
    shape = base.shape
    if t.params["filter_wise"]:
        w0 = base.reshape(1, -1) if base.dim() < 2 else base.reshape(-1, shape[-1])  # rows: last-dim vectors
    else:
        w0 = base.reshape(-1)
    ws = [m.reshape(w0.shape) for m in t.models]
    sq, dots = _stats(w0, ws)
    return _combine(stock_ratio(len(ws), sq, dots), w0, ws).reshape(shape)
