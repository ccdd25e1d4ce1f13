"""Process settings: every ``SURGEON_*`` environment variable, read in one place.

Variables (all optional):

``SURGEON_NO_NUMBA=1``
    run every merge kernel with torch ops instead of the compiled numba loops
    (same numbers; for diagnosis and for machines without numba).
``SURGEON_COMPUTE_WORKERS=N``
    compute threads of a merge (default: the run's ``threads``).
``SURGEON_KEEP_WRITE_CACHE=1``
    leave written output in the page cache (the writer normally drops it
    once hashed).

:func:`current` returns them parsed; the environment is read again only when
one of these variables changed (tests set them with ``monkeypatch.setenv``).
Nothing here writes to ``os.environ``. See docs/architecture.md ("Settings").
"""
from __future__ import annotations

import os
from dataclasses import dataclass

#: the variables this module reads, with a one-line description each
VARIABLES: dict[str, str] = {
    "SURGEON_NO_NUMBA": "1: torch ops instead of the compiled merge loops",
    "SURGEON_COMPUTE_WORKERS": "compute threads of a merge (default: the run's threads)",
    "SURGEON_KEEP_WRITE_CACHE": "1: leave written output in the page cache",
}


@dataclass(frozen=True)
class Settings:
    """The parsed ``SURGEON_*`` variables."""

    no_numba: bool = False
    compute_workers: int | None = None
    keep_write_cache: bool = False


def _flag(raw: str | None) -> bool:
    return (raw or "").strip() not in ("", "0")


def _parse(raw: tuple[str | None, ...]) -> Settings:
    no_numba, workers, keep = raw
    n: int | None = None
    if workers is not None and workers.strip():
        try:
            n = max(1, int(workers))
        except ValueError:
            from .errors import InvalidInputError

            raise InvalidInputError(f"SURGEON_COMPUTE_WORKERS must be a whole number, got {workers!r}") from None
    return Settings(no_numba=_flag(no_numba), compute_workers=n, keep_write_cache=_flag(keep))


_cache: tuple[tuple[str | None, ...], Settings] | None = None


def current() -> Settings:
    """The settings of this process, from its environment."""
    global _cache
    raw = tuple(os.environ.get(k) for k in VARIABLES)
    if _cache is None or _cache[0] != raw:
        _cache = (raw, _parse(raw))
    return _cache[1]
