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

from typing import Optional, Union

import torch
from torch import Tensor

from .gld import TopK

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


def kl_loss(student_logits: Tensor, target: Tensor, *, target_ids: Optional[Tensor] = None,
            mask: Optional[Tensor] = None, temperature: float = 1.0, mode: str = "kl",
            reduction: str = "mean") -> Tensor:
    """KL(target || student) per row, on the student's vocabulary.

    ``target`` is either a dense distribution [..., V] or, with ``target_ids``
    [..., k], the sparse probabilities [..., k] of those ids (renormalised over the
    kept ids). ``mode``: ``"kl"`` or ``"soft_ce"`` (-sum q log p). The usual
    temperature-squared scaling is applied when ``temperature != 1``.
    """
    if mode not in ("kl", "soft_ce"):
        raise ValueError(f"kl_loss: mode={mode!r} is not 'kl' or 'soft_ce'")
    logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if target_ids is not None:
        q = sparse_to_dense(target_ids, target.float(), logp.shape[-1])
    else:
        q = target.float()
    ce = -(q * logp).sum(-1)
    if mode == "kl":
        ent = torch.where(q > 0, q * q.clamp_min(1e-30).log(), torch.zeros_like(q)).sum(-1)
        per_row = ce + ent
    else:
        per_row = ce
    if temperature != 1.0:
        per_row = per_row * temperature**2
    return _reduce(per_row, mask, reduction)


def topk_probs(dist: Union[Tensor, TopK], k: Optional[int] = None, temperature: float = 1.0) -> Tensor:
    """Probabilities in decreasing order, the first ``k`` of them: [..., k]."""
    if isinstance(dist, TopK):
        kk = dist.k if k is None else min(k, dist.k)
        lg = dist.logits[..., :kk].float()
        if dist.lse is not None and temperature == 1.0:
            return (lg - dist.lse.float().unsqueeze(-1)).exp()
        return torch.softmax(lg / temperature, dim=-1)
    p = torch.softmax(dist.float() / temperature, dim=-1)
    kk = p.shape[-1] if k is None else min(k, p.shape[-1])
    return torch.topk(p, kk, dim=-1).values


def uld_loss(student_logits: Union[Tensor, TopK], teacher: Union[Tensor, TopK], *, top_k: Optional[int] = None,
             mask: Optional[Tensor] = None, temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """ULD: sum_i |p_t(i)v - p_s(i)v| over the ``top_k`` largest probabilities per row.

    Rows are paired position by position; the vocabularies may differ (the shorter
    sorted vector is zero-padded). ``top_k=None`` uses the full vocabularies (the
    original ULD); a cached teacher (:class:`~surgeon.fusion.gld.TopK`) limits it
    to the cached k.
    """
    if isinstance(teacher, TopK):
        top_k = teacher.k if top_k is None else min(top_k, teacher.k)
    ps = topk_probs(student_logits, top_k, temperature)
    pt = topk_probs(teacher, top_k, temperature)
    n = max(ps.shape[-1], pt.shape[-1])
    if ps.shape[-1] < n:
        ps = torch.nn.functional.pad(ps, (0, n - ps.shape[-1]))
    if pt.shape[-1] < n:
        pt = torch.nn.functional.pad(pt, (0, n - pt.shape[-1]))
    per_row = (pt.to(ps.device) - ps).abs().sum(-1)
    return _reduce(per_row, mask, reduction)
