"""DELLA's arithmetic and kernel: MagPrune on whole rows, L1 sums streamed.

The definition is :func:`surgeon.merge.methods.della.della` /
``della_linear``; tests/test_merge_conformance.py proves this kernel equal to it.

MagPrune ranks the entries of each row (dim 1) by magnitude, so pieces and
blocks hold whole rows (``align``: the entries under one index of dim 0).
The uniforms are counter-based (:meth:`TensorMerge.uniform`, salt
``della:<i>``): entry ``j`` gets the same number whatever piece, block or
device computes it. ``rescale`` needs each task vector's L1 norm before and
after pruning over the whole tensor: one statistic pass sums them (float64,
as the reference does) and keeps each piece's keep mask packed to bits (1/16
of the bf16 inputs of a pruned model, for the tensor being merged only), so
the merge pass neither ranks nor draws again.

With numba, the statistic pass is one compiled call per piece and model
(:mod:`surgeon.merge.kernels.della_compiled`: most entries are decided
without their exact rank) and the merge pass the TIES/DARE loop reading
the keep bits (:mod:`surgeon.merge.kernels.ties_compiled`); the torch block
path below is the fallback and the definition those loops follow.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

from ..arith import L1_EPS, combine, weight_total
from ..rng import stream_key
from ..select.exact import stable_ranks
from ..select.ranks import magnitude_ranks
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


def keep_table(n: int, density: float, epsilon: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """MagPrune's keep probability by rank in a row of ``n`` (float32 ``[n]``):
    ``density - epsilon + 2 epsilon rank / (n - 1)``, as float32 ops in that
    order (rank 0.5 when ``n == 1``). Non-decreasing in the rank (each op is
    monotone), which :mod:`surgeon.merge.kernels.della_compiled` relies on."""
    if n > 1:
        rank = torch.arange(n, dtype=torch.float32, device=device).div_(n - 1)
    else:
        rank = torch.full((max(n, 0),), 0.5, dtype=torch.float32, device=device)
    return rank.mul_(2 * epsilon).add_(density - epsilon)


def magprune_keep(rows: torch.Tensor, density: float, epsilon: float, u: torch.Tensor,
                  compiled: bool = False) -> torch.Tensor:
    """MagPrune's keep mask (bool, shape of ``rows``): rank ``|rows|`` along
    dim 1 (stable: equal magnitudes by index), keep where ``u`` (uniforms
    shaped like ``rows``) is below :func:`keep_table` at the rank.
    ``compiled``: rank 2-D rows with the compiled radix loop
    (:func:`surgeon.merge.select.ranks.magnitude_ranks`, the same ranks); the
    reference function ranks with torch."""
    n = rows.shape[1]
    table = keep_table(n, density, epsilon, rows.device)
    if n > 1:
        ranks = magnitude_ranks(rows) if compiled and rows.dim() == 2 else stable_ranks(rows.abs(), dim=1)
    else:
        ranks = torch.zeros(rows.shape, dtype=torch.int64, device=rows.device)
    return u < table[ranks]


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
        shape = tuple(meta.shape)
        self.row = meta.numel if len(shape) < 2 else meta.numel // max(1, shape[0])
        self.align = self.row
        # rows of contiguous entries (a 3-D tensor ranks along a strided dim 1: torch blocks only)
        self.flat_rows = len(shape) <= 2
        self.rescale = bool(p["rescale"])
        self.stat_passes = 1 if self.rescale and any(self.prunes) else 0
        n = len(self.dens)
        self.salts = [f"della:{i}" for i in range(n)]
        self.before = [0.0] * n
        self.after = [0.0] * n
        self.scale: list[float | None] = [None] * n
        # the statistic pass's keep masks in flat order: (offset, numel, packed bits [models, ceil(numel / 8)])
        self._masks: deque[tuple[int, int, np.ndarray]] = deque()
        self._tables: list[np.ndarray] | None = None

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
                u = blk.uniform(self.salts[i]).reshape(rows.shape)
                keep = magprune_keep(rows, self.dens[i], self.eps[i], u, compiled=True)
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
        if self._tables is None:
            self._tables = [keep_table(self.row, d, e).numpy() for d, e in zip(self.dens, self.eps)]
        bits = np.zeros((len(self.dens), (piece.numel + 7) // 8), dtype=np.uint8)
        sums = np.zeros(2, dtype=np.float64)
        for i, prunes in enumerate(self.prunes):
            if not prunes:
                continue
            sums[:] = 0.0
            key = stream_key(self.meta.seed, self.meta.name, self.salts[i])
            della_compiled.keep_bits(raw[0], raw[1][i], self.row, key, piece.start, self._tables[i], bits[i], sums)
            self.before[i] += float(sums[0])
            self.after[i] += float(sums[1])
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
