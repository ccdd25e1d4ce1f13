"""Merging in-memory tensors: the API's and the tests' way into a method.

:func:`merge_tensors` runs a method on tensors the caller holds, through its
kernel when it has one for these parameters (exactly what the engine runs,
piece by piece) and its reference function otherwise; :func:`build_merge`
builds the :class:`TensorMerge` with parameters resolved and checked as the
engine does.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .kernels.base import run_in_memory
from .method import MergeMethod
from .methods.common import check_inputs
from .params import resolve_params
from .registry import get_method
from .tensor import TensorMerge


def apply_method(method: MergeMethod, t: TensorMerge) -> torch.Tensor:
    """Merge one whole tensor: through the method's kernel when it has one
    for these parameters, else through its reference function ``fn``."""
    if method.blockwise and t.models:
        kernel = method.block_kernel(t)
        if kernel is not None:
            check_inputs(t, method.name, needs_base=method.needs_base, min_models=method.min_models,
                         max_models=method.max_models)
            return run_in_memory(kernel, t, t.base, t.models)
    return method.fn(t)


def build_merge(
    method: str,
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    model_params: Sequence[dict] | None = None,
    *,
    name: str = "tensor",
    seed: int = 0,
    role: str = "other",
    state=None,
    num_layers: int | None = None,
    **params,
) -> TensorMerge:
    """A :class:`TensorMerge` for calling a method on in-memory tensors.

    Parameters are resolved and range-checked through the method's
    declarations, as the engine does (defaults filled in, gradients and name
    filters resolved for ``name``); tensors are converted to float32.
    """
    m = get_method(method)

    def f32(x):
        return None if x is None else torch.as_tensor(x, dtype=torch.float32)

    tensors = [f32(x) for x in models]
    mps = [dict(mp) for mp in (model_params or [{} for _ in tensors])]
    where = f"method {method!r}"
    resolved_mps = [resolve_params(m.model_params, mp, name, num_layers, where) for mp in mps]
    resolved = resolve_params(m.global_params, params, name, num_layers, where)
    return TensorMerge(name, f32(base), tensors, resolved_mps, resolved, seed=seed, role=role, state=state)


def merge_tensors(method: str, base, models, model_params=None, **kw) -> torch.Tensor:
    """Run merge method ``method`` on in-memory tensors (see :func:`build_merge`)."""
    return apply_method(get_method(method), build_merge(method, base, models, model_params, **kw))
