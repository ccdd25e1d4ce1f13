"""Arithmetic shared by the reference functions (:mod:`surgeon.merge.methods`)
and their torch kernels (:mod:`surgeon.merge.kernels`): one implementation of
each step, so a kernel cannot drift from its reference.

- task vectors: :func:`elect_sign`, :func:`consensus_mix` (TIES' elect and
  disjoint mix), :func:`combine` (mergekit's generalized task arithmetic),
  :func:`weight_total`, :func:`l1_rescale`;
- WIDEN: :func:`column_weights` and its ranking/scoring steps;
- SLERP: :func:`slerp_coefficients`, :func:`slerp_sums`;
- Model Stock: :func:`stock_ratio`, :func:`stock_stats`, :func:`stock_combine`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .tensor import TensorMerge


#: mergekit's rescale guard: no rescale when either L1 norm is below this
L1_EPS = 1e-7


def l1_rescale(original: torch.Tensor, masked: torch.Tensor, eps: float = L1_EPS) -> torch.Tensor:
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


def consensus_mix(deltas: Sequence[torch.Tensor], weights: Sequence[float], consensus: str, normalize: bool,
                  zero_sign: float = 1.0) -> torch.Tensor:
    """TIES' elect-and-mix on weighted task vectors, with float ops only.

    ``s = sign(sum_i d_i)`` (``consensus: sum``) or ``sign(sum_i sign d_i)``
    (``count``), ``zero_sign`` where that is 0; an entry of ``d_i`` agrees when
    ``d_i * s > 0`` (a trimmed zero never agrees). Returns ``sum_i
    [agree] d_i``, divided by ``sum_i [agree] w_i`` when ``normalize`` (1
    where that is 0). Uses ``relu(d * s) * s == [agree] d`` (exact, since
    ``s = +-1``) instead of boolean masks and ``where``: comparisons that
    produce bool tensors and ``where`` ran 4-15x slower than float ops on CPU.
    """
    if consensus == "sum":
        acc = torch.add(deltas[0], deltas[1]) if len(deltas) > 1 else deltas[0].clone()
        for d in deltas[2:]:
            acc.add_(d)
    else:
        acc = torch.sign(deltas[0])
        for d in deltas[1:]:
            acc.add_(torch.sign(d))
    s = acc.sign_()
    if zero_sign in (1.0, -1.0):
        s.add_(0.5 * zero_sign).sign_()  # 0 -> zero_sign, +-1 unchanged: two ops instead of five
    elif zero_sign:
        s.add_(s.abs().neg_().add_(1.0).mul_(float(zero_sign)))
    # the first model starts the sums (no zero-filled accumulators)
    mixed = torch.mul(deltas[0], s).relu_()
    div = torch.sign(mixed) if normalize else None
    if div is not None and weights[0] != 1.0:
        div.mul_(weights[0])
    tmp = torch.empty_like(s)
    for d, w in zip(deltas[1:], weights[1:]):
        torch.mul(d, s, out=tmp).relu_()
        mixed.add_(tmp)
        if div is not None:
            div.add_(tmp.sign_(), alpha=w)
    if div is not None:
        if min(weights) > 0:
            # a zero divisor means no model agrees, so ``mixed`` is 0 there: any
            # positive divisor gives the same 0 as the reference's 1
            div.clamp_(min=torch.finfo(div.dtype).tiny)
        else:
            div.add_(div.abs().sign_().neg_().add_(1.0))  # 0 -> 1
        mixed.div_(div)
    return mixed.mul_(s)


# ---------------------------------------------------------------------------
# WIDEN

EPS = 1e-12


def importance_scores(significance: torch.Tensor, ratio: float, calibration: float) -> torch.Tensor:
    """Softmax across models (dim 0), then calibration of above-average entries.

    ``significance`` has shape ``(n_models, n)``; the mean is per model.
    """
    scores = torch.softmax(significance, dim=0)
    avg = significance.mean(dim=1, keepdim=True)
    scores[significance > avg * ratio] = calibration
    return scores


def within_tensor_rank(diff: torch.Tensor) -> torch.Tensor:
    """``(n_models, n)`` -> stable ascending rank / n, per model (reference's ranking)."""
    n = diff.shape[1]
    order = torch.argsort(diff, dim=1, stable=True)
    sig = torch.empty_like(diff)
    ranks = (torch.arange(n, device=diff.device, dtype=diff.dtype) / n).expand_as(diff).contiguous()
    sig.scatter_(1, order, ranks)
    return sig


def column_weights(mag_b: torch.Tensor, mags: list[torch.Tensor], dots: list[torch.Tensor], ratio: float,
                   calibration: float) -> torch.Tensor:
    """Per-model, per-column merge weights ``(n_models, n_columns)`` from the
    columns' norms (base ``mag_b``, models ``mags``) and base dot products."""
    mag_diffs = []
    dir_diffs = []
    for mag_m, dot in zip(mags, dots):
        mag_diffs.append((mag_m - mag_b).abs())
        both = (mag_m > EPS) & (mag_b > EPS)
        neither = (mag_m <= EPS) & (mag_b <= EPS)
        cos = torch.where(both, dot / torch.where(both, mag_m * mag_b, torch.ones_like(dot)), torch.zeros_like(dot))
        dir_diff = 1.0 - cos
        dir_diff = torch.where(neither, torch.zeros_like(dir_diff), dir_diff)
        dir_diffs.append(dir_diff)
    mag_rank = within_tensor_rank(torch.stack(mag_diffs))
    dir_rank = within_tensor_rank(torch.stack(dir_diffs))
    weights = 0.5 * (importance_scores(mag_rank, ratio, calibration) + importance_scores(dir_rank, ratio, calibration))
    return weights.to(torch.float32)


# ---------------------------------------------------------------------------
# SLERP

DOT_THRESHOLD = 0.9995


NORM_EPS = 1e-8


def slerp_coefficients(t: float, aa: float, bb: float, ab: float) -> tuple[float, float]:
    """``(c0, c1)`` with ``slerp = c0 v0 + c1 v1``, from ``|v0|^2``, ``|v1|^2`` and ``<v0, v1>``.

    The sums come in float64 (no overflow of the raw dot, which mergekit
    avoids by normalising first; and a streamed, block-wise sum gives the
    whole-vector coefficients to float64 rounding).
    """
    na, nb = math.sqrt(aa), math.sqrt(bb)
    na = na if na > NORM_EPS else 1.0
    nb = nb if nb > NORM_EPS else 1.0
    dot = min(max(ab / (na * nb), -1.0), 1.0)
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def slerp_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    f64 = torch.float64
    return float((a * a).sum(dtype=f64)), float((b * b).sum(dtype=f64)), float((a * b).sum(dtype=f64))


# ---------------------------------------------------------------------------
# Model Stock

def stock_ratio(n: int, sq: list[torch.Tensor], dots: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """Model Stock's interpolation ratio from the offsets' squared norms and
    pairwise dot products (float64 sums; one value per row, or one in all)."""
    cos_sum = None
    for (i, j), d in dots.items():
        c = (d / (sq[i].sqrt() * sq[j].sqrt()).clamp(min=1e-6)).clamp(-1, 1)
        cos_sum = c if cos_sum is None else cos_sum + c
    cos = (cos_sum / len(dots)).unsqueeze(-1)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    ratio = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))
    return ratio.to(torch.float32)


def stock_stats(w0: torch.Tensor, ws: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[tuple[int, int], torch.Tensor]]:
    f64 = torch.float64
    offsets = [w - w0 for w in ws]
    sq = [(o * o).sum(dim=-1, dtype=f64) for o in offsets]
    dots = {(i, j): (offsets[i] * offsets[j]).sum(dim=-1, dtype=f64)
            for i in range(len(offsets)) for j in range(i + 1, len(offsets))}
    return sq, dots


def stock_combine(ratio: torch.Tensor, w0: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    avg = ws[0].clone()
    for w in ws[1:]:
        avg.add_(w)
    avg.div_(len(ws))
    return ratio * avg + (1 - ratio) * w0
