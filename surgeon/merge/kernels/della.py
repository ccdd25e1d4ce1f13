"""DELLA's arithmetic and kernel: MagPrune on whole rows, L1 sums streamed.

The definition is :func:`surgeon.merge.methods.della.della` /
``della_linear``; tests/test_merge_conformance.py proves this kernel equal to it.

MagPrune keeps an entry with a probability set by its magnitude's rank in
its row (dim 1), decided by comparing it with a random partner from the same
row (:func:`magprune_keep`), so pieces and blocks hold whole rows (``align``:
the entries under one index of dim 0). The uniforms and the partners' words
are counter-based (:class:`DellaDraws`): entry ``j`` gets the same numbers
whatever piece, block or device computes it. ``rescale`` needs
each task vector's L1 norm before and after pruning over the whole tensor:
one statistic pass sums them (float64, as the reference does) and keeps each
piece's keep mask packed to bits (1/16 of the bf16 inputs of a pruned model,
for the tensor being merged only), so the merge pass draws nothing again.

With numba, the statistic pass is one compiled call per piece and model
(:mod:`surgeon.merge.kernels.della_compiled`) and the merge pass the TIES/DARE
loop reading the keep bits (:mod:`surgeon.merge.kernels.ties_compiled`); the
torch block path below is the fallback and the definition those loops follow.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from ..arith import L1_EPS, combine, weight_total
from ..rng import slice16_stream, stream_key, word_stream, words_at
from ..tensor import TensorMerge
from . import della_compiled, ties_compiled
from ._raw import based_inputs, raw_view
from .base import Kernel, PieceInputs


def della_params_ok(density: float, epsilon: float) -> bool:
    """Whether MagPrune accepts these parameters (else the reference raises the error)."""
    return density >= 1 or density <= 0 or (density + epsilon < 1 and density - epsilon > 0)


def rows_view(delta: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``delta`` (the tensor or a block of whole rows of a tensor of ``shape``)
    as MagPrune's rows: dim 1 is ranked (a 1-D tensor is one row)."""
    if len(shape) < 2:
        return delta.reshape(1, -1)
    return delta.reshape(-1, *shape[1:])


#: the uniforms' resolution: an entry's uniform is a 32-bit integer ``U``, ``u = U / 2^32``
U_BITS = 32


