"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav, Tam, Choshen, Raffel, Bansal, 2023, "TIES-Merging: Resolving
Interference When Merging Models" (NeurIPS 2023, arXiv 2306.01708); reference
code prateeky2806/ties-merging (src/utils/merge_utils.py).

Two trim scopes:

- ``trim_scope: tensor`` (default, mergekit's ``ties``): each task vector is
  trimmed per tensor to exactly ``k = max(1, int(density * numel))`` entries,
  the largest by magnitude. Ties at the k-th magnitude go to the lowest flat
  (row-major) indices; mergekit's ``argsort`` leaves that order unspecified.
- ``trim_scope: model`` (the paper's reference code): one magnitude threshold
  per task vector over the WHOLE model: with ``d`` entries in all and
  ``K = density``, threshold = the ``k``-th smallest ``|tau|`` for
  ``k = d - int(d * K)``, and every entry with ``|tau| >= threshold`` is kept
  (so ties at the threshold are all kept and slightly more than ``d * K``
  entries may survive). The threshold is exact: :func:`prepare_ties` streams
  the model twice through 16-bit histograms of the float32 bit patterns of
  ``|tau|`` (see :func:`surgeon.merge.select.exact.stream_kth_smallest`), holding
  no more than one tensor at a time. A model's ``density`` must then be the
  same for every tensor.

Sign election and zero sums: the elected sign of an entry is the sign of the
sum of the weighted trimmed task vectors (``consensus: sum``, the paper's
"mass") or of the sum of their signs (``consensus: count``). Where that sum is
exactly zero, ``zero_sign`` decides: ``positive`` (mergekit: a zero sum counts
as +1) or ``majority`` (the reference: the sign of the sum of all elected
signs; over the whole model with ``trim_scope: model`` — one more streaming
pass — and over the tensor with ``trim_scope: tensor``; if that global sum is
itself 0 the reference's selection keeps the negative entries, and so do we).
``auto`` (default) picks ``positive`` for tensor scope and ``majority`` for
model scope. Entries that were trimmed (zero) never agree with any sign.

Mixing: ``mean`` (the disjoint mean) divides each entry by the summed weights
of the models whose sign agrees there (1 where none agree) — with unit
weights exactly the paper's count of agreeing entries, and mergekit's
``normalize: true``; ``sum`` adds the agreeing weighted entries. mergekit's
spelling ``normalize: false`` also selects ``sum`` (the mean is used only when
``mixing: mean`` and ``normalize: true``, both defaults). Finally
``base + lambda * merged``.

Defaults follow mergekit: ``density`` 1.0 (no trimming; the paper uses 0.2),
``weight`` 1.0, ``lambda`` 1.0, ``normalize`` true. Compute is float32
(mergekit computes in the checkpoint dtype, usually bf16).
"""
from __future__ import annotations

from typing import Any

import torch

from ...errors import InvalidInputError, StepError
from ..arith import combine, elect_sign, l1_rescale
from ..kernels.ties import TiesKernel, resolve_zero_sign
from ..method import ReiterableMerges, merge_method
from ..params import Param
from ..select.exact import largest_mask, stream_kth_smallest
from ..tensor import TensorMerge
from .common import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    check_inputs,
    normalize_param,
    rescale_param,
)


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's magnitude sparsification, in place: keep the
    ``max(1, int(density * numel))`` largest ``|delta|`` (ties: lowest index).

    ``density >= 1`` keeps everything; ``density <= 0`` keeps nothing.
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return delta.zero_()
    k = max(1, int(density * delta.numel()))
    keep = largest_mask(delta.abs(), k)
    return delta.mul_(keep)


def model_scope_k(total: int, density: float) -> int | None:
    """The reference's order statistic: ``k = d - int(d * K)`` (1-based);
    None when nothing is trimmed (``density >= 1``)."""
    if density >= 1:
        return None
    if density <= 0:
        return -1  # keep nothing
    return total - int(total * density)


def prepare_ties(stream: ReiterableMerges, params: dict[str, Any]) -> dict[str, Any] | None:
    """Whole-model pre-pass for ``trim_scope: model`` (None for tensor scope).

    Returns ``{"thresholds": [float|None per model], "densities": [...],
    "total": d, "zero_sign": s}``: model ``i`` keeps ``|tau_i| >=
    thresholds[i]`` (None: keep all; ``inf``: keep none); ``zero_sign`` is the
    sign filled in where the elected sum is exactly zero.
    """
    if params.get("trim_scope", "tensor") != "model":
        return None
    # Distributed runs stream each rank's share of the tensors; sums go through this.
    reduce = getattr(stream, "all_reduce_sum", None)
    n_series = getattr(stream, "num_models", None)

    # Pass 1 (inside stream_kth_smallest) also checks the inputs and that
    # each model's density is the same for every tensor.
    seen: dict[str, Any] = {"densities": None, "total": 0}

    def passes():
        first_pass = seen["densities"] is None
        total = 0
        for t in stream:
            check_inputs(t, "ties", needs_base=True, min_models=1)
            ds = [float(mp["density"]) for mp in t.model_params]
            if seen["densities"] is None:
                seen["densities"] = ds
            elif ds != seen["densities"]:
                raise InvalidInputError(
                    f"tensor {t.name!r}: ties with trim_scope: model needs one density per model for the whole "
                    f"model (one threshold per task vector), got {ds} here and {seen['densities']} elsewhere"
                )
            total += t.base.numel()
            yield [(m - t.base).abs_() if 0 < ds[i] < 1 else None for i, m in enumerate(t.models)]
        if first_pass:
            seen["total"] = total

    def order_statistics(_lengths: list[int]) -> list[int | None]:
        if reduce is not None:
            seen["total"] = int(reduce(torch.tensor([seen["total"]], dtype=torch.int64))[0])
            if seen["densities"] is None and n_series:  # this rank streamed no tensor
                seen["densities"] = [float(d) for d in stream.densities]
        ks = [model_scope_k(seen["total"], d) for d in seen["densities"] or []]
        return [k if (k is not None and k > 0) else None for k in ks]

    found = stream_kth_smallest(passes, order_statistics, reduce=reduce, n_series=n_series)
    densities = seen["densities"]
    if densities is None:  # empty model
        return {"thresholds": [], "densities": [], "total": 0, "zero_sign": 1.0}
    total = seen["total"]
    thresholds: list[float | None] = []
    for i, d in enumerate(densities):
        k = model_scope_k(total, d)
        if k is None:
            thresholds.append(None)
        elif k < 0:
            thresholds.append(float("inf"))
        else:
            thresholds.append(found[i] if i < len(found) else None)

    zero_sign = 1.0
    if resolve_zero_sign(params) == "majority":
        consensus = params.get("consensus", "sum")
        acc = 0
        for t in stream:
            deltas = _trimmed_model_scope(t, thresholds)
            _weight(t, deltas)
            elected = elect_sign(deltas, consensus, 0.0)
            acc += int(elected.sum(dtype=torch.float64))
        if reduce is not None:
            acc = int(reduce(torch.tensor([acc], dtype=torch.int64))[0])
        zero_sign = 1.0 if acc > 0 else -1.0  # acc == 0: the reference keeps negatives
    return {"thresholds": thresholds, "densities": densities, "total": total, "zero_sign": zero_sign}


def _weight(t: TensorMerge, deltas: list[torch.Tensor]) -> None:
    for d, w in zip(deltas, t.weights()):
        if w != 1.0:
            d.mul_(w)


def _trimmed_model_scope(t: TensorMerge, thresholds: list[float | None]) -> list[torch.Tensor]:
    out = []
    for m, thr in zip(t.models, thresholds):
        d = m - t.base
        if thr is not None:
            d.mul_(d.abs() >= thr)
        out.append(d)
    return out


# ---------------------------------------------------------------------------
# Block-wise kernel (the engine's path; see surgeon.merge.blocks).

def ties_kernel(meta: TensorMerge) -> TiesKernel | None:
    """The block kernel, or None where the whole tensor is needed: L1
    ``rescale`` and tensor-scope ``zero_sign: majority`` need whole-tensor sums
    after trimming (the whole-tensor :func:`ties` handles them)."""
    p = meta.params
    if not meta.has_base or p.get("rescale") or len(meta.model_params) < 1:
        return None
    if p["trim_scope"] == "model":
        st = meta.state
        if st is None or len(st.get("thresholds", [])) != len(meta.model_params):
            return None  # the whole-tensor path raises the clear error
        dens = st.get("densities")
        if dens is not None and [float(mp["density"]) for mp in meta.model_params] != list(dens):
            return None
    elif resolve_zero_sign(p) == "majority":
        return None
    return TiesKernel(meta)


@merge_method(
    "ties",
    params=[
        WEIGHT,
        DENSITY,
        LAMBDA,
        normalize_param(True),
        Param("consensus", str, default="sum", choices=("sum", "count"),
              help="sign election: sign of the summed weighted deltas (sum, the paper's mass) or of the summed signs (count)"),
        Param("mixing", str, default="mean", choices=("mean", "sum"),
              help="disjoint mean (divide by the agreeing models' summed weights) or disjoint sum"),
        Param("trim_scope", str, default="tensor", choices=("tensor", "model"),
              help="trim per tensor (mergekit) or with one threshold per task vector over the whole model (paper)"),
        Param("zero_sign", str, default="auto", choices=("auto", "positive", "majority"),
              help="sign where the elected sum is exactly 0: positive (mergekit), majority (reference); auto: by scope"),
        rescale_param(False, "after trimming, rescale each task vector to its original L1 norm (mergekit's rescale)"),
    ],
    needs_base=True,
    min_models=1,
    paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models (arXiv 2306.01708)",
    prepare=prepare_ties,
    mergekit_name="ties",
    kernel=ties_kernel,
)
def ties(t: TensorMerge) -> torch.Tensor:
    """TIES: trim each task vector by magnitude, elect a sign per entry, average the agreeing entries.

    See the module docstring for the trim scopes, tie and zero-sign rules.
    """
    check_inputs(t, "ties", needs_base=True, min_models=1)
    p = t.params
    scope = p["trim_scope"]
    zero_mode = resolve_zero_sign(p)
    if scope == "model":
        if t.state is None:
            raise StepError(
                f"tensor {t.name!r}: ties with trim_scope: model needs the whole-model pre-pass "
                "(the engine must call the method's prepare hook first)"
            )
        thresholds = t.state["thresholds"]
        if len(thresholds) != len(t.models):
            raise StepError(f"tensor {t.name!r}: ties pre-pass state has {len(thresholds)} models, got {len(t.models)}")
        densities = t.state.get("densities")
        if densities is not None:
            here = [float(mp["density"]) for mp in t.model_params]
            if here != list(densities):
                raise InvalidInputError(
                    f"tensor {t.name!r}: ties with trim_scope: model needs one density per model for the whole model"
                )
        deltas = []
        for m, thr in zip(t.models, thresholds):
            d = m - t.base
            if thr is not None:
                original = d.clone() if p["rescale"] else None
                d.mul_(d.abs() >= thr)
                if original is not None:
                    l1_rescale(original, d)
            deltas.append(d)
        zero_sign = float(t.state.get("zero_sign", 1.0)) if zero_mode == "majority" else 1.0
    else:
        deltas = []
        for m, mp in zip(t.models, t.model_params):
            d = m - t.base
            original = d.clone() if p["rescale"] and mp["density"] < 1 else None
            magnitude_trim(d, float(mp["density"]))
            if original is not None:
                l1_rescale(original, d)
            deltas.append(d)
        zero_sign = 1.0
        if zero_mode == "majority":
            weighted = [d * w for d, w in zip(deltas, t.weights())]
            elected = elect_sign(weighted, p["consensus"], 0.0)
            s = float(elected.sum(dtype=torch.float64))
            zero_sign = 1.0 if s > 0 else -1.0
            del weighted, elected
    normalize = p["normalize"] and p["mixing"] == "mean"
    return combine(t, deltas, consensus=p["consensus"], normalize=normalize, lam=p["lambda"], zero_sign=zero_sign)


METHODS = (ties,)
