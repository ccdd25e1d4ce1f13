"""Arcee Fusion's arithmetic and kernel: row-wise importance, quartile threshold, mask.

The definition is :func:`surgeon.merge.methods.arcee_fusion.arcee_fusion`.
Blocks hold whole rows (the KL divergence is per row); one pass keeps the
importance values the quartiles need (all of them up to
:data:`SAMPLE_SIZE` entries, else a seeded sample of that many
(:func:`sample_positions`): at most
1,000,000 floats) and each row's KL divergence (4 bytes a row), then each
block is merged with the threshold, its importance ``|m - b| * KL`` made
from the kept KL values: the softmaxes are computed once, not once a pass.
The quartiles are read by a partial sort (:func:`outlier_threshold`).

With numba the merge pass is one compiled loop per piece from the stored
dtype (:meth:`ArceeFusionKernel.merge_raw`): ``d = m - b``, kept where
``|d| * KL >= threshold``, ``b + d * keep``, each a float32 operation with
its own rounding as torch's block ops round them, then the output dtype's
rounding (tests/test_merge_raw.py compares the bytes); through torch that
was ~8 passes over float32 temporaries a block. The statistic pass keeps
torch's softmaxes (their bits decide which entries sit at the threshold), fed
rows the compiled loop widens into two reused float32 blocks; the sampled
importances come from those blocks, while they are in cache, through the same
float32 operations (:meth:`ArceeFusionKernel.observe_raw`).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import rng as _random
from ..rng import positions_below, signed_key, stream_key, word_stream
from ..tensor import TensorMerge
from . import _raw
from ._jit import compiled
from .base import Kernel, PieceInputs, block_size_for

SAMPLE_SIZE = 1_000_000
QUARTILES = (0.25, 0.5, 0.75)
_EPS = 1e-8


def row_kl(m: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(m) + 1e-8 || softmax(b) + 1e-8)`` of each row (the last
    dimension; shape ``[rows, 1]``), float32, with mergekit's operations in
    mergekit's order (so the comparisons with the threshold agree). In place
    where mergekit allocates (the same kernels, the same values: a fresh float32
    temporary per op cost more than the arithmetic, 6.4 -> 2.9 ms a 2^18 block)."""
    p = F.softmax(m, dim=-1).add_(_EPS)
    q = F.softmax(b, dim=-1).add_(_EPS)
    return torch.sum(torch.div(p, q, out=q).log_().mul_(p), dim=-1, keepdim=True)


def importance(m: torch.Tensor, b: torch.Tensor, kl: torch.Tensor | None = None) -> torch.Tensor:
    """``|m - b| * KL`` along the last dimension (``kl``: :func:`row_kl` of
    these rows when already known)."""
    return (m - b).abs_().mul_(row_kl(m, b) if kl is None else kl)


def outlier_threshold(values: torch.Tensor) -> torch.Tensor:
    """``median + 1.5 * (q3 - q1)`` of float32 values, each quartile the value at
    index ``floor(q (n - 1))`` of the sorted values (NaN last; a 0-d float32
    tensor). On CPU the three are read in linear time instead of sorting every value:
    with numba by a radix select (:func:`_kernels` ``select_sorted``), else by
    partial sorts (``np.partition``)."""
    n = values.numel()
    idx = [int(q * (n - 1)) for q in QUARTILES]
    loops = _kernels() if values.device.type == "cpu" and n > 0 else None
    if loops is not None:
        # a compiled radix select: ~3 ms on 1,000,000 values where numpy's three partitions
        # took ~13 ms (2 of a 1.1B merge's 17 CPU-s)
        flat = values.detach().reshape(-1).to(torch.float32).contiguous().numpy()
        q1, med, q3 = (torch.tensor(x, dtype=torch.float32)
                       for x in loops.select_sorted(flat, np.array(idx, dtype=np.int64)))
    elif values.device.type == "cpu":
        # the median first, then each quartile within its half: three one-index partitions
        # cost ~7 ms on 1,000,000 values where one partition at three indices took ~21 ms
        i1, i2, i3 = idx
        part = np.partition(values.detach().reshape(-1).numpy(), i2)
        lower = np.partition(part[:i2], i1)[i1] if i1 < i2 else part[i2]
        upper = np.partition(part[i2 + 1:], i3 - i2 - 1)[i3 - i2 - 1] if i3 > i2 else part[i2]
        q1, med, q3 = (torch.tensor(x, dtype=torch.float32) for x in (lower, part[i2], upper))
    else:
        ordered = values.reshape(-1).sort().values
        q1, med, q3 = (ordered[i] for i in idx)
    return med + 1.5 * (q3 - q1)


