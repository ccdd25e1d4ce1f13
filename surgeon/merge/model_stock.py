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
``true`` one per row (a 1-D tensor is one row).
"""
from __future__ import annotations

import torch

from ._common import check_inputs
from .registry import Param, TensorMerge, merge_method


@merge_method(
    "model_stock",
    params=[Param("filter_wise", bool, default=False, help="one interpolation ratio per row instead of per tensor")],
    needs_base=True,
    min_models=2,
    paper="Jang et al. 2024, Model Stock (arXiv 2403.19522)",
    mergekit_name="model_stock",
)
def model_stock(t: TensorMerge) -> torch.Tensor:
    """Model Stock: t = N cos / (1 + (N-1) cos) from the mean pairwise angle; t * average + (1 - t) * base."""
    check_inputs(t, "model_stock", min_models=2)
    base = t.base
    assert base is not None
    shape = base.shape
    if t.params["filter_wise"]:
        w0 = base.reshape(1, -1) if base.dim() < 2 else base
        ws = [m.reshape(w0.shape) for m in t.models]
    else:
        w0 = base.reshape(-1)
        ws = [m.reshape(-1) for m in t.models]
    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cos_sum = None
    pairs = 0
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            c = ((offsets[i] * offsets[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
            cos_sum = c if cos_sum is None else cos_sum + c
            pairs += 1
    del offsets
    cos = (cos_sum / pairs).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    ratio = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))
    avg = ws[0].clone()
    for w in ws[1:]:
        avg.add_(w)
    avg.div_(n)
    return (ratio * avg + (1 - ratio) * w0).reshape(shape)
