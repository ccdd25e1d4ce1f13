"""Token-wise distillation terms.

Two families, both on rows of logits ``[..., V]`` paired position by position
(the caller pairs student and teacher positions, e.g. with
:func:`surgeon.fusion.align.pair_positions`):

* :func:`kl_loss` — KL divergence to a teacher distribution that is already in the
  student's vocabulary (dense, or sparse top-k ids mapped into it as FuseLLM does).
  ``mode="soft_ce"`` gives FuseLLM's soft cross-entropy (the same gradient; it
  differs from KL by the teacher's entropy).
* :func:`uld_loss` — Universal Logit Distillation (Boizard et al. 2024), the
  token-wise term of InfiGFusion: sort both probability vectors in decreasing order
  and take sum_i |p_t(i)v - p_s(i)v| over the first ``top_k`` ranks (zero-padded when
  the vocabularies differ in size). Needs no vocabulary alignment.

All functions return a scalar mean over the masked rows (``reduction="mean"``),
their sum, or the per-row values (``"none"``).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .gld import TopK, exact_at

__all__ = ["kl_loss", "uld_loss", "sparse_to_dense", "topk_probs"]


def _reduce(per_row: Tensor, mask: Optional[Tensor], reduction: str) -> Tensor:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"tokenwise: reduction={reduction!r} is not 'mean', 'sum' or 'none'")
    if mask is not None:
        m = mask.to(per_row.dtype)
        per_row = per_row * m
        if reduction == "mean":
            return per_row.sum() / m.sum().clamp_min(1.0)
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()


def sparse_to_dense(ids: Tensor, probs: Tensor, vocab_size: int, *, renormalize: bool = True) -> Tensor:
    """Scatter sparse (ids, probs) [..., k] into a dense [..., vocab_size] distribution.

    Duplicate ids (several teacher tokens mapped onto one student token) add up.
    Negative ids (no mapping) are dropped. ``renormalize`` makes each row sum to 1
    (rows with no mass stay zero).
    """
    keep = ids >= 0
    safe = torch.where(keep, ids, torch.zeros_like(ids))
    vals = torch.where(keep, probs, torch.zeros_like(probs))
    dense = probs.new_zeros(*ids.shape[:-1], vocab_size).scatter_add(-1, safe, vals)
    if renormalize:
        dense = dense / dense.sum(-1, keepdim=True).clamp_min(1e-12)
    return dense


SPARSE = ("rest", "topk", "fusellm")
_FILL = -1e4  # log-probability standing for "excluded" (exp underflows to 0; finite, so gradients stay finite)


def _wide(x: Tensor) -> torch.dtype:
    """float32, or the tensor's own dtype when it is wider (float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def _tempered_target(target: Union[Tensor, TopK], target_ids: Optional[Tensor], temperature: float,
                     renormalize: bool) -> tuple[Tensor, Optional[Tensor]]:
    """(log-probabilities [..., k or V], ids [..., k] or None) of the target at ``temperature``.

    Dense probabilities [..., V] are tempered exactly (softmax(log q / T)). Sparse
    targets keep their ids; with ``renormalize`` their probabilities are
    renormalised over the kept entries (at T), otherwise they are the full-vocabulary
    probabilities at T (a :class:`TopK` must carry its normaliser at T; plain sparse
    probabilities are taken as probabilities at T = 1).
    """
    if isinstance(target, TopK):
        lg = target.logits.to(_wide(target.logits)) / temperature
        if renormalize:
            return torch.log_softmax(lg, dim=-1), target.ids
        if not exact_at(target, temperature):
            raise ValueError(f"kl_loss: the cached top-k has no normaliser at temperature {temperature}")
        return lg - target.lse.to(lg.dtype).unsqueeze(-1), target.ids  # type: ignore[union-attr]
    logq = target.to(_wide(target)).clamp_min(1e-30).log()
    logq = torch.where(target > 0, logq, torch.full_like(logq, -math.inf))
    if target_ids is None:
        return torch.log_softmax(logq / temperature, dim=-1), None
    if renormalize or temperature != 1.0:
        return torch.log_softmax(logq / temperature, dim=-1), target_ids
    return logq, target_ids