def sample_positions(n: int, seed: int, name: str) -> torch.Tensor | None:
    """The flat positions (int64, ascending) whose importance estimates the
    quartiles, or None when all ``n`` values are used (``n <= SAMPLE_SIZE``).

    A stratified sample: position ``j`` is drawn uniformly from the ``j``-th of
    ``SAMPLE_SIZE`` consecutive ranges ``[floor(j n / k), floor((j + 1) n / k))``
    by :func:`surgeon.merge.rng.positions_below` of entry ``j`` of the word stream
    keyed by (recipe seed, tensor name, ``"arcee_fusion"``). An entry is drawn
    with probability 1 / (its range's size): ``floor(n / k)`` or one more, spread
    evenly through the tensor (mergekit's draws with replacement: ``k / n`` each).
    No range goes unsampled, and the sample comes sorted: no sort. The compiled
    loop and torch draw the same positions, on any device."""
    if n <= SAMPLE_SIZE:
        return None
    key = stream_key(seed, name, "arcee_fusion")
    loops = _kernels() if n < 2 ** 33 else None  # the compiled loop's float64 quotients are exact below
    if loops is not None:
        return torch.from_numpy(loops.sample(signed_key(key), n, np.empty(SAMPLE_SIZE, np.int64)))
    edges = torch.arange(SAMPLE_SIZE + 1, dtype=torch.int64).mul_(n).div_(SAMPLE_SIZE, rounding_mode="floor")
    return edges[:-1] + positions_below(word_stream(key, 0, SAMPLE_SIZE), edges[1:] - edges[:-1])