@dataclass(frozen=True)
class DellaDraws:
    """One model's random numbers over one tensor: three counter-based streams keyed by
    (recipe seed, tensor name, salt), so a piece, a block or a device draws what the whole
    tensor would.

    - ``coarse`` (salt ``della:<i>``): the 16-bit stream (:func:`slice16_stream`) giving
      entry ``j``'s uniform its top 16 bits, four entries a hash;
    - ``fine`` (salt ``della-fine:<i>``): the top 16 bits of word ``j``, its low 16 bits
      (a compiled loop draws them only for the rare entry whose top half sits on a bound's);
    - ``partner`` (salt ``della-partner:<i>``): the band's words. The ``k``-th band entry of a
      line (the entries ranked together, dim 1) takes the word at the flat position of that
      line's ``k``-th entry: one word a band entry, each a distinct counter."""

    coarse: int
    fine: int
    partner: int

    @classmethod
    def of(cls, seed: int, name: str, i: int) -> DellaDraws:
        """Model ``i``'s streams over tensor ``name``."""
        return cls(stream_key(seed, name, f"della:{i}"), stream_key(seed, name, f"della-fine:{i}"),
                   stream_key(seed, name, f"della-partner:{i}"))

    def uniforms(self, start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Entries ``[start, start + n)``'s uniforms ``U`` (int64 values in ``[0, 2^32)``)."""
        top = slice16_stream(self.coarse, start, n, device)
        low = (word_stream(self.fine, start, n, device) >> 48) & 0xFFFF
        return (top << 16) | low


def keep_bounds(density: float, epsilon: float) -> tuple[int, int]:
    """MagPrune's lowest and highest keep probability, ``density -+ epsilon`` rounded to
    float32, as the integers ``L``, ``H`` that a uniform ``U`` is compared with:
    ``U < L`` exactly when ``U / 2^32 < lo`` (``L = ceil(lo 2^32)``, exact in float64)."""
    lo, hi = np.float32(density - epsilon), np.float32(density + epsilon)
    return math.ceil(float(lo) * 2.0 ** U_BITS), math.ceil(float(hi) * 2.0 ** U_BITS)


def magnitude_keys(rows: torch.Tensor) -> torch.Tensor:
    """``|rows|`` as integers that order as the magnitudes do (the bit patterns
    of the absolute values, sign bit clear; NaN above infinity, as sorts put it)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[rows.element_size()]
    return rows.abs().view(ints)


def partner_offsets(words: torch.Tensor, m: int) -> torch.Tensor:
    """``floor(w m / 2^64)`` of each 64-bit word ``w`` (int64 bit patterns): a
    uniform draw from ``0..m-1`` (uneven by at most ``m / 2^64``), ``m < 2^31``
    (rows of up to 2^31 entries; the compiled loop computes the same in uint64)."""
    if not 0 < m < 2 ** 31:
        raise ValueError(f"partner_offsets: a row of {m + 1} entries is out of range")
    high = (words >> 32) & 0xFFFFFFFF
    low = words & 0xFFFFFFFF
    return (high * m + ((low * m) >> 32)) >> 32  # < 2^63 throughout: exact in int64


def magprune_keep(rows: torch.Tensor, density: float, epsilon: float, draws: DellaDraws,
                  start: int) -> torch.Tensor:
    """MagPrune's keep mask (bool, shape of ``rows``: :func:`rows_view` of the task vector,
    or of a block of whole rows of it starting at flat index ``start``).

    Entry ``j`` of a line of ``n`` (the entries along dim 1) must be kept with probability
    ``p_j = lo + (hi - lo) r_j / (n - 1)`` (:func:`keep_bounds`; ``r_j`` its rank by
    magnitude, ties by index). With ``u`` its uniform it is kept when ``u < lo``, dropped
    when ``u >= hi``, and in between (the band, probability ``hi - lo``) kept when it
    outranks a partner drawn uniformly from the line's other ``n - 1`` entries by its word
    (:class:`DellaDraws`, :func:`partner_offsets`), which happens with probability exactly
    ``r_j / (n - 1)``: so ``P(keep) = p_j``, each entry decided by numbers no other entry
    uses, independently of the others, with no sort. A line of one entry keeps in the
    band with probability 1/2 (the word's top bit): ``p = density``."""
    n = rows.shape[1]
    lo, hi = keep_bounds(density, epsilon)
    u = draws.uniforms(start, rows.numel(), rows.device).reshape(rows.shape)
    band = (u >= lo) & (u < hi)
    keep = u < lo
    if not bool(band.any()):
        return keep
    # the k-th band entry of a line takes the word at the flat position of the line's k-th entry
    flat = torch.arange(start, start + rows.numel(), dtype=torch.int64, device=rows.device).reshape(rows.shape)
    slot = band.to(torch.int64).cumsum(1).sub_(1).clamp_(min=0)
    words = words_at(draws.partner, flat.gather(1, slot))
    if n > 1:
        pos = torch.arange(n, device=rows.device).reshape(1, n, *([1] * (rows.dim() - 2))).expand(rows.shape)
        off = partner_offsets(words, n - 1)
        mags = magnitude_keys(rows)
        theirs = mags.gather(1, off + (off >= pos))
        outranks = (mags > theirs) | ((mags == theirs) & (off < pos))
    else:
        outranks = words < 0
    return keep | (band & outranks)


def l1_sum(t: torch.Tensor) -> float:
    """``sum |t|`` accumulated in float64 (the rescale's norms: block partial
    sums add up to the whole tensor's to float64 rounding, which float32 sums
    would not)."""
    return float(t.abs().sum(dtype=torch.float64))


def l1_scale(before: float, after: float) -> float | None:
    """The rescale factor ``before / after`` (None: either norm below :data:`L1_EPS`, no rescale)."""
    if before < L1_EPS or after < L1_EPS:
        return None
    return before / after


class DellaKernel(Kernel):
    """``della`` / ``della_linear`` on pieces or blocks of whole rows."""

    def __init__(self, meta: TensorMerge, consensus: str | None):
        p = meta.params
        self.meta = meta
        self.consensus = consensus
        self.normalize = bool(p["normalize"])
        self.lam = float(p["lambda"])
        self.dens = [float(mp["density"]) for mp in meta.model_params]
        self.eps = [float(mp["epsilon"]) for mp in meta.model_params]
        self.prunes = [0 < d < 1 for d in self.dens]
        self.draws = [DellaDraws.of(meta.seed, meta.name, i) for i in range(len(self.dens))]
        shape = tuple(meta.shape)
        self.row = meta.numel if len(shape) < 2 else meta.numel // max(1, shape[0])
        self.align = self.row
        # rows of contiguous entries (a 3-D tensor ranks along a strided dim 1: torch blocks only)
        self.flat_rows = len(shape) <= 2
        self.rescale = bool(p["rescale"])
        self.stat_passes = 1 if self.rescale and any(self.prunes) else 0
        n = len(self.dens)
        self.before = [0.0] * n
        self.after = [0.0] * n
        self.scale: list[float | None] = [None] * n
        # the statistic pass's keep masks in flat order: (offset, numel, packed bits [models, ceil(numel / 8)])
        self._masks: deque[tuple[int, int, np.ndarray]] = deque()

    # -- torch blocks (the fallback, and the definition the compiled loops follow) --------------
    def _pruned(self, blk: TensorMerge, keep_bits: np.ndarray | None = None
                ) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        """Per model: (task vector, pruned task vector and keep mask, or None and None where nothing is drawn).
        ``keep_bits``: the statistic pass's packed keep masks of this block (else ranked and drawn here)."""
        n = blk.base.numel()
        out = []
        shape = tuple(self.meta.shape)
        for i, m in enumerate(blk.models):
            d = m - blk.base
            if not self.prunes[i]:
                out.append((d if self.dens[i] >= 1 else d.zero_(), None, None))
                continue
            rows = rows_view(d, shape)
            if keep_bits is None:
                keep = magprune_keep(rows, self.dens[i], self.eps[i], self.draws[i], blk.offset)
            else:
                keep = torch.from_numpy(np.unpackbits(keep_bits[i], count=n).view(np.bool_)).reshape(rows.shape)
            out.append((d, (rows * keep).reshape(d.shape), keep))
        return out

    def observe(self, pass_no: int, blk: TensorMerge) -> None:
        n = blk.base.numel()
        bits = np.zeros((len(self.dens), (n + 7) // 8), dtype=np.uint8)
        for i, (d, pruned, keep) in enumerate(self._pruned(blk)):
            if pruned is None or keep is None:
                continue
            self.before[i] += l1_sum(d)
            self.after[i] += l1_sum(pruned)
            bits[i] = np.packbits(keep.reshape(-1).numpy())
        self._masks.append((blk.offset, n, bits))

    def end_pass(self, pass_no: int) -> None:
        self.scale = [l1_scale(b, a) if pr else None for b, a, pr in zip(self.before, self.after, self.prunes)]

    def _block_bits(self, offset: int, numel: int) -> np.ndarray | None:
        """The statistic pass's keep bits of entries ``[offset, offset + numel)``
        (whole rows inside one observed piece or block), or None without a statistic pass."""
        if not self.stat_passes:
            return None
        start, count, bits = self._masks[0] if self._masks else (-1, 0, None)
        if bits is None or not (start <= offset and offset + numel <= start + count):
            raise RuntimeError(f"tensor {self.meta.name!r}: della merge block {offset}+{numel} "
                               f"is not inside the statistic pass's next piece {start}+{count}")
        if offset + numel == start + count:
            self._masks.popleft()
        lo = offset - start
        if lo == 0 and numel == count:
            return bits
        flat = np.unpackbits(bits, axis=1, count=count)[:, lo:lo + numel]
        return np.packbits(flat, axis=1)

    def merge(self, blk: TensorMerge) -> torch.Tensor:
        keep_bits = self._block_bits(blk.offset, blk.base.numel())
        deltas = []
        for i, (d, pruned, _) in enumerate(self._pruned(blk, keep_bits)):
            if pruned is None:
                deltas.append(d)
                continue
            if self.rescale and self.scale[i] is not None:
                pruned.mul_(self.scale[i])
            deltas.append(pruned)
        return combine(blk, deltas, consensus=self.consensus, normalize=self.normalize, lam=self.lam)

    # -- the compiled loops, on whole pieces in their stored dtype ------------------------------
    def _raw(self, piece: PieceInputs) -> tuple[np.ndarray, tuple[np.ndarray, ...]] | None:
        """The piece's stored-dtype views, or None where the compiled loops do not apply."""
        whole_rows = self.flat_rows and piece.start % self.row == 0 and piece.numel % self.row == 0
        return based_inputs(piece.base, piece.models, whole_rows and della_compiled.available())

    def _piece_bits(self, piece: PieceInputs, raw: tuple[np.ndarray, tuple[np.ndarray, ...]]) -> np.ndarray:
        """Each pruned model's keep bits over the piece (the L1 sums added to :attr:`before`/:attr:`after`)."""
        bits = np.zeros((len(self.dens), (piece.numel + 7) // 8), dtype=np.uint8)
        sums = np.zeros((len(self.dens), 2), dtype=np.float64)
        which = [i for i, prunes in enumerate(self.prunes) if prunes]
        della_compiled.keep_bits(raw[0], raw[1], self.row, which,
                                 [(self.draws[i].coarse, self.draws[i].fine, self.draws[i].partner) for i in which],
                                 piece.start, [keep_bounds(self.dens[i], self.eps[i]) for i in which], bits, sums)
        for i in which:
            self.before[i] += float(sums[i, 0])
            self.after[i] += float(sums[i, 1])
        return bits

    def observe_raw(self, pass_no: int, piece: PieceInputs) -> bool:
        raw = self._raw(piece)
        if raw is None:
            return False
        self._masks.append((piece.start, piece.numel, self._piece_bits(piece, raw)))
        return True

    def merge_raw(self, piece: PieceInputs, out: torch.Tensor) -> bool | None:
        raw, o = self._raw(piece), raw_view(out)
        if raw is None or o is None:
            return None
        if self.stat_passes:
            if not self._masks or self._masks[0][:2] != (piece.start, piece.numel):
                return None  # the statistic pass saw other pieces: blocks take their bits from it
            bits = self._masks.popleft()[2]
        else:
            bits = self._piece_bits(piece, raw)
        kinds = np.array([3 if pr else (0 if dn >= 1 else 1) for pr, dn in zip(self.prunes, self.dens)], np.int8)
        scales = np.array([s if (self.rescale and s is not None) else 1.0 for s in self.scale], np.float32)
        weights = self.meta.weights()
        args = ties_compiled.mask_args(kinds, np.array(weights, np.float32), self.consensus is not None,
                                       self.normalize, weight_total(weights), self.lam, scales)
        return ties_compiled.merge_raw(raw[0], raw[1], args, o, masks=bits)
