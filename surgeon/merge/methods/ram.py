"""RAM and RAM+ (tensor-local): Reinforced Agent Merging.

"Reinforced Agent Merging" (arXiv 2601.13572). Semantics of mergekit 0.1.5's
``ram`` and ``ramplus_tl`` (``merge_methods/ram.py``):

Task vectors ``d_i = w_i - base``; an entry of ``d_i`` *contributes* when
``|d_i| > epsilon``. With ``c`` the number of models contributing to an
entry:

- ``c == 0``: the base is kept;
- ``c == 1`` (a *unique* entry): the one contributing delta is added whole;
- ``c > 1`` (a *shared* entry): the mean of the contributing deltas is added.

``ramplus_tl`` further scales each model's unique entries by
``lambda_i = 1 + r * min(max(rho_i, 0), alpha)`` with ``rho_i = shared_i /
max(unique_i, epsilon)``, where ``shared_i`` and ``unique_i`` count model
``i``'s contributing entries in this tensor that are shared resp. unique
("tensor-local": the counts are per tensor, not per model).

Without any model besides the base the base is returned, as in mergekit.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ...errors import InvalidInputError
from ..kernels.ram import RamKernel, ram_tensors, ramplus_counts, ramplus_lambdas
from ..method import merge_method
from ..params import Param
from ..tensor import TensorMerge

EPSILON = Param("epsilon", float, default=1e-5, min=0.0,
                help="an entry of a task vector contributes when its magnitude exceeds this")
R = Param("r", float, default=0.1, help="RAM+: strength of the rescaling of unique entries")
ALPHA = Param("alpha", float, default=0.2, min=0.0, help="RAM+: upper clamp of the shared/unique ratio")


def _base(t: TensorMerge, method: str) -> torch.Tensor:
    if t.base is None:
        raise InvalidInputError(f"tensor {t.name!r}: {method} needs a base model")
    for i, m in enumerate(t.models):
        if m.shape != t.base.shape:
            raise InvalidInputError(
                f"tensor {t.name!r}: {method}: model {i} has shape {tuple(m.shape)}, expected {tuple(t.base.shape)}"
            )
    return t.base


def ram_kernel(plus: bool) -> Callable[[TensorMerge], RamKernel | None]:
    """The kernel factory of ``ram`` / ``ramplus_tl`` (None: the whole-tensor path gives the clear error)."""
    def factory(meta: TensorMerge) -> RamKernel | None:
        if not meta.has_base or not meta.model_params or meta.numel == 0:
            return None
        return RamKernel(meta, plus)

    return factory


@merge_method(
    "ram",
    params=[EPSILON],
    needs_base=True,
    min_models=1,
    paper="Reinforced Agent Merging (arXiv 2601.13572); mergekit's ram",
    mergekit_name="ram",
    elementwise=True,
    kernel=ram_kernel(plus=False),
)
def ram(t: TensorMerge) -> torch.Tensor:
    """base + per entry: the one contributing task vector, or the mean of several (|delta| > epsilon)."""
    return ram_tensors(_base(t, "ram"), list(t.models), float(t.params["epsilon"]))


@merge_method(
    "ramplus_tl",
    params=[R, ALPHA, EPSILON],
    needs_base=True,
    min_models=1,
    paper="Reinforced Agent Merging (arXiv 2601.13572), RAM+ with tensor-local counts; mergekit's ramplus_tl",
    mergekit_name="ramplus_tl",
    kernel=ram_kernel(plus=True),
)
def ramplus_tl(t: TensorMerge) -> torch.Tensor:
    """RAM with each model's unique entries scaled by 1 + r * clamp(shared/unique, 0, alpha), counted per tensor."""
    base = _base(t, "ramplus_tl")
    eps = float(t.params["epsilon"])
    if not t.models:
        return base.to(torch.float32, copy=True)
    shared, unique = ramplus_counts(base, list(t.models), eps)
    lambdas = ramplus_lambdas(shared, unique, float(t.params["r"]), float(t.params["alpha"]), eps)
    return ram_tensors(base, list(t.models), eps, lambdas)


METHODS = (ram, ramplus_tl)
