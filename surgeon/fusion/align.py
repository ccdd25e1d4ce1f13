"""Cross-tokenizer alignment, FuseLLM-style (Wan et al. 2024, fanqiwan/FuseAI).

Two problems arise when a pivot (student) model learns from a teacher that uses a
different tokenizer:

1. **Which positions correspond.** The same text is cut differently. We align the
   two token sequences by dynamic programming (dynamic time warping) whose local
   cost is the edit distance between the tokens' surface strings with word-start
   markers stripped (:func:`align_tokens`), then keep the pairs of positions that
   predict a token starting at the same place of the text (:func:`pair_positions`).
2. **Which ids correspond.** A teacher distribution over its vocabulary is moved
   into the pivot's: each teacher token maps to the pivot token with the same
   surface (word-start markers normalised), else to the pivot token at the minimum
   edit distance (lowest id on ties), as FuseLLM does; special tokens map by role
   (bos, eos, pad, unk) or by identical text (:class:`VocabMap`).

Surfaces are bytes: byte-level BPE tokens (GPT-2 ``Ġ`` alphabet) are decoded
through the byte alphabet, SentencePiece pieces have ``▁`` replaced by a space and
``<0xNN>`` byte-fallback pieces become that byte. Edit distances are computed for
whole batches of token pairs at once in torch (:func:`edit_distance_matrix`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from ..transplant.vocab import byte_decoder as _byte_decoder  # GPT-2's byte alphabet, kept in one place

__all__ = [
    "TokenSurfaces",
    "edit_distance",
    "edit_distance_matrix",
    "edit_distance_pairs",
    "nearest_by_edit_distance",
    "align_tokens",
    "pair_positions",
    "VocabMap",
]

SP_MARKER = "\u2581"


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        import json

        spec = json.loads(backend.to_str())
        text = json.dumps([spec.get("decoder"), spec.get("pre_tokenizer")])
        if "ByteLevel" in text:
            return True
        if "Metaspace" in text or SP_MARKER in text:
            return False
    vocab = tokenizer.get_vocab()
    return "Ġ" in "".join(list(vocab)[:5000])


class TokenSurfaces:
    """Surface bytes of every id of a (fast) tokenizer, plus what is special.

    ``surface[i]`` is the text the token stands for (a leading space marks a word
    start); ``stripped[i]`` has the word-start markers (spaces) removed, which is
    what FuseLLM compares during sequence alignment. Special tokens' surfaces are
    their own text (e.g. ``<|im_start|>``), so a rendered chat template aligns with
    a tokenizer that spells it out piece by piece.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.byte_level = _is_byte_level(tokenizer)
        vocab: dict[str, int] = tokenizer.get_vocab()
        self.size = max(len(tokenizer), max(vocab.values()) + 1)
        tokens: list[Optional[str]] = [None] * self.size
        for t, i in vocab.items():
            tokens[i] = t
        self.tokens = tokens
        self.special_ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []))
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special_ids |= {int(i) for i, t in added.items() if getattr(t, "special", False)}
        self.added_ids = {int(i) for i in added}
        self.surface: list[bytes] = [self._surface(i, t) for i, t in enumerate(tokens)]
        self.stripped: list[bytes] = [s.replace(b" ", b"") for s in self.surface]
        self.byte_fallback = {i for i, t in enumerate(tokens)
                              if t is not None and len(t) == 6 and t.startswith("<0x") and t.endswith(">")}
        self.roles = {}
        for role in ("bos", "eos", "pad", "unk"):
            tid = getattr(tokenizer, f"{role}_token_id", None)
            if tid is not None:
                self.roles[role] = int(tid)

    def _surface(self, i: int, t: Optional[str]) -> bytes:
        if t is None:
            return b""
        if i in self.added_ids:
            return t.encode("utf-8")
        if self.byte_level:
            dec = _byte_decoder()
            try:
                return bytes(dec[c] for c in t)
            except KeyError:
                return t.encode("utf-8")
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            try:
                return bytes([int(t[3:5], 16)])
            except ValueError:
                pass
        return t.replace(SP_MARKER, " ").encode("utf-8")

    def surfaces(self, ids: Iterable[int], stripped: bool = True) -> list[bytes]:
        table = self.stripped if stripped else self.surface
        return [table[int(i)] for i in ids]


