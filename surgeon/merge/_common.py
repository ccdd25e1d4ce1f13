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

from typing import Sequence

import torch

from ..errors import InvalidInputError
from .registry import Param, TensorMerge

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


def l1_rescale(original: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``masked`` so its L1 norm matches ``original``'s (mergekit's rescale).

    Left unscaled when either norm is below ``eps`` (mergekit's guard).
    """
    before = original.abs().sum()
    after = masked.abs().sum()
    if float(before) < eps or float(after) < eps:
        return masked
    return masked.mul_(before / after)


def elect_sign(deltas: Sequence[torch.Tensor], consensus: str, zero_sign: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The elected sign per entry: ``sign(sum_i delta_i)`` ("sum", TIES' mass
    election) or ``sign(sum_i sign(delta_i))`` ("count").

    Entries whose sum is exactly zero get ``zero_sign`` (mergekit: +1).
    """
    acc = torch.zeros_like(deltas[0])
    for d in deltas:
        if consensus == "sum":
            acc.add_(d)
        elif consensus == "count":
            acc.add_(torch.sign(d))
        else:  # pragma: no cover - guarded by Param choices
            raise ValueError(f"unknown consensus {consensus!r}")
    elected = torch.sign(acc)
    return torch.where(elected == 0, torch.as_tensor(zero_sign, dtype=elected.dtype, device=elected.device), elected)


def combine(
    t: TensorMerge,
    deltas: list[torch.Tensor],
    *,
    consensus: str | None,
    normalize: bool,
    lam: float,
    zero_sign: float = 1.0,
) -> torch.Tensor:
    """base + lambda * mix(w_i * delta_i): mergekit's generalized task arithmetic.

    ``deltas`` are the (sparsified) task vectors; they are scaled in place by
    the models' weights. Without consensus the mix is the plain sum, divided by
    the sum of weights when ``normalize`` (a sum below 1e-8 in magnitude is
    treated as 1, as mergekit does). With consensus, only entries whose sign
    equals the elected sign (:func:`elect_sign` on the weighted deltas)
    contribute, and ``normalize`` divides each entry by the summed weights of
    the models that contributed there (the disjoint mean; 1 where none did).
    """
    assert t.base is not None
    weights = t.weights()
    for d, w in zip(deltas, weights):
        if w != 1.0:
            d.mul_(w)
    if consensus is None:
        mixed = _sum(deltas)
        if normalize:
            mixed.div_(weight_total(weights))
    else:
        from .blocks import consensus_mix

        mixed = consensus_mix(deltas, weights, consensus, normalize, zero_sign)
    if lam != 1.0:
        mixed.mul_(lam)
    return mixed.add_(t.base)


def weight_total(weights: Sequence[float]) -> float:
    """The divisor of a normalized weighted sum: the weights' sum, 1 when it
    is below 1e-8 in magnitude (as mergekit)."""
    total = sum(weights)
    return 1.0 if abs(total) < 1e-8 else total


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0].clone()
    for x in tensors[1:]:
        out.add_(x)
    return out


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
    from .registry import get_method, resolve_params

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
    from .registry import get_method

    from .blocks import apply_method

    return apply_method(get_method(method), build_merge(method, base, models, model_params, **kw))
