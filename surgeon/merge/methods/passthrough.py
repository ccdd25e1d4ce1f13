"""Passthrough: copy one model's tensors, optionally scaled.

Semantics of mergekit's ``passthrough`` (mergekit 0.1.5,
``merge_methods/passthrough.py``): exactly one input per tensor; the result
is that tensor, multiplied by the input's ``scale`` when one is given for the
tensor. ``scale`` is a per-model parameter, usually written as name filters
so that some tensors are scaled and the rest are copied, e.g. mergekit's
frankenmerge recipes that silence the attention output and MLP down
projections of repeated layers::

    parameters:
      scale:
        - filter: o_proj
          value: 0.0
        - filter: down_proj
          value: 0.0
        - value: 1.0

mergekit's default is "no scale" (``None``); here it is ``1.0``, which gives
the same tensor (``x * 1.0 == x`` exactly in float32). A ``base`` is not
merged (it may serve as the template of config and tokenizer, as for
``linear``); mergekit counts its base as an input, so a mergekit config's
base is listed among the models by the import, and more than one input is
refused in both tools. Elementwise, so the engine streams it block by block;
with ``scale`` 1 the kernel copies each piece from its stored dtype
(:class:`~surgeon.merge.kernels.passthrough.CopyKernel`).
"""
from __future__ import annotations

import torch

from ...errors import InvalidInputError
from ..kernels.passthrough import CopyKernel
from ..method import merge_method
from ..params import Param
from ..tensor import TensorMerge

SCALE = Param(
    "scale", float, default=1.0, per_model=True,
    help="multiply the model's tensor by this (0 zeroes it; usually given per tensor with name filters)",
)


def passthrough_tensor(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x * scale`` in float32 (a float32 copy of ``x`` when ``scale == 1``)."""
    out = x.to(torch.float32, copy=True)
    if scale != 1.0:
        out.mul_(scale)
    return out


def passthrough_kernel(meta: TensorMerge) -> CopyKernel | None:
    """A copy from the stored dtype for ``scale`` 1; None (the reference, block by block) otherwise."""
    if len(meta.model_params) != 1 or float(meta.model_params[0]["scale"]) != 1.0 or meta.numel == 0:
        return None
    return CopyKernel()


@merge_method(
    "passthrough",
    params=[SCALE],
    needs_base=False,
    min_models=1,
    max_models=1,
    paper="mergekit's passthrough (copy, with optional per-tensor scale)",
    mergekit_name="passthrough",
    elementwise=True,
    kernel=passthrough_kernel,
)
def passthrough(t: TensorMerge) -> torch.Tensor:
    """One model's tensor, times its ``scale`` (default 1: a copy); a base is only a template."""
    if len(t.models) != 1:
        raise InvalidInputError(f"tensor {t.name!r}: passthrough takes exactly one model, got {len(t.models)}")
    return passthrough_tensor(t.models[0], float(t.model_params[0]["scale"]))


METHODS = (passthrough,)