# ----------------------------------------------------------------------------- edit distance
def edit_distance(a: bytes, b: bytes) -> int:
    """Levenshtein distance (insert, delete, substitute: cost 1 each)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        prev = cur
    return prev[-1]


class _Packed:
    """Strings as one padded int16 matrix [N, W] (pad -1) plus lengths, for gathering."""

    def __init__(self, strings: Sequence[bytes]):
        self.lengths = np.fromiter((len(x) for x in strings), dtype=np.int64, count=len(strings))
        width = int(self.lengths.max()) if len(strings) else 0
        buf = b"".join(strings)
        flat = np.frombuffer(buf, dtype=np.uint8).astype(np.int16)
        mat = np.full((len(strings), max(width, 1)), -1, dtype=np.int16)
        if flat.size:
            rows = np.repeat(np.arange(len(strings)), self.lengths)
            starts = np.cumsum(self.lengths) - self.lengths
            cols = np.arange(flat.size) - np.repeat(starts, self.lengths)
            mat[rows, cols] = flat
        self.mat = torch.from_numpy(mat)
        self.len_t = torch.from_numpy(self.lengths)

    def __len__(self) -> int:
        return len(self.lengths)


def edit_distance_pairs(a: Sequence[bytes], b: Sequence[bytes]) -> torch.Tensor:
    """Levenshtein distances of the pairs (a[p], b[p]) -> int32 [P], vectorised in torch."""
    if len(a) != len(b):
        raise ValueError("edit_distance_pairs: a and b must have the same length")
    idx = np.arange(len(a))
    return _edit_indexed(_Packed(a), idx, _Packed(b), idx)


@contextlib.contextmanager
def _one_thread():
    """Small tensor ops in long Python loops: a thread pool's wake-ups cost more than
    the arithmetic (40x slower with 2 threads on a busy machine), so use one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _edit_indexed(pa: _Packed, ia: np.ndarray, pb: _Packed, ib: np.ndarray, chunk: int = 1 << 18) -> torch.Tensor:
    """Distances between pa[ia[p]] and pb[ib[p]]; pairs grouped by length buckets."""
    with _one_thread():
        return _edit_indexed_impl(pa, ia, pb, ib, chunk)


def _edit_indexed_impl(pa: _Packed, ia: np.ndarray, pb: _Packed, ib: np.ndarray, chunk: int) -> torch.Tensor:
    out = torch.zeros(len(ia), dtype=torch.int32)
    if len(ia) == 0:
        return out
    la = pa.lengths[ia]
    lb = pb.lengths[ib]
    bucket = np.ceil(np.log2(np.maximum(la, 1))).astype(np.int64) * 64 + np.ceil(np.log2(np.maximum(lb, 1))).astype(np.int64)
    order = np.argsort(bucket, kind="stable")
    bounds = np.flatnonzero(np.diff(bucket[order])) + 1
    for grp in np.split(order, bounds):
        for s0 in range(0, len(grp), chunk):
            sel = grp[s0:s0 + chunk]
            wa = max(int(la[sel].max()), 1)
            wb = max(int(lb[sel].max()), 1)
            aa = pa.mat[torch.from_numpy(ia[sel])][:, :wa]
            bb = pb.mat[torch.from_numpy(ib[sel])][:, :wb]
            bb = torch.where(bb < 0, torch.full_like(bb, -2), bb)  # pads never match each other
            out[torch.from_numpy(sel)] = _dp(aa, torch.from_numpy(la[sel]), bb, torch.from_numpy(lb[sel]))
    return out


