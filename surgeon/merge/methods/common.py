"""Helpers shared by the task-vector merge methods (not a method module).

- :func:`check_inputs`: count and shape validation with errors naming the
  tensor and the method.
- :func:`elect_sign` and :func:`combine`: mergekit's "generalized task
  arithmetic" tail (weighting, optional sign consensus, optional
  normalisation, lambda), used by TIES, DARE, breadcrumbs and DELLA.
- :func:`l1_rescale`: mergekit's ``rescale`` (match the L1 norm of the
  sparsified task vector to the original one).
"""
from __future__ import annotations

from ...errors import InvalidInputError
from ..params import Param
from ..tensor import TensorMerge

# Parameters shared by the generalized task-arithmetic family, named as in
# mergekit so that mergekit configs carry over.
WEIGHT = Param("weight", float, default=1.0, per_model=True, help="the model's weight (scales its task vector)")
DENSITY = Param(
    "density", float, default=1.0, min=0.0, max=1.0, per_model=True,
    help="fraction of the task vector's entries kept (1: keep all)",
)
LAMBDA = Param("lambda", float, default=1.0, help="scale of the merged task vector", aliases=("lambda_",))


def normalize_param(default: bool) -> Param:
    return Param(
        "normalize", bool, default=default,
        help="divide the merged task vector by the sum of the weights (of the agreeing models, with sign consensus)",
    )


def rescale_param(default: bool, help: str) -> Param:
    return Param("rescale", bool, default=default, help=help)


def check_inputs(
    t: TensorMerge,
    method: str,
    *,
    needs_base: bool = True,
    min_models: int = 1,
    max_models: int | None = None,
) -> None:
    """Raise :class:`InvalidInputError` naming the tensor if inputs don't fit."""
    n = len(t.models)
    if needs_base and t.base is None:
        raise InvalidInputError(f"tensor {t.name!r}: {method} needs a base model")
    if n < min_models:
        raise InvalidInputError(
            f"tensor {t.name!r}: {method} needs at least {min_models} model(s) besides the base, got {n}"
        )
    if max_models is not None and n > max_models:
        raise InvalidInputError(
            f"tensor {t.name!r}: {method} takes at most {max_models} model(s) besides the base, got {n}"
        )
    if len(t.model_params) != n:
        raise InvalidInputError(
            f"tensor {t.name!r}: {method} got {n} models but {len(t.model_params)} per-model parameter sets"
        )
    ref = t.base if t.base is not None else (t.models[0] if t.models else None)
    if ref is None:
        raise InvalidInputError(f"tensor {t.name!r}: {method} got no input tensors")
    for i, m in enumerate(t.models):
        if m.shape != ref.shape:
            raise InvalidInputError(
                f"tensor {t.name!r}: {method}: model {i} has shape {tuple(m.shape)}, expected {tuple(ref.shape)}"
            )
    for i, m in enumerate([ref, *t.models]):
        if not m.is_floating_point():
            raise InvalidInputError(f"tensor {t.name!r}: {method} needs floating-point tensors, got {m.dtype}")


