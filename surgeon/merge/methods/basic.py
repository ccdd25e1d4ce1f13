"""Linear averaging and task arithmetic.

- ``linear``: Wortsman et al., 2022, "Model soups: averaging weights of
  multiple fine-tuned models improves accuracy without increasing inference
  time" (arXiv 2203.05482).
- ``task_arithmetic``: Ilharco et al., 2023, "Editing Models with Task
  Arithmetic" (arXiv 2212.04089).
"""
from __future__ import annotations

import torch

from ..kernels import linear as linear_kernels
from ..method import merge_method
from ..params import Param
from ..tensor import TensorMerge

WEIGHT = Param("weight", float, default=1.0, per_model=True, help="the model's weight")


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i * t_i in float32, accumulated in place (one extra tensor)."""
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        out.add_(t, alpha=w)
    return out


def weighted_sum_kernel(task: bool):
    """Kernel factory: the compiled weighted sum on CPU with numba; None (the
    method's elementwise ``fn`` serves the blocks) elsewhere, and where ``fn``
    must raise its clear error (weights summing to zero with ``normalize``)."""
    def factory(meta: TensorMerge) -> linear_kernels.WeightedSumKernel | None:
        if meta.device.type != "cpu" or not linear_kernels.available() or not meta.model_params:
            return None
        if task and not meta.has_base:
            return None
        if meta.params.get("normalize") and sum(float(mp["weight"]) for mp in meta.model_params) == 0:
            return None
        return linear_kernels.WeightedSumKernel(meta, task)

    return factory


@merge_method(
    "linear",
    params=[
        WEIGHT,
        Param("normalize", bool, default=True, help="divide by the sum of weights"),
    ],
    needs_base=False,
    elementwise=True,
    paper="Wortsman et al. 2022, Model soups (arXiv 2203.05482)",
    mergekit_name="linear",
    kernel=weighted_sum_kernel(task=False),
)
def linear(t: TensorMerge) -> torch.Tensor:
    """Weighted average of the models (the base, if given, is only a template).

    With ``normalize`` the weights are divided by their sum (mergekit's
    default); a zero sum is then refused rather than divided by.
    """
    tensors = list(t.models)
    weights = t.weights()
    out = weighted_sum(tensors, weights)
    if t.params["normalize"]:
        total = sum(weights)
        if total == 0:
            raise ValueError(f"tensor {t.name!r}: linear weights sum to zero, cannot normalize")
        out.div_(total)
    return out


@merge_method(
    "task_arithmetic",
    params=[
        WEIGHT,
        Param("lambda", float, default=1.0, help="scale of the summed task vectors", aliases=("lambda_",)),
        Param("normalize", bool, default=False, help="divide the summed task vectors by the sum of weights"),
    ],
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv 2212.04089)",
    mergekit_name="task_arithmetic",
    elementwise=True,
    kernel=weighted_sum_kernel(task=True),
)
def task_arithmetic(t: TensorMerge) -> torch.Tensor:
    """base + lambda * sum_i w_i (model_i - base)."""
    assert t.base is not None
    weights = t.weights()
    out = torch.zeros_like(t.base)
    for m, w in zip(t.models, weights):
        # subtract first: an unchanged entry then contributes exactly zero
        out.add_(torch.sub(m, t.base), alpha=w)
    if t.params["normalize"]:
        total = sum(weights)
        if total == 0:
            raise ValueError(f"tensor {t.name!r}: task_arithmetic weights sum to zero, cannot normalize")
        out.div_(total)
    return out.mul_(t.params["lambda"]).add_(t.base)


METHODS = (linear, task_arithmetic)
