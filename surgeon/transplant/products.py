"""The pursuit's dictionary-wide products: a batch of vectors against every atom.

Nearly all of OMP's arithmetic is ``x @ A.T`` for a batch ``x`` (B x D) and the
whole dictionary ``A`` (N x D), followed by a search of the B x N result for
each row's largest ``|product|`` (exact OMP's pick) or its ``m`` largest
(screening). :class:`DictionaryProducts` does both without forming the B x N
result where it can: on CPU the largest ``|product|`` is searched one block of
:data:`BLOCK` atoms at a time while the block is in the cache, the ``m``
largest in one product with the whole dictionary (a top-k over whole rows is
cheaper than over blocks); products run through numpy's BLAS. On other
devices (CUDA): torch's products on the whole dictionary.

Why numpy's BLAS on CPU: on the development VM's AMD EPYC (AVX-512, 2 cores)
numpy's float32 GEMM (OpenBLAS, as numpy's wheels ship it) ran a (512 x 576)
@ (576 x 39,237) product at 95-101 GFLOP per CPU-second where torch's (MKL)
ran at 50-54. Searching 8 MiB blocks while they are cached instead of the
80 MB whole costs a few passes over cached data instead of over memory.
:func:`blas_threads` gives numpy's BLAS torch's thread count, so a
``--threads`` or ``torch.set_num_threads`` holds for both.

Where the CPU has bfloat16 dot products (AVX512-BF16, AMX;
:func:`bf16_search_available`), exact OMP's search runs on one bfloat16 product
with the whole dictionary instead (torch's, about 1.8x numpy's float32 rate on
that EPYC) and each row's few candidates that the rounding bound cannot rule
out are re-scored exactly: the same picks, certified
(:mod:`surgeon.transplant.search_compiled`).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

import numpy as np
import torch

#: Atoms per block on CPU: a block of products for 512 vectors is 8 MiB, inside a 32 MiB L3.
BLOCK = 4096
#: How :meth:`DictionaryProducts.argmax_abs` may search: ``auto`` takes bfloat16 where the CPU has
#: the instructions (:func:`bf16_search_available`), ``float32`` never, ``bfloat16`` always (tests; slow
#: without the instructions).
SEARCHES = ("auto", "float32", "bfloat16")


def _cpu_has_bf16_dot() -> bool:
    """Whether the CPU advertises bfloat16 dot products (Linux: avx512_bf16 or amx_bf16 in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


@functools.lru_cache(maxsize=1)
def bf16_search_available() -> bool:
    """Whether exact OMP's search runs from bfloat16 products here: the CPU has bfloat16 dot
    products (then torch's oneDNN product runs on them: ~1.8x numpy's float32 GEMM on an
    AVX512-BF16 EPYC, scripts/bench_transplant.py), torch has oneDNN, and the compiled pick
    is available. Decided from what the machine has, not timed: a timed probe on a busy
    2-core machine came out either way from one run to the next."""
    from .search_compiled import available

    return _cpu_has_bf16_dot() and torch.backends.mkldnn.is_available() and available()


def exact_search(device: torch.device | str, search: str = "auto") -> str:
    """How exact OMP searches on ``device``: ``"bfloat16"`` (certified, CPU only: asked for, or
    ``auto`` where :func:`bf16_search_available`) or ``"float32"``."""
    if torch.device(device).type != "cpu":
        return "float32"
    return "bfloat16" if search == "bfloat16" or (search == "auto" and bf16_search_available()) else "float32"


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Run numpy's BLAS on at most ``n`` threads inside the block (unchanged where
    threadpoolctl cannot see numpy's BLAS)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=max(1, n), user_api="blas"):
        yield


def _rows(x: torch.Tensor) -> np.ndarray:
    """``x`` (B x D, on CPU) as the contiguous float32 array numpy's BLAS takes without a copy of its own."""
    return np.ascontiguousarray(x.detach().float().numpy())


class DictionaryProducts:
    """Products of batches of vectors with every atom of one dictionary (N x D, float32).

    ``scale`` (N, optional) multiplies atom j's products by ``scale[j]`` before
    they are compared (the screen's cosines: ``1 / |a_j|``). Ties between equal
    magnitudes go to the lower atom index in :meth:`argmax_abs`. Inputs are float32 on the
    dictionary's device; results are on that device.
    """

    def __init__(self, atoms: torch.Tensor, scale: Optional[torch.Tensor] = None, search: str = "auto"):
        self.n = atoms.shape[0]
        self.scale = scale
        self.on_cpu = atoms.device.type == "cpu"
        self._whole_buf: Optional[torch.Tensor] = None
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
        self._atoms_in = atoms
        self._at: Optional[np.ndarray] = None
        # the certified bfloat16 search (:mod:`surgeon.transplant.search_compiled`), set up on first use
        self._certify = scale is None and exact_search(atoms.device, search) == "bfloat16"
        self._bf16: Optional[torch.Tensor] = None
        if not self.on_cpu:
            self.atoms_t = atoms.float().T

    @property
    def at(self) -> np.ndarray:
        """The atoms as a D x N float32 array for numpy's BLAS (CPU; made on first use: the
        bfloat16 search never needs it)."""
        if self._at is None:
            self._at = np.ascontiguousarray(self._atoms_in.float().numpy().T)
        return self._at

    @property
    def blocks(self) -> list[tuple[int, np.ndarray]]:
        """(first atom, D x BLOCK view of :attr:`at`) for each block of atoms in turn."""
        return [(s, self.at[:, s:s + BLOCK]) for s in range(0, self.n, BLOCK)]

    @property
    def search(self) -> str:
        """How :meth:`argmax_abs` searches: ``"bfloat16"`` (certified, compiled) or ``"float32"``."""
        return "bfloat16" if self._certify else "float32"

    def scaled(self, scale: torch.Tensor) -> "DictionaryProducts":
        """The same products with atom j's multiplied by ``scale[j]``, sharing this one's copy of the atoms."""
        if self.on_cpu:
            self._at = self.at  # made now, so that both share it
        other = object.__new__(DictionaryProducts)
        other.__dict__.update(self.__dict__)
        other.scale, other._whole_buf, other._certify, other._bf16 = scale, None, False, None
        return other

    def _whole(self, x: torch.Tensor) -> torch.Tensor:
        """|x @ A.T| (B x N), scaled; on CPU in a buffer the next call overwrites."""
        if self.on_cpu:
            if self._whole_buf is None or self._whole_buf.shape[0] < x.shape[0]:
                self._whole_buf = torch.empty(x.shape[0], self.n, dtype=torch.float32)
            out = self._whole_buf[:x.shape[0]]  # reused: fresh pages cost as much as the top-k
            np.matmul(_rows(x), self.at, out=out.numpy())
            out.abs_()
        else:
            out = (x @ self.atoms_t).abs_()
        return out.mul_(self.scale) if self.scale is not None else out

    def _block_products(self, x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(first atom, |products| of that block) for each block in turn; the tensor is reused."""
        xn = _rows(x)
        buf = torch.empty(x.shape[0], min(BLOCK, self.n), dtype=torch.float32)
        for s, block in self.blocks:
            out = buf[:, :block.shape[1]]
            np.matmul(xn, block, out=out.numpy())
            out.abs_()
            if self.scale is not None:
                out.mul_(self.scale[s:s + block.shape[1]])
            yield s, out

    def argmax_abs(self, x: torch.Tensor, taken: Optional[torch.Tensor] = None) -> torch.Tensor:
        """For each row of ``x`` (B x D) the index of the atom with the largest ``|<atom, row>|``
        (B, long), among the atoms not in that row of ``taken`` (B x t indices, optional).

        Ties between equal magnitudes go to the lower index. The picked atoms' products with an
        OMP residual are 0 up to rounding, so the float32 search searches a row again over the
        whole dictionary, those atoms at exactly 0, only where one of them came out on top."""
        if self._certify:
            return self._certified(x, taken)
        if not self.on_cpu:
            best_all = self._whole(x)
            if taken is not None and taken.shape[1]:
                best_all.scatter_(1, taken, -1.0)
            return best_all.argmax(1)
        best = torch.full((x.shape[0],), -1.0)
        where = torch.zeros(x.shape[0], dtype=torch.long)
        for s, out in self._block_products(x):
            v, j = out.max(1)
            better = v > best
            best = torch.where(better, v, best)
            where = torch.where(better, j + s, where)
        if taken is not None and taken.shape[1]:
            again = torch.nonzero((where.unsqueeze(1) == taken).any(1)).squeeze(1)
            if again.numel():
                where[again] = self._whole(x[again]).scatter_(1, taken[again], 0.0).argmax(1)
        return where

    def _certified(self, x: torch.Tensor, taken: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`argmax_abs` from one bfloat16 product with the whole dictionary, each row's
        candidates re-scored exactly (:func:`surgeon.transplant.search_compiled.certified_picks`)."""
        from .search_compiled import AtomBounds, certified_picks

        if self._bf16 is None:
            self._atoms = np.ascontiguousarray(self._atoms_in.float().numpy())  # N x D: the candidates' products
            self._bf16 = self._atoms_in.to(torch.bfloat16)
            self._bounds = AtomBounds(self._atoms, self._bf16.float().numpy())
            self._bits_buf: Optional[torch.Tensor] = None
        B = x.shape[0]
        if self._bits_buf is None or self._bits_buf.shape[0] < B:
            self._bits_buf = torch.empty(B, self.n, dtype=torch.bfloat16)
        prods = self._bits_buf[:B]
        xb = x.to(torch.bfloat16)
        torch.mm(xb, self._bf16.T, out=prods)
        t = 0 if taken is None else taken.shape[1]
        tk = np.ascontiguousarray(taken.numpy()) if t else np.zeros((B, 1), np.int64)
        out = np.empty(B, np.int64)
        certified_picks(prods.view(torch.int16).numpy(), self._atoms, self._bounds, _rows(x), _rows(xb), tk, t, out,
                        workers=torch.get_num_threads())
        return torch.from_numpy(out)

    def top_abs(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """For each row of ``x`` (B x D) the indices of the ``m`` atoms with the largest
        ``|<atom, row>|`` (B x m, long, not in order)."""
        # one product with the whole dictionary, then one top-k: torch's top-k over a whole
        # row (radix selection) costs ~0.04 s for 512 x 39,237, per 4096-atom block ~0.02 s
        return self._whole(x).topk(min(m, self.n), dim=1, sorted=False).indices
