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

import torch

from ..arith import stock_combine, stock_ratio, stock_stats
from ..kernels.model_stock import ModelStockKernel
from ..method import merge_method
from ..params import Param
from ..tensor import TensorMerge
from .common import check_inputs


def model_stock_kernel(meta: TensorMerge) -> ModelStockKernel | None:
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
    sq, dots = stock_stats(w0, ws)
    return stock_combine(stock_ratio(len(ws), sq, dots), w0, ws).reshape(shape)


METHODS = (model_stock,)
