"""Per-thread scratch arrays that compiled merges reuse from tensor to tensor, and the entries a
one-pass merge lists in them for a second look."""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_THREAD = threading.local()


def thread_scratch(key: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` (contents undefined) in memory this thread reuses
    under ``key``: fresh arrays of tens of MB per tensor cost page faults each time (their
    pages went back to the system when freed); these stay mapped while the thread lives.
    A later call with the same key on the same thread reuses (overwrites) the memory."""
    bufs: dict[str, np.ndarray] = _THREAD.__dict__.setdefault("bufs", {})
    need = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    buf = bufs.get(key)
    if buf is None or buf.nbytes < need:
        buf = bufs[key] = np.empty(need + need // 4, np.uint8)  # grows by a quarter more than asked
    return buf[:need].view(dtype).reshape(shape)


@dataclass
class ListedEntries:
    """Entries a one-pass merge lists for a second look, in flat order: ``positions`` (flat
    indices) and their inputs ``base``/``models`` (stored dtype), the first ``count`` of each,
    in this thread's scratch memory under ``key``. The compiled loop writes past the capacity
    into one spare last slot and counts on, so ``count`` may exceed it (:attr:`overflowed`)."""

    positions: np.ndarray  # int64 [capacity + 1]
    base: np.ndarray       # [capacity + 1], the base's stored dtype
    models: np.ndarray     # [models, capacity + 1], the models' stored dtype
    count: np.ndarray      # int64 [1], added to

    @classmethod
    def empty(cls, key: str, n_models: int, capacity: int, base_dtype: np.dtype,
              model_dtype: np.dtype) -> ListedEntries:
        return cls(thread_scratch(f"{key} positions", (capacity + 1,), np.int64),
                   thread_scratch(f"{key} base", (capacity + 1,), base_dtype),
                   thread_scratch(f"{key} models", (n_models, capacity + 1), model_dtype), np.zeros(1, np.int64))

    @property
    def overflowed(self) -> bool:
        return int(self.count[0]) > self.positions.shape[0] - 1

    def listed(self) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
        """The listed positions, base values and model values (call when not :attr:`overflowed`)."""
        c = int(self.count[0])
        return self.positions[:c], self.base[:c], tuple(self.models[i, :c] for i in range(self.models.shape[0]))

    def merge_again(self, out: np.ndarray, merge: Callable[[np.ndarray, tuple[np.ndarray, ...], np.ndarray], bool],
                    first_finite: bool) -> bool:
        """Merge the listed entries again with ``merge(base, models, into)`` (stored dtypes; it
        returns whether its results are finite) and write them over their first results in
        ``out`` (call when not :attr:`overflowed`); returns whether every value of ``out`` is
        finite now, given ``first_finite``: the first merge's check, which also saw the entries
        merged again (so only a failed one is looked into)."""
        pos, b_at, m_at = self.listed()
        redone = thread_scratch("redone", pos.shape, out.dtype)
        finite_at = merge(b_at, m_at, redone)
        out[pos] = redone
        return finite_at and (first_finite or stored_finite(out))


def stored_finite(raw: np.ndarray) -> bool:
    """Whether every stored value (float32, or bf16 bits as uint16) is finite."""
    if raw.dtype == np.uint16:
        return bool(((raw & np.uint16(0x7F80)) != np.uint16(0x7F80)).all())
    return bool(np.isfinite(raw).all())