def _dp(aa: torch.Tensor, la: torch.Tensor, bb: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """Levenshtein DP for padded pairs, swept along anti-diagonals.

    Diagonal d holds the cells (i, d - i) as a vector over i; each step computes
    only its valid band from the two previous diagonals through contiguous slices
    (three rotating buffers), so a block costs about wa * wb vectorised cell updates.
    """
    n, wa = aa.shape
    wb = bb.shape[1]
    acols = aa.t().contiguous()  # [wa, n]
    bcols = bb.t().contiguous()  # [wb, n]
    res = torch.maximum(la, lb).to(torch.int32)  # right when either string is empty
    target = torch.where((la > 0) & (lb > 0), la + lb, torch.zeros_like(la))
    order = torch.argsort(target)
    counts = torch.bincount(target, minlength=wa + wb + 1).tolist()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    bufs = [torch.empty(wa + 1, n, dtype=torch.int32) for _ in range(3)]
    prev2, prev1 = bufs[0], bufs[1]
    prev2[0] = 0
    prev1[0] = 1
    if wa >= 1:
        prev1[1] = 1
    for d in range(2, wa + wb + 1):
        cur = bufs[d % 3]
        lo, hi = max(1, d - wb), min(wa, d - 1)
        if lo <= hi:
            jb = torch.arange(d - lo - 1, d - hi - 2, -1)  # b column (j - 1) for i = lo..hi
            neq = (acols[lo - 1:hi] != bcols[jb]).to(torch.int32)
            torch.minimum(prev1[lo - 1:hi], prev1[lo:hi + 1], out=cur[lo:hi + 1])
            cur[lo:hi + 1] += 1
            torch.minimum(cur[lo:hi + 1], prev2[lo - 1:hi] + neq, out=cur[lo:hi + 1])
        if d <= wb:
            cur[0] = d
        if d <= wa:
            cur[d] = d
        if counts[d]:
            sel = order[starts[d]:starts[d + 1]]
            res[sel] = cur[la[sel], sel]
        prev2, prev1 = prev1, cur
    return res


def edit_distance_matrix(a: Sequence[bytes], b: Sequence[bytes]) -> torch.Tensor:
    """All pairwise Levenshtein distances [len(a), len(b)] (int32)."""
    if not a or not b:
        return torch.zeros(len(a), len(b), dtype=torch.int32)
    ia = np.repeat(np.arange(len(a)), len(b))
    ib = np.tile(np.arange(len(b)), len(a))
    return _edit_indexed(_Packed(a), ia, _Packed(b), ib).view(len(a), len(b))


def _histograms(p: _Packed) -> torch.Tensor:
    h = torch.zeros(len(p), 257, dtype=torch.float32)
    h.scatter_add_(1, (p.mat.long() + 1).clamp_min(0), torch.ones(p.mat.shape))
    return h[:, 1:]  # drop the pad column


def nearest_by_edit_distance(queries: Sequence[bytes], candidates: Sequence[bytes], chunk: int = 256,
                             probes: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, the candidate index at minimum edit distance (first on ties) and the distance.

    Exact, with pruning: max(|length difference|, ceil(L1 of byte histograms / 2)) is
    a lower bound of the edit distance; the ``probes`` candidates with the lowest
    bound give an upper bound, and only candidates whose lower bound does not exceed
    it are compared exactly.
    """
    pc = _Packed(candidates)
    pq_all = _Packed(queries)
    hc = _histograms(pc)
    lc = torch.from_numpy(pc.lengths).float()
    hq_all = _histograms(pq_all)
    best_idx = torch.zeros(len(queries), dtype=torch.long)
    best_d = torch.zeros(len(queries), dtype=torch.int32)
    for s0 in range(0, len(queries), chunk):
        q = min(chunk, len(queries) - s0)
        rows = np.arange(s0, s0 + q)
        lq = torch.from_numpy(pq_all.lengths[rows]).float()
        lower = torch.maximum((lq[:, None] - lc[None, :]).abs(),
                              torch.ceil(torch.cdist(hq_all[s0:s0 + q], hc, p=1) / 2 - 1e-4))
        probe = torch.topk(lower, min(probes, len(candidates)), dim=1, largest=False).indices
        pi = np.repeat(rows, probe.shape[1])
        d_probe = _edit_indexed(pq_all, pi, pc, probe.reshape(-1).numpy()).view(q, -1)
        ub = d_probe.min(1).values
        qi, ci = torch.nonzero(lower <= ub[:, None].float(), as_tuple=True)
        d = _edit_indexed(pq_all, rows[qi.numpy()], pc, ci.numpy())
        full = torch.full((q, len(candidates)), torch.iinfo(torch.int32).max, dtype=torch.int32)
        full[qi, ci] = d
        v = full.min(1).values
        k = (full == v[:, None]).to(torch.int8).argmax(1)  # first minimum: stable tie-break
        best_idx[s0:s0 + q] = k
        best_d[s0:s0 + q] = v
    return best_idx, best_d


# ----------------------------------------------------------------------------- sequence alignment
def align_tokens(a: Sequence[bytes], b: Sequence[bytes], cost: Optional[np.ndarray] = None,
                 memo: Optional[dict] = None) -> tuple[float, list[tuple[int, int]]]:
    """DTW alignment of two token sequences by edit distance (FuseLLM's ``dtw``).

    ``M[i, j] = d(a_i, b_j) + min(M[i-1, j-1], M[i-1, j], M[i, j-1])``; the path is
    traced back from the last pair preferring the diagonal on ties. Every index of
    both sequences appears in at least one pair; pairs are in increasing order.
    Returns (total cost, pairs). ``memo`` (a dict) keeps token-pair distances
    across calls, so aligning a dataset computes each pair once.
    """
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return 0.0, []
    if cost is None:
        ua = sorted(set(a))
        ub = sorted(set(b))
        if memo is None:
            d = edit_distance_matrix(ua, ub).numpy().astype(np.float64)
        else:
            d = np.empty((len(ua), len(ub)))
            todo_a, todo_b, where = [], [], []
            for r, x in enumerate(ua):
                for c, y in enumerate(ub):
                    v = memo.get((x, y))
                    if v is None:
                        todo_a.append(x)
                        todo_b.append(y)
                        where.append((r, c))
                    else:
                        d[r, c] = v
            if todo_a:
                got = edit_distance_pairs(todo_a, todo_b).tolist()
                for (r, c), x, y, v in zip(where, todo_a, todo_b, got):
                    d[r, c] = v
                    memo[(x, y)] = v
        ia = _index(a, ua)
        ib = _index(b, ub)
        cost = d[np.ix_(ia, ib)]
    acc = np.full((n, m), np.inf)
    # anti-diagonal sweeps: every cell depends on cells of the two previous diagonals
    acc[0, 0] = cost[0, 0]
    for s in range(1, n + m - 1):
        i = np.arange(max(0, s - m + 1), min(n, s + 1))
        j = s - i
        best = np.full(i.shape, np.inf)
        ok = (i > 0) & (j > 0)
        best[ok] = acc[i[ok] - 1, j[ok] - 1]
        ok = i > 0
        best[ok] = np.minimum(best[ok], acc[i[ok] - 1, j[ok]])
        ok = j > 0
        best[ok] = np.minimum(best[ok], acc[i[ok], j[ok] - 1])
        acc[i, j] = cost[i, j] + best
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        diag = acc[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = acc[i - 1, j] if i > 0 else np.inf
        left = acc[i, j - 1] if j > 0 else np.inf
        k = int(np.argmin([diag, up, left]))
        if k == 0:
            i, j = i - 1, j - 1
        elif k == 1:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    path.reverse()
    return float(acc[n - 1, m - 1]), path


def _index(seq: Sequence[bytes], uniq: list[bytes]) -> np.ndarray:
    pos = {x: k for k, x in enumerate(uniq)}
    return np.array([pos[x] for x in seq])


def pair_positions(path: Sequence[tuple[int, int]], n_a: int, n_b: int) -> list[tuple[int, int]]:
    """Pairs of *prediction positions* (u-1, v-1) whose next tokens u, v start together.

    Position t of a causal LM predicts token t+1. Pivot token u and teacher token v
    "start together" when v is the first teacher token aligned to u and u the
    first pivot token aligned to v; then both models have read the same prefix and
    predict a token that begins at the same place of the text, and the teacher's
    distribution at v-1 is a target for the pivot at u-1. Tokens inside a longer
    token of the other side get no pair (their positions keep only the SFT term).
    """
    first_b = [-1] * n_a
    first_a = [-1] * n_b
    for i, j in path:
        if first_b[i] < 0 or j < first_b[i]:
            first_b[i] = j
        if first_a[j] < 0 or i < first_a[j]:
            first_a[j] = i
    pairs = []
    for u in range(1, n_a):
        v = first_b[u]
        if v >= 1 and first_a[v] == u:
            pairs.append((u - 1, v - 1))
    return pairs


# ----------------------------------------------------------------------------- vocabulary mapping
@dataclass
class VocabMap:
    """Teacher id -> pivot id (``-1``: unmapped), built lazily for the ids in use."""

    teacher: TokenSurfaces
    pivot: TokenSurfaces
    table: torch.Tensor = field(init=False)
    how: dict[str, int] = field(default_factory=lambda: {"special": 0, "exact": 0, "edit": 0, "none": 0})
    _resolved: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.table = torch.full((self.teacher.size,), -1, dtype=torch.long)
        self._resolved = torch.zeros(self.teacher.size, dtype=torch.bool)
        self._exact: dict[bytes, int] = {}
        for i, s in enumerate(self.pivot.surface):
            if i in self.pivot.special_ids or not s:
                continue
            # prefer regular pieces over byte-fallback pieces with the same bytes
            if s not in self._exact or (self._exact[s] in self.pivot.byte_fallback and i not in self.pivot.byte_fallback):
                self._exact[s] = i
        cands = [i for i, s in enumerate(self.pivot.surface) if s and i not in self.pivot.special_ids]
        self._cand_ids = torch.tensor(cands, dtype=torch.long)
        self._cand_surf = [self.pivot.surface[i] for i in cands]
        self._special_text = {self.pivot.surface[i]: i for i in self.pivot.special_ids}

    @classmethod
    def build(cls, teacher_tokenizer: Any, pivot_tokenizer: Any, ids: Optional[Iterable[int]] = None) -> "VocabMap":
        vm = cls(TokenSurfaces(teacher_tokenizer), TokenSurfaces(pivot_tokenizer))
        vm.resolve(range(vm.teacher.size) if ids is None else ids)
        return vm

    def resolve(self, ids: Iterable[int]) -> None:
        """Map the given teacher ids (those not mapped yet)."""
        todo = sorted({int(i) for i in ids if 0 <= int(i) < self.teacher.size and not self._resolved[int(i)]})
        need_edit = []
        for i in todo:
            self._resolved[i] = True
            if i in self.teacher.special_ids:
                role = next((r for r, tid in self.teacher.roles.items() if tid == i), None)
                j = self.pivot.roles.get(role) if role else None
                if j is None:
                    j = self._special_text.get(self.teacher.surface[i])
                if j is None:
                    j = self._exact.get(self.teacher.surface[i])
                self.table[i] = -1 if j is None else j
                self.how["special" if j is not None else "none"] += 1
                continue
            s = self.teacher.surface[i]
            if not s:
                self.how["none"] += 1
                continue
            j = self._exact.get(s)
            if j is not None:
                self.table[i] = j
                self.how["exact"] += 1
            else:
                need_edit.append(i)
        if need_edit and len(self._cand_surf):
            best, _ = nearest_by_edit_distance([self.teacher.surface[i] for i in need_edit], self._cand_surf)
            self.table[torch.tensor(need_edit)] = self._cand_ids[best]  # lowest pivot id on ties
            self.how["edit"] += len(need_edit)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Map a tensor of teacher ids (resolving any new ones first)."""
        flat = ids.reshape(-1)
        new = flat[~self._resolved[flat.clamp(0, self.teacher.size - 1)]]
        if new.numel():
            self.resolve(new.unique().tolist())
        return self.table[ids.clamp(0, self.teacher.size - 1)]
