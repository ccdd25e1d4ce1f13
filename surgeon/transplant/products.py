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
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import numpy as np
import torch

#: Atoms per block on CPU: a block of products for 512 vectors is 8 MiB, inside a 32 MiB L3.
BLOCK = 4096


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

    def __init__(self, atoms: torch.Tensor, scale: Optional[torch.Tensor] = None):
        self.n = atoms.shape[0]
        self.scale = scale
        self.on_cpu = atoms.device.type == "cpu"
        self._whole_buf: Optional[torch.Tensor] = None
        if self.on_cpu:
            self.at = np.ascontiguousarray(atoms.float().numpy().T)  # D x N
            self.blocks = [(s, self.at[:, s:s + BLOCK]) for s in range(0, self.n, BLOCK)]  # views, BLAS-ready
        else:
            self.atoms_t = atoms.float().T

    def scaled(self, scale: torch.Tensor) -> "DictionaryProducts":
        """The same products with atom j's multiplied by ``scale[j]``, sharing this one's copy of the atoms."""
        other = object.__new__(DictionaryProducts)
        other.__dict__.update(self.__dict__)
        other.scale, other._whole_buf = scale, None
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

    def argmax_abs(self, x: torch.Tensor) -> torch.Tensor:
        """For each row of ``x`` (B x D) the index of the atom with the largest ``|<atom, row>|`` (B, long)."""
        if not self.on_cpu:
            return self._whole(x).argmax(1)
        best = torch.full((x.shape[0],), -1.0)
        where = torch.zeros(x.shape[0], dtype=torch.long)
        for s, out in self._block_products(x):
            v, j = out.max(1)
            better = v > best
            best = torch.where(better, v, best)
            where = torch.where(better, j + s, where)
        return where

    def top_abs(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """For each row of ``x`` (B x D) the indices of the ``m`` atoms with the largest
        ``|<atom, row>|`` (B x m, long, not in order)."""
        # one product with the whole dictionary, then one top-k: torch's top-k over a whole
        # row (radix selection) costs ~0.04 s for 512 x 39,237, per 4096-atom block ~0.02 s
        return self._whole(x).topk(min(m, self.n), dim=1, sorted=False).indices