def kl_loss(student_logits: Tensor, target: Union[Tensor, TopK], *, target_ids: Optional[Tensor] = None,
            mask: Optional[Tensor] = None, temperature: float = 1.0, mode: str = "kl", sparse: str = "rest",
            reduction: str = "mean") -> Tensor:
    """KL(teacher || student) per row at ``temperature``, on the student's vocabulary.

    Both sides are divided by the temperature (the usual KD form; the loss is then
    scaled by T^2). The teacher is

    * a dense distribution [..., V] (probabilities at T = 1): the ordinary KL;
    * sparse: a :class:`~surgeon.fusion.gld.TopK` whose ``ids`` are *student* ids
      (teacher ids mapped into the student's vocabulary; -1 = no counterpart,
      duplicates add up), or probabilities [..., k] at T = 1 with ``target_ids``.

    For a sparse teacher ``sparse`` chooses the distributions compared:

    * ``"rest"`` (default): the k kept ids plus one "rest" bucket holding every
      other id, for both sides (a coarsening of the full distributions, so it is a
      lower bound of the full KL and 0 when student and teacher agree). Needs the
      teacher's full normaliser at T; when it is unknown (a cache built at another
      temperature) it falls back to ``"topk"``;
    * ``"topk"``: both restricted to the kept ids and renormalised there;
    * ``"fusellm"``: the teacher renormalised over its kept ids against the
      student's full distribution (FuseLLM's target); not 0 for identical models.

    ``mode``: ``"kl"`` or ``"soft_ce"`` (-sum q log p; the same gradient, differs by
    the teacher's entropy).
    """
    if mode not in ("kl", "soft_ce"):
        raise ValueError(f"kl_loss: mode={mode!r} is not 'kl' or 'soft_ce'")
    if sparse not in SPARSE:
        raise ValueError(f"kl_loss: sparse={sparse!r} is not one of {', '.join(SPARSE)}")
    if temperature <= 0:
        raise ValueError(f"kl_loss: temperature must be positive, got {temperature}")
    logp = torch.log_softmax(student_logits.to(_wide(student_logits)) / temperature, dim=-1)
    v = logp.shape[-1]
    is_sparse = isinstance(target, TopK) or target_ids is not None
    if not is_sparse:
        logq, _ = _tempered_target(target, None, temperature, False)
        q = logq.exp()
        ce = -(q * logp).sum(-1)
        ent = torch.where(q > 0, q * logq, torch.zeros_like(q)).sum(-1)
        per_row = ce + ent if mode == "kl" else ce
    else:
        how = sparse
        if how == "rest" and (temperature != 1.0 and not isinstance(target, TopK)
                              or isinstance(target, TopK) and not exact_at(target, temperature)):
            how = "topk"
        logq, ids = _tempered_target(target, target_ids, temperature, renormalize=how != "rest")
        assert ids is not None
        q = sparse_to_dense(ids.to(logp.device), logq.exp().to(logp.dtype), v, renormalize=how != "rest")  # [..., V] mass per student id
        sel = sparse_to_dense(ids.to(logp.device), torch.ones_like(logq), v, renormalize=False) > 0
        if how == "topk":
            logp = torch.where(sel, logp, torch.full_like(logp, _FILL))  # finite: rows without ids stay finite
            logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
        safe_logp = torch.where(sel, logp, torch.zeros_like(logp))
        ce = -(q * safe_logp).sum(-1)
        ent = torch.where(q > 0, q * q.clamp_min(1e-30).log(), torch.zeros_like(q)).sum(-1)
        if how == "fusellm":
            ce = -(q * logp).sum(-1)
        if how == "rest":
            q_rest = (1.0 - q.sum(-1)).clamp(0.0, 1.0)
            p_sel = torch.where(sel, logp, torch.full_like(logp, _FILL)).logsumexp(-1)
            logp_rest = torch.log1p(-p_sel.exp().clamp(max=1.0 - 1e-7))
            ce = ce - q_rest * logp_rest
            ent = ent + torch.where(q_rest > 0, q_rest * q_rest.clamp_min(1e-30).log(), torch.zeros_like(q_rest))
        per_row = ce + ent if mode == "kl" else ce
    if temperature != 1.0:
        per_row = per_row * temperature**2
    return _reduce(per_row, mask, reduction)


def topk_probs(dist: Union[Tensor, TopK], k: Optional[int] = None, temperature: float = 1.0,
               renormalize: Optional[bool] = None) -> Tensor:
    """Probabilities at ``temperature`` in decreasing order, the first ``k`` of them: [..., k].

    ``renormalize``: normalise over the kept k instead of the full vocabulary; by
    default only when the full normaliser is unknown (a cached top-k at another
    temperature, :func:`~surgeon.fusion.gld.exact_at`).
    """
    if renormalize is None:
        renormalize = not exact_at(dist, temperature)
    if isinstance(dist, TopK):
        kk = dist.k if k is None else min(k, dist.k)
        lg = dist.logits[..., :kk].to(torch.promote_types(dist.logits.dtype, torch.float32)) / temperature
        if renormalize:
            return torch.softmax(lg, dim=-1)
        if not exact_at(dist, temperature):
            raise ValueError(f"uld: the cached top-k has no normaliser at temperature {temperature}")
        return (lg - dist.lse.to(lg.dtype).unsqueeze(-1)).exp()  # type: ignore[union-attr]
    x = dist.to(torch.promote_types(dist.dtype, torch.float32)) / temperature
    kk = x.shape[-1] if k is None else min(k, x.shape[-1])
    lg = torch.topk(x, kk, dim=-1).values
    norm = torch.logsumexp(lg if renormalize else x, dim=-1, keepdim=True)
    return (lg - norm).exp()


def uld_loss(student_logits: Union[Tensor, TopK], teacher: Union[Tensor, TopK], *, top_k: Optional[int] = None,
             mask: Optional[Tensor] = None, temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """ULD: sum_i |p_t(i)v - p_s(i)v| over the ``top_k`` largest probabilities per row.

    Rows are paired position by position; the vocabularies may differ (the shorter
    sorted vector is zero-padded). ``top_k=None`` uses the full vocabularies (the
    original ULD); a cached teacher (:class:`~surgeon.fusion.gld.TopK`) limits it
    to the cached k. Both sides are taken at ``temperature``; when a cached side's
    full normaliser at that temperature is unknown, both are renormalised over
    their kept top-k (identical models give 0 at every temperature).
    """
    if isinstance(teacher, TopK):
        top_k = teacher.k if top_k is None else min(top_k, teacher.k)
    if isinstance(student_logits, TopK):
        top_k = student_logits.k if top_k is None else min(top_k, student_logits.k)
    renorm = not (exact_at(student_logits, temperature) and exact_at(teacher, temperature))
    ps = topk_probs(student_logits, top_k, temperature, renorm)
    pt = topk_probs(teacher, top_k, temperature, renorm)
    n = max(ps.shape[-1], pt.shape[-1])
    if ps.shape[-1] < n:
        ps = torch.nn.functional.pad(ps, (0, n - ps.shape[-1]))
    if pt.shape[-1] < n:
        pt = torch.nn.functional.pad(pt, (0, n - pt.shape[-1]))
    per_row = (pt.to(ps.device) - ps).abs().sum(-1)
    return _reduce(per_row, mask, reduction)
