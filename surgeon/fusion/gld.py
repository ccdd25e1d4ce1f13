"""Graph-on-Logits Distillation (GLD), after InfiGFusion (Wang et al. 2025, arXiv 2505.13893).

The idea
--------
For one sequence, keep the top-k values of each position's output distribution
(every other vocabulary entry is zero) and aggregate the outer products over the
positions into a *co-activation graph*

    C = sum_t w_t z_t z_t^T            (nodes = vocabulary channels, C >= 0 for probabilities)

where ``w_t`` weights the valid positions (``1/T`` for ``aggregate="mean"``).
Two models' graphs are compared with a Gromov-Wasserstein (GW) distance, which
needs no correspondence between the two vocabularies (nor between the two
sequences' positions: each graph already sums over its own positions). Exact GW
is a quadratic assignment problem; the paper replaces it by a closed form: compress
every node to one scalar feature, sort, and compare in order,

    GW~(C, D) = sum_i | f_C(i)v - f_D(i)v |          (v: sorted in decreasing order)

which costs O(n log n) for n nodes. Student and teacher keep their own vocabularies;
graphs of different sizes are compared after padding the smaller one with isolated
nodes (feature 0), which is what a vocabulary channel the model never ranks in its
top-k is anyway.

What the paper states, what it leaves open, and the options here
----------------------------------------------------------------
The paper's abstract: "we retain the top-k logits per output and aggregate their
outer products across sequence positions"; its framework figure (the
InfiGFusion repository's assets/framework.png): "Sort & TopK", then
GLD = sum_{i=1}^{k} |f_C(i)v - f_D(i)v| over k nodes. The defaults follow that:
``values="logits"``, ``nodes="rank"`` (k nodes), ``p=1``, ``node_reduction="sum"``.
The node feature f, the per-position normalisation of raw logits, the aggregation
over positions and a temperature are not stated in that material; the defaults
for them are ours (docs/fusion.md has the measurements):

``values``     what is kept per position: top-k ``"logits"`` (default, the paper),
               ``"probs"`` (softmax over the full vocabulary, then top-k) or
               ``"logprobs"``.
``normalize``  per-position rescaling of the kept values: ``"minmax"`` (default;
               an affine map of the kept values to [1/k, 1]: raw logits are defined
               only up to a per-position shift, and this is shift- and
               scale-invariant), ``"none"``, ``"sum"`` (kept values sum to 1),
               ``"l2"`` (unit norm), ``"standardize"`` (z-score over the top-k,
               InfiFusion's logit standardisation; every degree is then 0, so it is
               refused with ``feature="degree"``).
``nodes``      ``"rank"`` (default; the k rank slots of the sorted top-k: a k x k
               graph, the figure's sum over i = 1..k) or ``"vocab"`` (vocabulary
               channels, the abstract's "nodes represent vocabulary channels"; up to
               T k nodes per sequence).
``feature``    the scalar node feature: ``"degree"`` (row sum; default, our choice),
               ``"self"`` (the self-loop C_ii = sum_t w_t z_t(i)^2, purely local), or
               ``"l2"`` (row L2 norm, the GW_2 eccentricity; costs O(T^2 k) per
               sequence in vocab mode instead of O(T k)).
``p``          exponent of the per-node difference (1 = the figure's absolute value; 2).
``aggregate``  ``"mean"`` over valid positions (default; graphs of sequences of
               different lengths — different tokenisers — are comparable) or ``"sum"``.
``node_reduction`` ``"sum"`` over nodes (default, the figure's formula) or ``"mean"``.
``temperature`` divides the logits first (with ``minmax`` it has no effect).
``scale``      ``"gw"`` (default, ours): the figure's sum rescaled to the closed-form
               GW~_p below (uniform node weights 1/k, features of the uniform node
               measure; degree and p = 1: the sum / k^2, in [0, 1] with ``minmax``),
               so a weight of 1 is a moderate term; ``"sum"``: the raw sum.

With probabilities, no normalisation, mean over positions and the degree, the
loss is bounded: every degree is at most 1 and the degrees sum to at most 1, so
it lies in [0, 2], like a total-variation distance.

How the closed form relates to exact GW (what the tests check)
-------------------------------------------------------------
Take graphs C, D with n nodes each and uniform node weights 1/n, and the exact
GW_p(C, D) = min over couplings pi (marginals 1/n) of sum_{ijkl} |C_ik - D_jl|^p pi_ij pi_kl.
Let the *normalised* degree be fbar_C(i) = (1/n) sum_k C_ik and define

    GW~_p(C, D) = (1/n) sum_i | fbar_C(i)v - fbar_D(i)v |^p     (= W_p^p of the two degree histograms)

(:func:`sorted_gw`). Then, for every p >= 1:

1. **Lower bound.** GW~_p <= GW_p. For a coupling pi with marginals 1/n,
   sum_kl pi_kl C_ik = fbar_C(i) and sum_kl pi_kl D_jl = fbar_D(j) (because
   sum_l pi_kl = 1/n), and sum_kl pi_kl = 1, so by Jensen
   |fbar_C(i) - fbar_D(j)|^p = |sum_kl pi_kl (C_ik - D_jl)|^p <= sum_kl pi_kl |C_ik - D_jl|^p.
   Weighting by pi_ij and summing: the cost of moving the degree histogram of C onto
   that of D along pi is <= the GW cost of pi; the cheapest such move in 1-D is the
   sorted matching, GW~_p. Hence GW~_p <= GW_p <= GW_p over permutations (the degree
   version of Memoli's eccentricity lower bound). The L_2(pi) triangle inequality
   gives the same for ``feature="l2"`` with p = 2 (row RMS sqrt((1/n) sum_k C_ik^2)).
2. **Zero on relabellings.** D = P C P^T for a permutation P gives GW~ = GW = 0.
3. **Exact cases.**
   a. p = 1, degree, *dominated* graphs: if after the sorted matching sigma
      C_ik >= D_sigma(i)sigma(k) for all i, k (e.g. rank-1 graphs a a^T and b b^T with
      a, b >= 0 and sorted(a) >= sorted(b) entrywise: the graph of one position whose
      top-k probabilities dominate the other's), no term of a row cancels, so the
      permutation sigma costs exactly GW~_1 and GW~_1 = GW_1 (coupling and permutation).
   b. p = 2, degree, constant shift: D = P C P^T + c 11^T gives GW~_2 = GW_2 = c^2.
   c. p = 2, l2, proportional rank-1 graphs: C = a a^T, D = s^2 P a a^T P^T gives
      GW~_2 = GW_2 = (1 - s^2)^2 |a|^4 / n^2.
   Outside these cases GW~ is a strict lower bound in general.

The loss :func:`gld_loss` uses the same construction with un-normalised degrees
(row sums) and a sum over nodes (the figure's sum); for p = 1 it equals
n^2 * GW~_1 of the graphs.

Everything is differentiable almost everywhere (top-k and sort pass gradients to
the selected entries), batched over sequences and device-agnostic. See
docs/fusion.md for the full derivation and the measured costs.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    "TopK",
    "exact_at",
    "gld_loss",
    "topk_values",
    "graph_features",
    "co_activation_graph",
    "node_features",
    "sorted_gw",
    "sorted_distance",
    "gw_bruteforce",
    "gw_cost",
]

VALUES = ("probs", "logprobs", "logits")
NORMALIZE = ("none", "sum", "l2", "standardize", "minmax")
NODES = ("vocab", "rank")
FEATURES = ("degree", "self", "l2")
AGGREGATE = ("mean", "sum")
REDUCTION = ("mean", "sum", "none")


@dataclass(frozen=True)
class TopK:
    """A distribution kept as its top-k per position (what the teacher cache stores).

    ``logits``: [B, T, k] the k largest logits, in decreasing order;
    ``ids``: [B, T, k] their vocabulary ids; ``lse``: [B, T] the logsumexp of the
    *full* logits divided by ``lse_temperature`` (so the log-probabilities at that
    temperature are ``logits / lse_temperature - lse``), or None;
    ``vocab_size``: the model's vocabulary size.

    At a temperature other than ``lse_temperature`` the full normaliser is unknown:
    the losses then compare *both* sides renormalised over their kept entries
    (:func:`exact_at`), so that identical models still give 0.
    """

    logits: Tensor
    ids: Tensor
    lse: Optional[Tensor]
    vocab_size: int
    lse_temperature: float = 1.0

    @property
    def k(self) -> int:
        return int(self.logits.shape[-1])

    def to(self, device: Union[str, torch.device]) -> "TopK":
        return TopK(self.logits.to(device), self.ids.to(device),
                    None if self.lse is None else self.lse.to(device), self.vocab_size, self.lse_temperature)

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperature: float = 1.0) -> "TopK":
        """Top-k of full logits [..., V], with the logsumexp of ``logits / temperature``.

        The logsumexp is computed in float32 or the logits' own dtype, whichever is wider.
        """
        v, i = torch.topk(logits, min(k, logits.shape[-1]), dim=-1)
        wide = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.logsumexp(logits.to(wide) / temperature, dim=-1).to(logits.dtype)
        return cls(v, i, lse, int(logits.shape[-1]), float(temperature))


def exact_at(dist: "Dist", temperature: float) -> bool:
    """Whether the full-vocabulary probabilities of ``dist`` at ``temperature`` are known.

    Full logits: always. A :class:`TopK`: only when it carries the logsumexp at
    that temperature (``lse_temperature``).
    """
    if not isinstance(dist, TopK):
        return True
    return dist.lse is not None and math.isclose(dist.lse_temperature, temperature, rel_tol=1e-9, abs_tol=1e-12)


Dist = Union[Tensor, TopK]


def _check(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"gld: {name}={value!r} is not one of {', '.join(map(repr, allowed))}")


# ----------------------------------------------------------------------------- top-k values
def topk_values(dist: Dist, k: int, *, values: str = "logits", temperature: float = 1.0,
                normalize: str = "minmax", renormalize: Optional[bool] = None) -> tuple[Tensor, Tensor, int]:
    """The kept values per position: ``(z [B,T,k], ids [B,T,k], vocab_size)``.

    ``dist`` is full logits [B, T, V] or a :class:`TopK`. Values are sorted in
    decreasing order of the underlying logit; logits are divided by ``temperature``
    first. ``renormalize`` (for ``"probs"``/``"logprobs"``): normalise the
    probabilities over the kept k entries instead of the full vocabulary; by
    default only when the full normaliser at ``temperature`` is unknown
    (:func:`exact_at`). A loss comparing two distributions must make the same
    choice for both (:func:`gld_loss` does), or identical models differ.
    """
    _check("values", values, VALUES)
    _check("normalize", normalize, NORMALIZE)
    if temperature <= 0:
        raise ValueError(f"gld: temperature must be positive, got {temperature}")
    if renormalize is None:
        renormalize = not exact_at(dist, temperature)
    if isinstance(dist, TopK):
        kk = min(k, dist.k)
        lg, ids, vocab = dist.logits[..., :kk] / temperature, dist.ids[..., :kk], dist.vocab_size
        if values == "logits":
            z = lg
        else:
            if renormalize:
                lp = torch.log_softmax(lg.to(torch.promote_types(lg.dtype, torch.float32)), dim=-1).to(lg.dtype)
            elif exact_at(dist, temperature):
                lp = lg - dist.lse.to(lg.dtype).unsqueeze(-1)  # type: ignore[union-attr]
            else:
                raise ValueError(f"gld: the cached top-k has no normaliser at temperature {temperature} "
                                 f"(it has one at {dist.lse_temperature}); pass renormalize=True")
            z = lp if values == "logprobs" else lp.exp()
    else:
        if dist.dim() != 3:
            raise ValueError(f"gld: logits must be [batch, seq, vocab], got shape {tuple(dist.shape)}")
        vocab = int(dist.shape[-1])
        kk = min(k, vocab)
        x = dist / temperature if temperature != 1.0 else dist
        lg, ids = torch.topk(x, kk, dim=-1)
        if values == "logits":
            z = lg
        else:
            norm = torch.logsumexp(lg if renormalize else x, dim=-1, keepdim=True)
            lp = lg - norm
            z = lp if values == "logprobs" else lp.exp()
    return _normalize(z, normalize), ids, vocab


def _normalize(z: Tensor, how: str) -> Tensor:
    """Per-position rescaling of the kept values [..., k] (sorted in decreasing order).

    ``minmax`` maps the kept values affinely so that the largest is 1 and the
    smallest 1/k (the floor is placed one mean gap below the smallest kept value),
    so no kept entry becomes 0 (a plain (z - min)/(max - min) would zero the k-th
    and make top-k act as top-(k-1)); evenly spaced values become 1/k, 2/k, ..., 1.
    """
    if how == "none":
        return z
    if how == "sum":
        return z / z.sum(-1, keepdim=True).abs().clamp_min(1e-12)
    if how == "l2":
        return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if how == "standardize":
        mu = z.mean(-1, keepdim=True)
        sd = z.std(-1, keepdim=True, unbiased=False).clamp_min(1e-6)
        return (z - mu) / sd
    k = z.shape[-1]
    if k == 1:
        return torch.ones_like(z)
    lo = z.min(-1, keepdim=True).values
    hi = z.max(-1, keepdim=True).values
    span = (hi - lo) * (k / (k - 1))  # hi - floor, floor = lo - (hi - lo) / (k - 1)
    return 1.0 - (hi - z) / span.clamp_min(1e-12)


def _position_weights(z: Tensor, mask: Optional[Tensor], aggregate: str) -> Tensor:
    """[B, T] weights w_t: the mask, divided by the count of valid positions for "mean"."""
    b, t = z.shape[0], z.shape[1]
    w = torch.ones(b, t, dtype=z.dtype, device=z.device) if mask is None else mask.to(z.dtype)
    if w.shape != (b, t):
        raise ValueError(f"gld: mask shape {tuple(w.shape)} does not match logits [batch, seq] {(b, t)}")
    if aggregate == "mean":
        w = w / w.sum(-1, keepdim=True).clamp_min(1.0)
    return w


# ----------------------------------------------------------------------------- graph features
def graph_features(z: Tensor, ids: Tensor, vocab_size: int, mask: Optional[Tensor] = None, *,
                   nodes: str = "vocab", feature: str = "degree", aggregate: str = "mean") -> Tensor:
    """Node features of each sequence's co-activation graph, without forming the graph.

    Returns [B, n] with n = ``vocab_size`` (vocab nodes) or k (rank nodes). Costs
    O(T k) per sequence for ``degree``/``self`` and O(T^2 k) for ``l2`` in vocab mode.
    """
    _check("nodes", nodes, NODES)
    _check("feature", feature, FEATURES)
    _check("aggregate", aggregate, AGGREGATE)
    w = _position_weights(z, mask, aggregate)  # [B, T]
    if nodes == "rank":
        graph = torch.einsum("bt,bti,btj->bij", w, z, z)
        return node_features(graph, feature)
    b, t, k = z.shape
    out = z.new_zeros(b, vocab_size)
    flat_ids = ids.reshape(b, t * k)
    if feature == "degree":
        s = z.sum(-1, keepdim=True)  # [B, T, 1] = sum_j z_t(j)
        contrib = (w.unsqueeze(-1) * s * z).reshape(b, t * k)
        return out.scatter_add(1, flat_ids, contrib)
    if feature == "self":
        contrib = (w.unsqueeze(-1) * z * z).reshape(b, t * k)
        return out.scatter_add(1, flat_ids, contrib)
    # l2: ||C_i||^2 = sum_{t,t'} w_t w_t' z_t(i) z_t'(i) <z_t, z_t'>
    zw = z * w.clamp_min(0).sqrt().unsqueeze(-1)  # C = sum_t zw_t zw_t^T
    dense = z.new_zeros(b, t, vocab_size).scatter(2, ids, zw)  # [B, T, V]
    # x[b, t, a, t'] = dense[b, t', ids[b, t, a]]
    x = torch.gather(dense.transpose(1, 2), 1, flat_ids.unsqueeze(-1).expand(b, t * k, t)).reshape(b, t, k, t)
    gram = torch.einsum("bta,btas->bts", zw, x)  # <zw_t, zw_s>
    q = torch.einsum("bts,btas->bta", gram, x)  # (G zw)_{t, ids[t,a]}
    r = out.scatter_add(1, flat_ids, (zw * q).reshape(b, t * k))
    return r.clamp_min(0).add(1e-30).sqrt() * (r > 0)


def co_activation_graph(z: Tensor, ids: Optional[Tensor] = None, vocab_size: Optional[int] = None,
                        mask: Optional[Tensor] = None, *, nodes: str = "vocab", aggregate: str = "mean") -> Tensor:
    """The dense co-activation graphs [B, n, n] (for inspection and tests; O(n^2) memory)."""
    _check("nodes", nodes, NODES)
    w = _position_weights(z, mask, aggregate)
    if nodes == "vocab":
        if ids is None or vocab_size is None:
            raise ValueError("gld: vocab nodes need ids and vocab_size")
        z = z.new_zeros(*z.shape[:2], vocab_size).scatter(2, ids, z)
    return torch.einsum("bt,bti,btj->bij", w, z, z)


def node_features(graph: Tensor, feature: str = "degree", normalized: bool = False) -> Tensor:
    """Scalar node features of dense graphs [..., n, n] -> [..., n].

    ``normalized`` uses the uniform node measure 1/n (mean instead of sum, RMS
    instead of L2 norm), the form in which :func:`sorted_gw` bounds exact GW.
    """
    _check("feature", feature, FEATURES)
    n = graph.shape[-1]
    if feature == "degree":
        f = graph.sum(-1)
        return f / n if normalized else f
    if feature == "self":
        return graph.diagonal(dim1=-2, dim2=-1)
    sq = graph.pow(2).sum(-1)
    if normalized:
        sq = sq / n
    return sq.clamp_min(0).add(1e-30).sqrt() * (sq > 0)


# ----------------------------------------------------------------------------- sorted comparison
def _pad_to(x: Tensor, n: int) -> Tensor:
    return x if x.shape[-1] >= n else torch.nn.functional.pad(x, (0, n - x.shape[-1]))


def sorted_distance(fa: Tensor, fb: Tensor, p: float = 1.0, *, node_reduction: str = "sum",
                    nonnegative: bool = False, max_nodes: Optional[int] = None) -> Tensor:
    """sum_i |fa(i)v - fb(i)v|^p over sorted features [..., na], [..., nb] -> [...].

    The shorter vector is padded with zeros (isolated nodes). ``nonnegative`` says
    both are >= 0 with at most ``max_nodes`` non-zeros, so only the ``max_nodes``
    largest need sorting (same result, O(n + m log m)). ``node_reduction="mean"``
    divides by the (padded) node count.
    """
    if p < 1:
        raise ValueError(f"gld: p must be >= 1, got {p}")
    n = max(fa.shape[-1], fb.shape[-1])
    if nonnegative and max_nodes is not None and max_nodes < n:
        m = max_nodes
        a = torch.topk(_pad_to(fa, m), m, dim=-1).values
        b = torch.topk(_pad_to(fb, m), m, dim=-1).values
    else:
        a = torch.sort(_pad_to(fa, n), dim=-1, descending=True).values
        b = torch.sort(_pad_to(fb, n), dim=-1, descending=True).values
    d = (a - b).abs()
    d = d if p == 1 else d.pow(p)
    total = d.sum(-1)
    return total / n if node_reduction == "mean" else total


def sorted_gw(c: Tensor, d: Tensor, feature: str = "degree", p: float = 1.0) -> Tensor:
    """The closed-form GW~_p between dense graphs [..., n, n] (uniform node weights).

    (1/n) sum_i |f_C(i)v - f_D(i)v|^p with normalised features; a lower bound of
    exact GW_p for ``feature="degree"`` (any p >= 1) and ``feature="l2"`` (p = 2).
    A smaller graph is padded with isolated nodes.
    """
    n = max(c.shape[-1], d.shape[-1])
    c = _pad_graph(c, n)
    d = _pad_graph(d, n)
    fa = node_features(c, feature, normalized=True)
    fb = node_features(d, feature, normalized=True)
    return sorted_distance(fa, fb, p, node_reduction="mean")


def _pad_graph(g: Tensor, n: int) -> Tensor:
    m = g.shape[-1]
    return g if m == n else torch.nn.functional.pad(g, (0, n - m, 0, n - m))


# ----------------------------------------------------------------------------- exact references
def gw_cost(c: Tensor, d: Tensor, plan: Tensor, p: float = 2.0) -> Tensor:
    """sum_{ijkl} |C_ik - D_jl|^p T_ij T_kl for a coupling T (n x m)."""
    diff = (c[:, None, :, None] - d[None, :, None, :]).abs().pow(p)  # [i, j, k, l]
    return torch.einsum("ijkl,ij,kl->", diff, plan, plan)


def gw_bruteforce(c: Tensor, d: Tensor, p: float = 2.0) -> tuple[float, tuple[int, ...]]:
    """Exact min over permutations of (1/n^2) sum_{ik} |C_ik - D_s(i)s(k)|^p (n <= 9).

    Equals exact coupling GW_p for p = 2 when both graphs are positive semidefinite
    (co-activation graphs are): the objective is then concave in the coupling, so a
    vertex of the Birkhoff polytope (a permutation) is optimal. For other cases it
    is an upper bound of coupling GW.
    """
    n = c.shape[-1]
    if d.shape[-1] != n:
        raise ValueError("gw_bruteforce: graphs must have the same size")
    if n > 9:
        raise ValueError(f"gw_bruteforce: n={n} is too large for brute force (n! permutations)")
    c = c.double()
    d = d.double()
    perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)
    best, arg = math.inf, None
    for chunk in perms.split(4096):
        dp = d[chunk[:, :, None], chunk[:, None, :]]  # [P, n, n] = D[s(i), s(k)]
        cost = (c.unsqueeze(0) - dp).abs().pow(p).sum((-1, -2)) / (n * n)
        v, i = cost.min(0)
        if float(v) < best:
            best, arg = float(v), tuple(chunk[i].tolist())
    return best, arg  # type: ignore[return-value]


# ----------------------------------------------------------------------------- the loss
def gld_loss(student_logits: Dist, teacher_logits: Dist, top_k: int = 16, *,
             student_mask: Optional[Tensor] = None, teacher_mask: Optional[Tensor] = None,
             values: str = "logits", temperature: float = 1.0, normalize: str = "minmax",
             nodes: str = "rank", feature: str = "degree", p: float = 1.0,
             aggregate: str = "mean", node_reduction: str = "sum", scale: str = "gw",
             reduction: str = "mean") -> Tensor:
    """Graph-on-Logits Distillation loss between a student and a teacher.

    ``student_logits`` [B, Ts, Vs] and ``teacher_logits`` [B, Tt, Vt] (or a
    :class:`TopK`) are each in their own vocabulary and tokenisation: sequence b of
    both describes the same text, nothing else needs to correspond. Masks [B, T]
    select the positions that enter each graph (e.g. the response tokens).
    Returns a scalar (``reduction`` "mean"/"sum" over the batch) or [B] ("none").
    The options are described in the module docstring. ``scale="gw"`` (default)
    rescales the figure's sum so that, with rank nodes, it is the closed form
    GW~_p of :func:`sorted_gw` itself (uniform node weights 1/k, features of the
    uniform node measure: for the degree and p = 1 the sum / k^2), in [0, 1] with
    ``minmax``; ``"sum"`` keeps the raw sum. For probabilities at a
    temperature where a cached teacher's full normaliser is unknown, both sides are
    renormalised over their kept top-k (identical models give 0 at every temperature).
    """
    _check("reduction", reduction, REDUCTION)
    _check("node_reduction", node_reduction, ("sum", "mean"))
    _check("scale", scale, ("gw", "sum"))
    if top_k < 1:
        raise ValueError(f"gld: top_k must be >= 1, got {top_k}")
    if feature == "degree" and normalize == "standardize":
        raise ValueError("gld: normalize='standardize' makes every position's values sum to 0, so every "
                         "degree is 0; use feature='l2' or 'self', or normalize='minmax'")
    renorm = not (exact_at(student_logits, temperature) and exact_at(teacher_logits, temperature))
    zs, ids_s, vs = topk_values(student_logits, top_k, values=values, temperature=temperature, normalize=normalize,
                                renormalize=renorm)
    zt, ids_t, vt = topk_values(teacher_logits, top_k, values=values, temperature=temperature, normalize=normalize,
                                renormalize=renorm)
    if zs.shape[0] != zt.shape[0]:
        raise ValueError(f"gld: student batch {zs.shape[0]} != teacher batch {zt.shape[0]}")
    zt = zt.to(zs.dtype)
    fs = graph_features(zs, ids_s, vs, student_mask, nodes=nodes, feature=feature, aggregate=aggregate)
    ft = graph_features(zt, ids_t.to(zs.device), vt, None if teacher_mask is None else teacher_mask.to(zs.device),
                        nodes=nodes, feature=feature, aggregate=aggregate)
    nonneg = values == "probs" and normalize != "standardize" or feature in ("self", "l2") or normalize == "minmax"
    max_nodes = max(zs.shape[1] * zs.shape[2], zt.shape[1] * zt.shape[2]) if nodes == "vocab" else None
    per_seq = sorted_distance(fs, ft, p, node_reduction=node_reduction, nonnegative=nonneg, max_nodes=max_nodes)
    if scale == "gw":
        kk = max(zs.shape[-1], zt.shape[-1])
        # sorted_gw's normalisation: node weights 1/k and features of the uniform node measure
        per_seq = per_seq / float(kk) ** {"degree": p + 1, "self": 1, "l2": 1 + p / 2}[feature]
    if reduction == "none":
        return per_seq
    return per_seq.mean() if reduction == "mean" else per_seq.sum()