@compiled
def _kernels(jit: Any) -> Any:
    """The merge pass's loop, the sample's positions and the quartiles' select."""
    _raw.register()
    _random.register()
    ch = _raw.CHUNK

    @jit
    def fuse(b_all, m_all, kl, cols, thr, out_all):  # pragma: no cover - compiled
        # rows of `cols` entries, stored dtype; kl[r]: row r's KL divergence (float32); thr: float32.
        # Returns whether every result was finite.
        b = np.empty(ch, np.float32)
        m = np.empty(ch, np.float32)
        o = np.empty(ch, np.float32)
        chk = np.zeros(ch, np.float32)
        one, zero = np.float32(1.0), np.float32(0.0)
        for r in range(out_all.shape[0] // cols):
            k_r = kl[r]
            for s in range(r * cols, (r + 1) * cols, ch):
                e = min((r + 1) * cols, s + ch)
                _raw.load(b_all[s:e], b)
                _raw.load(m_all[s:e], m)
                for j in range(e - s):
                    d = m[j] - b[j]
                    keep = one if abs(d) * k_r >= thr else zero
                    o[j] = b[j] + d * keep
                _raw.store_checked(o, out_all[s:e], chk)
        return _raw.all_finite(chk)

    @jit
    def widen(src, dst):  # pragma: no cover - compiled
        # dst[:len(src)] = float32(src), chunk by chunk (exact: a bf16 is the top half of a float32)
        for s in range(0, src.shape[0], ch):
            e = min(src.shape[0], s + ch)
            _raw.load(src[s:e], dst[s:e])

    @jit
    def importance_at(b, m, cols, kl, at, origin, out):  # pragma: no cover - compiled
        # out[t] = |m - b| * kl[row] at flat position at[t] - origin (ascending; at is None:
        # position t) of float32 rows of `cols` entries: the same float32 operations as torch's
        # (m - b).abs_().mul_(kl) on those entries, so the same bits
        if at is None:
            for r in range(out.shape[0] // cols):
                k = kl[r]
                for q in range(r * cols, (r + 1) * cols):
                    out[q] = abs(m[q] - b[q]) * k
            return
        row = 0
        end = cols  # the end of row `row`: ascending positions move it forward
        for t in range(out.shape[0]):
            q = at[t] - origin
            while q >= end:
                row += 1
                end += cols
            out[t] = abs(m[q] - b[q]) * kl[row]

    @jit
    def sample(key, n, pos):  # pragma: no cover - compiled
        # sample_positions' stratified draw into pos (int64 [k]): range j's start floor(j n / k)
        # from a float64 quotient corrected to the exact floor (j n < 2^53: the quotient is off
        # by at most one), then the start plus rng.positions_below's float64 ops on the size
        k = pos.shape[0]
        inv = np.float64(1.0) / np.float64(k)
        scale = np.float64(2.0 ** -53)
        for j in range(k):
            t0 = j * n
            q0 = np.int64(np.float64(t0) * inv)
            q0 += np.int64((q0 + 1) * k <= t0) - np.int64(q0 * k > t0)
            t1 = t0 + n
            q1 = np.int64(np.float64(t1) * inv)
            q1 += np.int64((q1 + 1) * k <= t1) - np.int64(q1 * k > t1)
            size = q1 - q0
            u = np.float64(_random.word(key, j) >> np.uint64(11)) * scale * np.float64(size)
            pos[j] = q0 + min(np.int64(np.floor(u)), size - 1)
        return pos

    @jit
    def select_sorted(values, ranks):  # pragma: no cover - compiled
        # The values a full ascending sort (NaN last) puts at each of `ranks` (0-based, in range).
        # Each float32 maps to a uint32 key that orders like it (negative: all bits flipped;
        # otherwise the sign bit set; every NaN the largest key); one pass counts the keys' top
        # 16 bits, a second counts the low 16 bits of the keys in the buckets that hold the
        # ranks. -0.0 sorts before 0.0 (a sort may put either first: they are equal).
        n = values.shape[0]
        bits = values.view(np.uint32)
        keys = np.empty(n, np.uint32)
        top = np.zeros(1 << 16, np.int64)
        for i in range(n):
            b = bits[i]
            k = ~b if (b >> np.uint32(31)) != 0 else b | np.uint32(0x80000000)
            if values[i] != values[i]:
                k = np.uint32(0xFFFFFFFF)
            keys[i] = k
            top[k >> np.uint32(16)] += 1
        nr = ranks.shape[0]
        bucket = np.empty(nr, np.int64)
        within = np.empty(nr, np.int64)  # rank inside its bucket
        for r in range(nr):
            seen = 0
            h = 0
            while seen + top[h] <= ranks[r]:
                seen += top[h]
                h += 1
            bucket[r] = h
            within[r] = ranks[r] - seen
        low = np.zeros((nr, 1 << 16), np.int64)
        for i in range(n):
            hi = np.int64(keys[i] >> np.uint32(16))
            for r in range(nr):
                if hi == bucket[r]:
                    low[r, keys[i] & np.uint32(0xFFFF)] += 1
        out = np.empty(nr, np.float32)
        for r in range(nr):
            seen = 0
            j = 0
            while seen + low[r, j] <= within[r]:
                seen += low[r, j]
                j += 1
            k = (np.uint32(bucket[r]) << np.uint32(16)) | np.uint32(j)
            b = k ^ np.uint32(0x80000000) if (k >> np.uint32(31)) != 0 else ~k
            out[r] = np.array([b], np.uint32).view(np.float32)[0]
        return out

    return SimpleNamespace(fuse=fuse, widen=widen, importance_at=importance_at, sample=sample,
                           select_sorted=select_sorted)


def row_length(shape: tuple[int, ...]) -> int:
    """Entries per row: the last dimension (a 1-D tensor is one row)."""
    if len(shape) == 0:
        return 1
    return int(shape[-1]) if len(shape) >= 2 else int(shape[0])


class ArceeFusionKernel(Kernel):
    """Arcee Fusion streamed: one pass over whole-row blocks collects the
    importance values for the quartiles; then each block is merged."""

    stat_passes = 1

    def __init__(self, meta: TensorMerge):
        self.cols = row_length(tuple(meta.shape))
        self.align = self.cols
        self.meta = meta
        # the sample's positions (1,000,000 int64: 8 MB) exist only during the statistic pass:
        # the engine makes every tensor's kernel before it merges any, so positions drawn here
        # were held for every large tensor at once (0.9 GB on the 300m family)
        self.pos: torch.Tensor | None = None
        self.parts: list[torch.Tensor] = []
        self.thr: torch.Tensor | None = None
        self.kl: torch.Tensor | None = None  # each row's KL divergence, from the statistic pass

    def _row_kl(self, m: torch.Tensor, b: torch.Tensor, r0: int) -> torch.Tensor:
        """:func:`row_kl` of rows ``r0...`` (``m``, ``b``: ``[rows, cols]``), kept for the merge pass."""
        if self.kl is None:
            self.kl = torch.empty((self.meta.numel // self.cols, 1), dtype=torch.float32, device=m.device)
        kl = row_kl(m, b)
        self.kl[r0:r0 + kl.shape[0]] = kl
        return kl

    def _importance(self, blk: TensorMerge, observe: bool) -> torch.Tensor:
        m, b = blk.models[0].reshape(-1, self.cols), blk.base.reshape(-1, self.cols)
        r0 = blk.offset // self.cols
        if observe:
            kl = self._row_kl(m, b, r0)
        else:
            assert self.kl is not None
            kl = self.kl[r0:r0 + m.shape[0]]
        return importance(m, b, kl).reshape(-1)

    def observe(self, pass_no: int, blk: TensorMerge) -> None:
        if self.pos is None and blk.offset == 0:
            self.pos = sample_positions(self.meta.numel, self.meta.seed, self.meta.name)
        if self.pos is None:
            self.parts.append(self._importance(blk, observe=True))
            return
        # a sampled tensor: every row's KL divergence, but the importance only where sampled
        # (the same float32 ops on the same entries as the whole block's, a fraction of the work)
        m, b = blk.models[0].reshape(-1), blk.base.reshape(-1)
        kl = self._row_kl(m.reshape(-1, self.cols), b.reshape(-1, self.cols), blk.offset // self.cols)
        lo, hi = torch.searchsorted(self.pos, torch.tensor([blk.offset, blk.offset + m.numel()])).tolist()
        if hi > lo:
            at = (self.pos[lo:hi] - blk.offset).to(m.device)
            self.parts.append(importance(m[at], b[at], kl.reshape(-1)[at // self.cols]))

    def observe_raw(self, pass_no: int, piece: PieceInputs) -> bool:
        """The statistic pass over a piece of whole rows from its stored dtype: rows widened
        by the compiled loop into two reused float32 blocks for :func:`row_kl` (torch's
        ``.to(float32)`` of each block cost as much as the softmaxes), then the importance of
        the block's sampled (or all) entries computed by the compiled loop from those blocks
        while they are in cache (from the stored values after the whole piece, the sample's
        loads were ~3 ns each). The same float32 values and operations as :meth:`observe`,
        so the same bits."""
        loops = _kernels()
        whole_rows = piece.start % self.cols == 0 and piece.numel % self.cols == 0
        raw = _raw.based_inputs(piece.base, piece.models, whole_rows and loops is not None)
        if raw is None or piece.numel == 0:
            return False
        if self.pos is None and piece.start == 0:
            self.pos = sample_positions(self.meta.numel, self.meta.seed, self.meta.name)
        b_raw, m_raw = raw[0], raw[1][0]
        rows = piece.numel // self.cols
        r0 = piece.start // self.cols
        step = (block_size_for(torch.device("cpu"), self.cols) or self.cols) // self.cols  # the blocks observe() sees
        bufs = torch.empty((2, min(step, rows), self.cols), dtype=torch.float32)
        flat = bufs.reshape(2, -1).numpy()
        pos = self.pos.numpy() if self.pos is not None else None
        first = 0 if pos is None else int(np.searchsorted(pos, piece.start))
        last = piece.numel if pos is None else int(np.searchsorted(pos, piece.start + piece.numel))
        imp = np.empty(last - first, dtype=np.float32)
        done = 0
        for a in range(0, rows, step):
            e = min(rows, a + step)
            lo, hi = a * self.cols, e * self.cols
            loops.widen(b_raw[lo:hi], flat[0])
            loops.widen(m_raw[lo:hi], flat[1])
            kl = self._row_kl(bufs[1, :e - a], bufs[0, :e - a], r0 + a).reshape(-1).numpy()
            # the block's sampled (or all) importances, from the widened rows while they are in cache
            at = None
            count = hi - lo
            if pos is not None:
                end = first + done + int(np.searchsorted(pos[first + done:last], piece.start + hi))
                at = pos[first + done:end]  # the block's entries at[t] - (piece.start + lo)
                count = end - first - done
            if count:
                loops.importance_at(flat[0], flat[1], self.cols, kl, at, piece.start + lo, imp[done:done + count])
            done += count
        if imp.shape[0]:
            self.parts.append(torch.from_numpy(imp))
        return True

    def end_pass(self, pass_no: int) -> None:
        self.thr = outlier_threshold(self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts))
        self.parts = []
        self.pos = None

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        whole_rows = piece.start % self.cols == 0 and piece.numel % self.cols == 0
        raw = _raw.based_inputs(piece.base, piece.models, whole_rows and _kernels() is not None)
        o = _raw.raw_view(out)
        if raw is None or o is None or self.thr is None or self.kl is None or self.kl.device.type != "cpu":
            return None
        r0 = piece.start // self.cols
        kl = self.kl[r0:r0 + piece.numel // self.cols].reshape(-1).numpy()
        finite = bool(_kernels().fuse(raw[0], raw[1][0], kl, self.cols, np.float32(float(self.thr)), o))
        if piece.start + piece.numel == self.meta.numel:
            self.kl = None
        return finite

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        assert self.thr is not None
        mask = (self._importance(blk, observe=False) >= self.thr).to(torch.float32)
        if blk.offset + blk.base.numel() == self.meta.numel:
            self.kl = None
        return blk.base + (blk.models[0] - blk.base) * mask
