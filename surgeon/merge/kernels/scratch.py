"""Per-thread scratch arrays that compiled merges reuse from tensor to tensor."""
from __future__ import annotations

import threading

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
