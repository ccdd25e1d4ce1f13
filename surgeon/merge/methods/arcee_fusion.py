"""Arcee Fusion: keep the other model's changes only where they matter most.

Arcee AI's ``arcee_fusion`` (https://arcee.ai; mergekit 0.1.5,
``merge_methods/arcee_fusion.py``). Exactly two inputs: the base ``b`` and
one model ``m``. Per entry, the importance of the change is

    importance = |m - b| * KL(softmax(m) || softmax(b))

with the softmaxes (each plus 1e-8) and the KL divergence taken along the
last dimension (one KL value per row; a 1-D tensor is one row). The
threshold is ``median + 1.5 * (q3 - q1)`` of the tensor's importance values
(quartiles read from the sorted values at index ``floor(q (n - 1))``), and
the result is ``b + (m - b) * [importance >= threshold]``: the base, with the
model's entries where the importance is an upper outlier.

One deliberate difference: for tensors of more than 1,000,000 entries
mergekit estimates the quartiles from 1,000,000 entries drawn at random with
replacement, unseeded (its result varies from run to run); surgeon takes a
stratified sample of as many, seeded by the recipe seed and the tensor name
(:func:`surgeon.merge.kernels.arcee_fusion.sample_positions`), so its result
is reproducible. Up to 1,000,000 entries both sort all values and agree
exactly.
"""
from __future__ import annotations

import torch

from ...errors import InvalidInputError
from ..kernels.arcee_fusion import (
    ArceeFusionKernel,
    importance,
    row_length,
    outlier_threshold,
    sample_positions,
)
from ..method import merge_method
from ..tensor import TensorMerge


def arcee_fusion_tensors(base: torch.Tensor, model: torch.Tensor, seed: int = 0, name: str = "tensor"
                         ) -> torch.Tensor:
    """Arcee Fusion of whole tensors (float32)."""
    b = base.to(torch.float32)
    m = model.to(torch.float32)
    if b.numel() == 0:
        return b.clone()
    cols = row_length(tuple(b.shape))
    imp = importance(m.reshape(-1, cols), b.reshape(-1, cols)).reshape(-1)
    pos = sample_positions(imp.numel(), seed, name)
    values = imp if pos is None else imp[pos.to(imp.device)]
    thr = outlier_threshold(values)
    mask = (imp >= thr).to(torch.float32).reshape(b.shape)
    return b + (m - b) * mask


def arcee_fusion_kernel(meta: TensorMerge) -> ArceeFusionKernel | None:
    if not meta.has_base or len(meta.model_params) != 1 or meta.numel == 0:
        return None  # the whole-tensor path gives the clear error / the empty result
    return ArceeFusionKernel(meta)


@merge_method(
    "arcee_fusion",
    params=[],
    needs_base=True,
    min_models=1,
    max_models=1,
    paper="Arcee AI, Arcee Fusion (arcee.ai); mergekit's arcee_fusion",
    mergekit_name="arcee_fusion",
    kernel=arcee_fusion_kernel,
)
def arcee_fusion(t: TensorMerge) -> torch.Tensor:
    """The base, with the model's entries where |m - b| * KL(softmax(m) || softmax(b)) is an upper outlier."""
    if t.base is None or len(t.models) != 1:
        raise InvalidInputError(f"tensor {t.name!r}: arcee_fusion merges exactly 2 models (the base and one "
                                f"other), got {len(t.models) + (t.base is not None)}")
    if t.models[0].shape != t.base.shape:
        raise InvalidInputError(f"tensor {t.name!r}: arcee_fusion: shapes differ: {tuple(t.base.shape)} vs "
                                f"{tuple(t.models[0].shape)}")
    return arcee_fusion_tensors(t.base, t.models[0], t.seed, t.name)


METHODS = (arcee_fusion,)
