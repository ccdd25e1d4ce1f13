"""How rows for new tokens are made: OMP and the simple baselines.

Every function returns float32 rows in the base model's embedding space, one
per requested donor id, given

* ``base_w``   the base model's matrix (rows = base ids),
* ``donor_w``  the donor model's matrix (rows = donor ids) — only OMP reads it,
* ``shared``   (donor id, base id) pairs of tokens both vocabularies have.

``omp``     each new token's donor row is approximated by k donor rows of shared
            tokens (orthogonal matching pursuit); the same coefficients are
            applied to the base's rows of those tokens (Goddard & Fernandes 2025).
``mean``    the mean of all base rows.
``zero``    zeros.
``subword`` the mean of the base rows of the base-tokenizer pieces that spell
            the new token's bytes (the mean row when nothing spells it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import InvalidInputError
from .error_curve import summarize
from .omp import DEFAULT_REFRESH, batch_omp, choose_screen, reconstruct
from .products import exact_search
from .vocab import TokenizerInfo, _base_index, subword_pieces

METHODS = ("omp", "mean", "zero", "subword")


def row_mean(w: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Mean row in float32, converting a chunk at a time (no full float32 copy)."""
    acc = torch.zeros(w.shape[1], dtype=torch.float64)
    for s in range(0, w.shape[0], chunk):
        acc += w[s:s + chunk].double().sum(0)
    return (acc / max(1, w.shape[0])).float()


@dataclass
class OmpFit:
    """One pursuit's result: each new token's ``k`` shared-token atoms (``indices`` into
    ``shared``, B x k) and coefficients (B x k), fitted in the donor space, plus
    ``stats`` (:func:`omp_fit`). Applying it to any base matrix whose rows ``shared``
    names gives that matrix's new rows (:meth:`rows`): a transplant whose donor ties
    its head to its embeddings pursues once for the base's embeddings and head alike."""

    indices: torch.Tensor
    coeffs: torch.Tensor
    shared: list[tuple[int, int]]
    stats: dict[str, Any]

    def rows(self, base_w: torch.Tensor) -> torch.Tensor:
        """The new rows in ``base_w``'s space (float32, B x base width)."""
        b_ids = torch.tensor([b for _, b in self.shared], dtype=torch.long)
        return reconstruct(self.indices, self.coeffs, base_w[b_ids])


def omp_fit(donor_w: torch.Tensor, shared: list[tuple[int, int]], new_ids: list[int], k: int,
            *, screen: Optional[int] | str = "auto", refresh: int = DEFAULT_REFRESH, batch_size: Optional[int] = None,
            device: str = "cpu", progress: bool = True, desc: str = "OMP") -> OmpFit:
    """The pursuit for ``new_ids`` over the donor rows of ``shared`` tokens, with statistics of
    the fit in the donor space (``error_by_k``: :func:`surgeon.transplant.error_curve.summarize`
    of the fit after each pick).

    ``screen``: ``"auto"`` (exact unless its products exceed 1e14 FLOP, else screened; see
    :func:`surgeon.transplant.omp.choose_screen`), an integer, or ``None`` (exact).
    """
    if not shared:
        raise InvalidInputError("OMP needs at least one token shared by both vocabularies; none is")
    if not new_ids:
        return OmpFit(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), shared, {"k": k, "targets": 0})
    k_eff = min(k, len(shared))
    d_ids = torch.tensor([d for d, _ in shared], dtype=torch.long)
    atoms_donor = donor_w[d_ids].float()
    targets = donor_w[torch.tensor(new_ids, dtype=torch.long)].float()
    scr = choose_screen(len(new_ids), len(shared), int(donor_w.shape[1]), k_eff, screen, refresh)
    residuals = torch.empty(len(new_ids), k_eff)
    idx, coef = batch_omp(targets, atoms_donor, k_eff, screen=scr, refresh=refresh, batch_size=batch_size,
                          device=device, progress=progress, desc=desc, residuals=residuals)
    approx = reconstruct(idx, coef, atoms_donor)
    tn = targets.norm(dim=1).clamp_min(1e-12)
    rel = ((targets - approx).norm(dim=1) / tn)
    cos = torch.nn.functional.cosine_similarity(targets, approx, dim=1)
    stats = {"k": k_eff, "screen": scr, "refresh": refresh if scr else None,
             "search": None if scr else exact_search(device),  # how exact OMP found each pick
             "targets": len(new_ids), "atoms": len(shared),
             "donor_rel_error_mean": float(rel.mean()), "donor_cosine_mean": float(cos.mean()),
             "error_by_k": summarize(residuals)}
    return OmpFit(idx, coef, shared, stats)


def omp_rows(base_w: torch.Tensor, donor_w: torch.Tensor, shared: list[tuple[int, int]], new_ids: list[int], k: int,
             **options: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """OMP rows for ``new_ids`` in ``base_w``'s space and the fit's statistics (:func:`omp_fit`,
    whose keyword ``options`` this takes)."""
    if not new_ids:
        return torch.zeros(0, base_w.shape[1]), {"k": k, "targets": 0}
    fit = omp_fit(donor_w, shared, new_ids, k, **options)
    return fit.rows(base_w), fit.stats


def subword_rows(base_w: torch.Tensor, base_tok: TokenizerInfo, donor_tok: TokenizerInfo, new_ids: list[int],
                 mean: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    index = _base_index(base_tok)
    out = torch.empty(len(new_ids), base_w.shape[1], dtype=torch.float32)
    spelled = 0
    for r, tid in enumerate(new_ids):
        b = donor_tok.bytes_of(tid) if tid not in donor_tok.special else None
        pieces = [p for p in subword_pieces(b, base_tok, index) if p < base_w.shape[0]] if b else []
        if pieces:
            out[r] = base_w[torch.tensor(pieces)].float().mean(0)
            spelled += 1
        else:
            out[r] = mean
    return out, {"targets": len(new_ids), "spelled": spelled, "fallback_mean": len(new_ids) - spelled}


def new_rows(method: str, base_w: torch.Tensor, donor_w: torch.Tensor, shared: list[tuple[int, int]],
             new_ids: list[int], *, k: int = 64, screen: Optional[int] | str = "auto", refresh: int = DEFAULT_REFRESH,
             batch_size: Optional[int] = None,
             device: str = "cpu", progress: bool = True, base_tok: TokenizerInfo | None = None,
             donor_tok: TokenizerInfo | None = None, desc: str = "OMP") -> tuple[torch.Tensor, dict[str, Any]]:
    """Rows (float32, len(new_ids) x base width) for new tokens by ``method``."""
    if method == "omp":
        return omp_rows(base_w, donor_w, shared, new_ids, k, screen=screen, refresh=refresh, batch_size=batch_size,
                        device=device, progress=progress, desc=desc)
    if method == "zero":
        return torch.zeros(len(new_ids), base_w.shape[1]), {"targets": len(new_ids)}
    mean = row_mean(base_w)
    if method == "mean":
        return mean.unsqueeze(0).expand(len(new_ids), -1).clone(), {"targets": len(new_ids)}
    if method == "subword":
        if base_tok is None or donor_tok is None:
            raise InvalidInputError("the subword method needs both tokenizers")
        return subword_rows(base_w, base_tok, donor_tok, new_ids, mean)
    raise InvalidInputError(f"unknown transplant method {method!r} (choose from {', '.join(METHODS)})")
