"""Batched Orthogonal Matching Pursuit in torch (CPU or CUDA, float32).

Given targets ``Y`` (B x D) and a dictionary ``A`` (N x D, one atom per row),
OMP picks, for each target, ``k`` atoms one at a time: the atom whose inner
product with the current residual is largest in absolute value, then refits
least-squares coefficients on all atoms picked so far and recomputes the
residual. This is exactly the rule of ``sklearn.linear_model.orthogonal_mp``
(atoms are not normalised, nothing is centred) and of mergekit's tokensurgeon.

The least-squares refit is kept cheap with an incremental Cholesky factor of
the picked atoms' Gram matrix (k x k per target, one new row per step), as in
Rubinstein, Zibulevsky & Elad's Batch-OMP. No N x N Gram matrix is ever
formed.

Two ways of running:

* exact (``screen=None``): each step correlates the residuals with the whole
  dictionary, one (B x D) @ (D x N) matrix product per step;
* screened (``screen=M``): each target first keeps its M nearest atoms by
  absolute cosine similarity (one product with the whole dictionary, once),
  then runs OMP inside that candidate set using the candidates' small M x M
  Gram matrix (formed per target with one batched product). Each step then
  costs O(M * t) instead of O(N * D): with M = 1024, k = 64 this is many times
  faster, and picks the same atoms whenever the exact run's atoms are among
  the M nearest (they nearly always are; ``screen=N`` is exact).

Targets are processed in batches (with a tqdm bar); an atom that is linearly
dependent on those already picked ends the pursuit for that target (its
remaining coefficients are 0), as scikit-learn does.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import InvalidInputError
from .products import DictionaryProducts, blas_threads

_DEP_TOL = 1e-5  # relative: a new atom whose fresh part has less than this share of its norm^2 is dependent


class _threads:
    """Run small per-step tensor ops on one CPU thread.

    The per-step work of the pursuit is many small element-wise ops; with
    several intra-op threads each op waits for all of them, which on a busy
    machine costs 3-10x more than running it on one thread. Big products
    (refreshes, the exact pursuit's correlations) keep all threads.
    """

    def __init__(self, n: int, device: torch.device):
        self.n = n
        self.active = device.type == "cpu"

    def __enter__(self) -> "_threads":
        if self.active:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            torch.set_num_threads(self.saved)


def _check(targets: torch.Tensor, dictionary: torch.Tensor, k: int) -> None:
    if targets.ndim != 2 or dictionary.ndim != 2:
        raise InvalidInputError(f"OMP needs 2-D targets and dictionary, got {tuple(targets.shape)} and {tuple(dictionary.shape)}")
    if targets.shape[1] != dictionary.shape[1]:
        raise InvalidInputError(f"OMP: targets have width {targets.shape[1]}, dictionary atoms {dictionary.shape[1]}")
    if not 1 <= k <= dictionary.shape[0]:
        raise InvalidInputError(f"OMP: k={k} atoms requested from a dictionary of {dictionary.shape[0]}")


def _new_direction(w: torch.Tensor | None, g_jj: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm of the new atom's part orthogonal to the atoms already picked.

    ``w`` (B x t) holds the new atom's coordinates on the orthonormal basis of
    the picked atoms, ``g_jj`` (B) its squared norm. Returns ``(d, live)``:
    d = sqrt(|a|^2 - |w|^2), and ``live`` cleared where the atom is
    (numerically) dependent, which ends the pursuit for that target.
    """
    d2 = g_jj if w is None else g_jj - (w * w).sum(-1)
    ok = live & (g_jj > 0) & (d2 > _DEP_TOL * g_jj.clamp_min(1e-30))
    return torch.where(ok, d2.clamp_min(1e-30).sqrt(), torch.ones_like(d2)), ok


def _add_direction(A: torch.Tensor, j: torch.Tensor, norms2: torch.Tensor, Q: torch.Tensor, L: torch.Tensor,
                   t: int, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Gram-Schmidt step of exact OMP's pick ``t`` (atoms ``j``, B): the new orthonormal
    directions ``q`` (B x D, 0 where the pursuit ended) go into ``Q[:, t]``, the atoms'
    coordinates into row ``t`` of ``L``; returns ``(q, d, live)`` (:func:`_new_direction`)."""
    a = A[j]  # B x D
    w = torch.bmm(Q[:, :t], a.unsqueeze(-1)).squeeze(-1) if t else None  # B x t
    d, live = _new_direction(w, norms2[j], live)
    q = a - torch.bmm(w.unsqueeze(1), Q[:, :t]).squeeze(1) if t else a
    q = q * torch.where(live, 1.0 / d, torch.zeros_like(d)).unsqueeze(1)
    Q[:, t] = q
    if t:
        L[:, t, :t] = w * live.unsqueeze(1)
    L[:, t, t] = d
    return q, d, live


def _coefficients(L: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Solve L^T x = z (L lower triangular, B x k x k): the atoms' coefficients."""
    return torch.linalg.solve_triangular(L.transpose(1, 2), z.unsqueeze(-1), upper=True).squeeze(-1)


def relative_residuals(y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``|y - fit_t| / |y|`` after each pick t (B x k), from the pursuit's projections.

    ``z[:, t]`` is the residual's component on the t-th orthonormal direction,
    so ``|r_t|^2 = |y|^2 - sum_{i <= t} z_i^2`` (Pythagoras): the curve costs
    nothing extra. Because OMP is greedy, column t - 1 is also exactly the
    error a run with ``k = t`` ends with. Accumulated in float64; a zero
    target has error 0. Slots after an early stop repeat the last value.
    """
    y2 = (y.double() * y.double()).sum(1, keepdim=True)
    left = (y2 - torch.cumsum(z.double() ** 2, dim=1)).clamp_min(0.0)
    return torch.where(y2 > 0, (left / y2.clamp_min(1e-300)).sqrt(), torch.zeros_like(left)).float()


# The pursuit below is Gram-Schmidt on the picked atoms, done in correlation
# space. With q_0..q_{t-1} the orthonormal directions of the atoms picked so far
# (a_j = sum_i L[t, i] q_i + L[t, t] q_t), the residual is y - sum_i z_i q_i
# with z_i = <q_i, y>, and the correlations alpha = A r are updated by one
# rank-one step per pick: alpha -= (A q_t) z_t. Only the new direction's
# correlations A q_t are computed per step; earlier ones never change. At the
# end L^T x = z gives the least-squares coefficients on the picked atoms,
# exactly the OMP solution (no triangular solve inside the loop). On CPU the
# residual r itself is kept instead (r -= q_t z_t) and A r recomputed per pick,
# block by block (:mod:`surgeon.transplant.products`): the same product count.


def omp_exact(targets: torch.Tensor, dictionary: torch.Tensor, k: int,
              residuals: Optional[torch.Tensor] = None,
              products: Optional[DictionaryProducts] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """OMP of each row of ``targets`` over all atoms of ``dictionary``.

    Returns ``(indices, coeffs)``, both B x k: the atoms in the order picked and
    their least-squares coefficients (0 for slots after an early stop).
    ``residuals`` (B x k, optional) receives :func:`relative_residuals`: the
    fit's relative error after each pick. ``products``: the dictionary's
    :class:`~surgeon.transplant.products.DictionaryProducts`, when the caller
    keeps one across batches.

    On CPU each pick correlates the residual itself with every atom
    (:func:`_omp_exact_blocked`); elsewhere the correlations are held and
    updated by one rank-one product per pick (:func:`_omp_exact_held`). The
    two are the same pursuit with the same products, rounded differently.
    """
    _check(targets, dictionary, k)
    y = targets.float()
    A = dictionary.float()
    if y.device.type == "cpu":
        return _omp_exact_blocked(y, A, k, residuals, DictionaryProducts(A) if products is None else products)
    return _omp_exact_held(y, A, k, residuals)


def _omp_exact_held(y: torch.Tensor, A: torch.Tensor, k: int,
                    residuals: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`omp_exact` with the B x N correlations held and updated by one rank-one
    product per pick, the picked atoms' set to exactly 0 (torch's products, any device)."""
    B, D = y.shape
    dev = y.device
    ar = torch.arange(B, device=dev)
    norms2 = (A * A).sum(1)
    idx = torch.zeros(B, k, dtype=torch.long, device=dev)
    L = torch.zeros(B, k, k, dtype=y.dtype, device=dev)
    Q = torch.zeros(B, k, D, dtype=y.dtype, device=dev)  # orthonormal directions, one row per pick
    z = torch.zeros(B, k, dtype=y.dtype, device=dev)
    live = torch.ones(B, dtype=torch.bool, device=dev)
    alpha = y @ A.T  # B x N correlations of the atoms with the residual
    At = A.T
    for t in range(k):
        # argmax |alpha| without materialising |alpha|; picked atoms hold exactly 0
        hi, j_hi = alpha.max(1)
        lo, j_lo = alpha.min(1)
        j = torch.where(hi >= -lo, j_hi, j_lo)
        idx[:, t] = j
        q, d, live = _add_direction(A, j, norms2, Q, L, t, live)
        zt = alpha[ar, j] / d * live
        z[:, t] = zt
        if t + 1 < k:
            torch.addmm(alpha, q * zt.unsqueeze(1), At, alpha=-1.0, out=alpha)
            alpha.scatter_(1, idx[:, :t + 1], 0.0)
    if residuals is not None:
        residuals.copy_(relative_residuals(y, z))
    return idx, _coefficients(L, z)


def _omp_exact_blocked(y: torch.Tensor, A: torch.Tensor, k: int, residuals: Optional[torch.Tensor],
                       products: DictionaryProducts) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`omp_exact` on CPU: the residuals ``r`` are kept (B x D) and each pick is the
    atom of largest ``|<a, r>|`` among those not yet picked
    (:meth:`DictionaryProducts.argmax_abs`: float32 block by block, or certified from
    bfloat16 products), without holding the B x N float32 correlations."""
    B, D = y.shape
    dev = y.device
    norms2 = (A * A).sum(1)
    idx = torch.zeros(B, k, dtype=torch.long, device=dev)
    L = torch.zeros(B, k, k, dtype=y.dtype, device=dev)
    Q = torch.zeros(B, k, D, dtype=y.dtype, device=dev)
    z = torch.zeros(B, k, dtype=y.dtype, device=dev)
    live = torch.ones(B, dtype=torch.bool, device=dev)
    r = y.clone()
    # numpy's BLAS (the float32 search) and torch's threads fight: torch's small ops then run on one
    # thread; with the bfloat16 search every product is torch's, and its threads help the rest too
    with _threads(1 if products.search == "float32" else torch.get_num_threads(), dev):
        for t in range(k):
            j = products.argmax_abs(r, idx[:, :t])
            idx[:, t] = j
            q, d, live = _add_direction(A, j, norms2, Q, L, t, live)
            zt = (q * r).sum(1)  # <q_t, r> = <a_j, r> / d; 0 where the pursuit ended
            z[:, t] = zt
            r.sub_(q * zt.unsqueeze(1))
    if residuals is not None:
        residuals.copy_(relative_residuals(y, z))
    return idx, _coefficients(L, z)


def screen_candidates(targets: torch.Tensor, dictionary: torch.Tensor, m: int,
                      cosines: Optional[DictionaryProducts] = None) -> torch.Tensor:
    """Indices (B x m, not in order) of each target's m atoms with the largest |cosine similarity|.

    ``cosines``: :func:`cosine_products` of ``dictionary``, when the caller keeps one across batches."""
    if cosines is None:
        cosines = cosine_products(dictionary.float())
    return cosines.top_abs(torch.nn.functional.normalize(targets.float(), dim=1), m)


def cosine_products(dictionary: torch.Tensor, products: Optional[DictionaryProducts] = None) -> DictionaryProducts:
    """Products with the atoms scaled to unit norm (a zero atom's stay 0): with unit rows, cosines.
    ``products``: the dictionary's plain products, whose copy of the atoms is then shared."""
    scale = 1.0 / dictionary.norm(dim=1).clamp_min(1e-12)
    return products.scaled(scale) if products is not None else DictionaryProducts(dictionary, scale=scale)


def omp_screened(targets: torch.Tensor, dictionary: torch.Tensor, k: int, candidates: torch.Tensor, *,
                 refresh: int = 0, gram: Optional[bool] = None, residuals: Optional[torch.Tensor] = None,
                 products: Optional[DictionaryProducts] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """OMP of each target restricted to its own M candidate atoms (``candidates``: B x M indices).

    ``refresh=s`` (> 0) replaces each target's candidates every s steps by the
    M atoms most correlated with its current residual (one product with the
    whole dictionary), so the candidate sets follow the pursuit instead of
    staying near the target; ``refresh=0`` keeps the initial candidates.

    The candidates' correlations with each new direction come from their
    M x M Gram matrix (``gram=True``, one batched product per candidate set;
    the default for M <= 512) or from the gathered candidates each step
    (``gram=False``). With candidates covering the whole dictionary this is
    exact OMP. ``residuals`` (B x k, optional) receives :func:`relative_residuals`;
    ``products``: the dictionary's :class:`~surgeon.transplant.products.DictionaryProducts`
    for the re-rankings, when the caller keeps one across batches.
    """
    _check(targets, dictionary, k)
    y = targets.float()
    A = dictionary.float()
    B, D = y.shape
    M = candidates.shape[1]
    if k > M:
        raise InvalidInputError(f"OMP: k={k} atoms requested from {M} screened candidates; raise screen to at least k")
    if gram is None:
        gram = M <= 512
    if refresh and products is None:
        products = DictionaryProducts(A)
    dev = y.device
    ar = torch.arange(B, device=dev)
    norms2 = (A * A).sum(1)
    idx = torch.zeros(B, k, dtype=torch.long, device=dev)
    L = torch.zeros(B, k, k, dtype=y.dtype, device=dev)
    Q = torch.zeros(B, k, D, dtype=y.dtype, device=dev) if refresh else None
    U = torch.zeros(B, k, M, dtype=y.dtype, device=dev)  # candidates' correlations with q_0..q_t
    z = torch.zeros(B, k, dtype=y.dtype, device=dev)
    live = torch.ones(B, dtype=torch.bool, device=dev)
    cand = candidates.to(dev)
    C = G = alpha = taken = None
    one = _threads(1, torch.device(dev))
    for t in range(k):
        if t == 0 or (refresh and t % refresh == 0):
            if t:  # re-rank: the M atoms most correlated with the residual
                r = y - torch.bmm(z[:, :t].unsqueeze(1), Q[:, :t]).squeeze(1)
                # the picked atoms' correlations are 0 up to rounding: they rank last, and
                # where they come back (a residual orthogonal to nearly every atom) they are taken
                cand = products.top_abs(r, M)
            C = A[cand]  # B x M x D
            # signed correlations of the candidates with the residual (y at t = 0)
            alpha = torch.bmm(C, (y if t == 0 else r).unsqueeze(-1)).squeeze(-1)
            if t:
                U[:, :t] = torch.bmm(Q[:, :t], C.transpose(1, 2))
            G = torch.bmm(C, C.transpose(1, 2)) if gram else None
            if gram:
                C = None
            taken = torch.zeros(B, M, dtype=torch.bool, device=dev)
            if t:
                taken |= (cand.unsqueeze(2) == idx[:, None, :t]).any(2)
        with one:  # the pick itself: small tensors, one thread
            score = alpha.abs().masked_fill_(taken, -1.0)
            jl = score.argmax(1)
            del score
            taken[ar, jl] = True
            j = cand[ar, jl]
            idx[:, t] = j
            w = U[:, :t].gather(2, jl.view(B, 1, 1).expand(B, t, 1)).squeeze(2) if t else None  # B x t
            d, live = _new_direction(w, norms2[j], live)
            a = A[j]
            col = G[ar, jl] if gram else torch.bmm(C, a.unsqueeze(-1)).squeeze(-1)  # <candidates, new atom>
            if t:
                col = col - torch.bmm(w.unsqueeze(1), U[:, :t]).squeeze(1)
            inv_d = torch.where(live, 1.0 / d, torch.zeros_like(d))
            u = col * inv_d.unsqueeze(1)
            U[:, t] = u
            if Q is not None:
                q = a - torch.bmm(w.unsqueeze(1), Q[:, :t]).squeeze(1) if t else a
                Q[:, t] = q * inv_d.unsqueeze(1)
            if t:
                L[:, t, :t] = w * live.unsqueeze(1)
            L[:, t, t] = d
            zt = alpha[ar, jl] * inv_d
            z[:, t] = zt
            alpha.sub_(u * zt.unsqueeze(1))
    if residuals is not None:
        residuals.copy_(relative_residuals(y, z))
    return idx, _coefficients(L, z)


DEFAULT_REFRESH = 8
#: Candidates per target when screening is chosen automatically (the default).
DEFAULT_SCREEN = 128
#: Up to this many floating-point operations of products ``auto`` runs exact OMP: ~10 minutes on
#: a 2-core AVX512-BF16 machine (certified bfloat16 search), longer without the instructions.
#: Both real pairs of docs/transplant.md (1.0e13 and 2.9e13) are exact; a 128k-token vocabulary
#: onto another at width 4096 (~1e15) screens.
AUTO_EXACT_FLOPS = 1e14


def omp_flops(n_targets: int, n_atoms: int, dim: int, k: int, screen: Optional[int] = None,
              refresh: int = DEFAULT_REFRESH) -> dict[str, float]:
    """Floating-point operations of the pursuit's matrix products (the FLOP floor).

    Exact: one (targets x dim) @ (dim x atoms) product per pick, ``k`` of them.
    Screened: one such product to pick the first candidates and one per
    re-ranking (``ceil(k / refresh) - 1``, none when ``refresh=0``), plus per
    target and candidate set the M x M Gram matrix (M^2 * dim) and the
    candidates' correlations with the directions already picked. Element-wise
    work, top-k selection and memory traffic are not counted: this is the
    least any implementation of the same arithmetic must do.
    """
    big = 2.0 * n_targets * n_atoms * dim
    if screen is None or screen >= n_atoms:
        return {"products": float(k), "vocab_products": k * big, "candidate_products": 0.0, "total": k * big}
    m = min(screen, n_atoms)
    sets = [0] + ([t for t in range(refresh, k, refresh)] if refresh else [])
    vocab = len(sets) * big
    cand = sum(2.0 * n_targets * (m * m * dim + t * m * dim) for t in sets)
    return {"products": float(len(sets)), "vocab_products": vocab, "candidate_products": cand, "total": vocab + cand}


def choose_screen(n_targets: int, n_atoms: int, dim: int, k: int, screen: Optional[int] | str = "auto",
                  refresh: int = DEFAULT_REFRESH) -> Optional[int]:
    """The candidate count a transplant uses; ``None`` means exact OMP.

    ``"auto"`` (the default everywhere): exact unless its products exceed
    ``AUTO_EXACT_FLOPS`` and screening saves at least 3x of them; then
    ``DEFAULT_SCREEN`` candidates re-ranked every ``refresh`` picks. Exact is the
    default because screening's near-equal fits (the same error in the donor
    space, other atoms) moved held-out bits per byte by up to ±0.008 against
    exact on the real pairs of docs/transplant.md, either way: the default
    computes what mergekit computes. An integer is taken as given
    (``>= n_atoms`` is exact), ``None`` is exact. The choice depends on the
    sizes only, never on the machine, so a recipe gives the same rows everywhere.
    """
    if screen is None:
        return None
    if screen == "auto":
        exact = omp_flops(n_targets, n_atoms, dim, k)["total"]
        if exact <= AUTO_EXACT_FLOPS or n_atoms <= DEFAULT_SCREEN:
            return None
        scr = max(DEFAULT_SCREEN, k)
        if omp_flops(n_targets, n_atoms, dim, k, scr, refresh)["total"] * 3 > exact:
            return None
        return scr
    if not isinstance(screen, int) or isinstance(screen, bool) or screen < 1:
        raise InvalidInputError(f"screen must be a positive integer, 'auto' or None (exact), got {screen!r}")
    return None if screen >= n_atoms else max(screen, k)


def auto_batch_size(n_atoms: int, dim: int, k: int, screen: Optional[int], budget_bytes: int = 512 << 20) -> int:
    """A batch size whose working set stays near ``budget_bytes``."""
    per = 4 * (2 * n_atoms + k * dim + k * k + 2 * dim)  # correlations with every atom, directions
    if screen:
        m = min(screen, n_atoms)
        per = max(per, 4 * (m * m + m * dim + k * m + 2 * m + k * k + k * dim) + 8 * n_atoms)
    return int(max(1, min(4096, budget_bytes // per)))


def batch_omp(
    targets: torch.Tensor,
    dictionary: torch.Tensor,
    k: int,
    *,
    screen: Optional[int] = None,
    refresh: int = DEFAULT_REFRESH,
    batch_size: Optional[int] = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "OMP",
    residuals: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OMP for many targets in batches; returns CPU ``(indices, coeffs)`` (B x k each).

    ``residuals`` (a CPU float32 tensor, B x k, optional) receives each
    target's relative error after each pick (:func:`relative_residuals`).

    ``screen=M`` restricts each target's dictionary to M candidates: first its
    M nearest atoms by |cosine|, then, every ``refresh`` steps, the M atoms
    most correlated with its residual (``refresh=0``: the nearest M only).
    ``screen=None`` (or M >= the dictionary size): exact OMP.
    """
    from tqdm.auto import tqdm

    _check(targets, dictionary, k)
    if screen is not None and screen < k:
        raise InvalidInputError(f"screen={screen} must be at least k={k}")
    if refresh is None or refresh < 0:
        refresh = 0
    dev = torch.device(device)
    A = dictionary.to(dev, torch.float32)
    n = targets.shape[0]
    use_screen = screen is not None and screen < A.shape[0]
    bs = batch_size or auto_batch_size(A.shape[0], A.shape[1], k, screen if use_screen else None)
    products = DictionaryProducts(A)
    cosines = cosine_products(A, products) if use_screen else None
    out_idx = torch.zeros(n, k, dtype=torch.long)
    out_coef = torch.zeros(n, k, dtype=torch.float32)
    steps = math.ceil(n / bs) if n else 0
    with torch.inference_mode(), blas_threads(torch.get_num_threads()):
        for s in tqdm(range(steps), desc=desc, unit="batch", disable=not progress, leave=False):
            y = targets[s * bs:(s + 1) * bs].to(dev, torch.float32)
            res = torch.empty(len(y), k, device=dev) if residuals is not None else None
            if use_screen:
                cand = screen_candidates(y, A, screen, cosines)
                i, c = omp_screened(y, A, k, cand, refresh=refresh, residuals=res, products=products)
            else:
                i, c = omp_exact(y, A, k, residuals=res, products=products)
            if res is not None:
                residuals[s * bs:s * bs + len(y)] = res.cpu()
            out_idx[s * bs:s * bs + len(y)] = i.cpu()
            out_coef[s * bs:s * bs + len(y)] = c.cpu()
    return out_idx, out_coef


def reconstruct(indices: torch.Tensor, coeffs: torch.Tensor, atoms: torch.Tensor,
                batch: Optional[int] = None) -> torch.Tensor:
    """sum_j coeffs[:, j] * atoms[indices[:, j]] in float32, in batches (B x D) of ~64 MB."""
    if batch is None:
        batch = max(1, (64 << 20) // max(1, 4 * indices.shape[1] * atoms.shape[1]))
    out = torch.empty(indices.shape[0], atoms.shape[1], dtype=torch.float32)
    for s in range(0, indices.shape[0], batch):
        sel = atoms[indices[s:s + batch]].float()
        out[s:s + batch] = torch.bmm(coeffs[s:s + batch].unsqueeze(1).float(), sel).squeeze(1)
    return out
