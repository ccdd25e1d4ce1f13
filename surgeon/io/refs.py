"""Model references: local folders or Hugging Face hub ids.

``./models/x`` or ``/abs/path`` is a local folder; ``org/name``,
``org/name@revision`` and ``hf://org/name@revision`` are hub repositories
(resolved through :mod:`surgeon.io.hub`, which downloads only what a step
needs into huggingface-hub's cache).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelRef:
    raw: str
    local: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    def __str__(self) -> str:
        return self.raw


def parse_ref(raw: str) -> ModelRef:
    """Classify a reference (paths are taken as given; make them absolute first)."""
    s = raw.strip()
    if s.startswith("hf://"):
        s = s[len("hf://"):]
        repo, _, rev = s.partition("@")
        return ModelRef(raw, repo_id=repo.strip("/"), revision=rev or None)
    p = Path(s).expanduser()
    if p.exists() or s.startswith(("/", ".", "~")) or s.count("/") != 1:
        return ModelRef(raw, local=p)
    repo, _, rev = s.partition("@")
    return ModelRef(raw, repo_id=repo, revision=rev or None)
